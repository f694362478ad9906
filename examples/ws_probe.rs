use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
fn rss(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (port, token, pid, n) = (
        &args[1],
        &args[2],
        &args[3],
        args[4].parse::<usize>().unwrap(),
    );
    let before = rss(pid);
    let mut sockets = Vec::new();
    for _ in 0..n {
        let mut request = format!("ws://127.0.0.1:{port}/graphql")
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut s, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        s.send(Message::Text(
            format!(r#"{{"type":"connection_init","payload":{{"token":"{token}"}}}}"#).into(),
        ))
        .await
        .unwrap();
        let _ = s.next().await;
        if args.get(5).is_some_and(|a| a == "chat") {
            s.send(Message::Text(r#"{"id":"1","type":"subscribe","payload":{"query":"subscription { chat(input:{query:\"hi\"}) { __typename seq ... on AnswerDelta { delta } } }"}}"#.into())).await.unwrap();
        }
        sockets.push(s);
    }
    // Keep reading so the gateway never buffers for us.
    let reading = futures::future::join_all(sockets.iter_mut().map(|s| async move {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, s.next()).await {}
    }));
    reading.await;
    let after = rss(pid);
    println!("{n} idle sockets: {} KiB each", (after - before) / n as u64);
}
