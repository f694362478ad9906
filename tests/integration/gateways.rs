//! Several gateways on one database: gateway A is the real binary in its own process, B the
//! test's in-process app. Tokens, conflicts and resumes cross between them; A killed with
//! SIGKILL mid-answer has its answer marked INTERRUPTED by B once A's lease expires.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::chat::{CHAT, stored, wait_for_status};
use crate::harness::fake_dify::Script;
use crate::harness::ws::{OpMessage, TRANSPORT_WS, WsClient};
use crate::harness::{Actor, TestApp, error_code};

/// The lease of both gateways in these tests.
const LEASE: Duration = Duration::from_secs(2);

/// A gateway process running the release or debug binary of this package.
struct Gateway {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Gateway {
    /// Starts the binary on `b`'s database and fake Dify, and waits until it answers.
    async fn start(b: &TestApp) -> Self {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rechat"))
            .env_clear()
            .env("DATABASE_URL", b.db.url())
            .env("DIFY_API_URL", &b.dify.url)
            .env(
                "SECRET_KEY",
                "test-secret-key-that-is-long-enough-0123456789",
            )
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("GATEWAY_LEASE_SECONDS", LEASE.as_secs().to_string())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("the rechat binary starts");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = b
                .http
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Self { child, addr };
            }
            assert!(Instant::now() < deadline, "gateway A never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ws(&self, user: &Actor<'_>) -> WsClient {
        let payload =
            json!({ "Authorization": format!("Bearer {}", user.token.as_deref().unwrap()) });
        WsClient::connect(
            &format!("ws://{}/graphql", self.addr),
            TRANSPORT_WS,
            Some(payload),
        )
        .await
        .expect("connection_ack from A")
    }
}

async fn first_event(ws: &mut WsClient) -> Value {
    match ws.next_op().await {
        OpMessage::Next(payload) => payload["data"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone(),
        other => panic!("{other:?}"),
    }
}

const RESUME: &str = r#"subscription($id: ID!, $after: Int) { resumeChat(messageId: $id, afterSeq: $after) { __typename seq
  ... on ChatSnapshot { message { content status } }
  ... on ChatFailed { message { status } error { code } }
} }"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_killed_mid_answer_has_its_answer_interrupted_by_another() {
    let b = TestApp::spawn_with(|c| c.gateway_lease = LEASE).await;
    rechat::chat::spawn_sweeper(b.app.clone());
    let (admin, user) = b.admin_and_user().await;
    b.configure_dify(&admin, "chat").await;
    let a = Gateway::start(&b).await;

    // A token from B works on A; the answer streams from A.
    b.dify.push(Script::Long {
        deltas: 10_000,
        pause: Duration::from_millis(20),
    });
    let mut on_a = a.ws(&user).await;
    on_a.subscribe(CHAT, json!({ "input": { "query": "long" } }))
        .await;
    let started = first_event(&mut on_a).await;
    let id = started["messageId"].as_str().unwrap().to_owned();
    let conversation = started["conversation"]["id"].as_str().unwrap().to_owned();
    b.dify.wait_for_requests("/chat-messages", 1).await;

    // On B: a turn into that conversation is CONFLICT; a resume follows A's answer through
    // its stored row.
    let mut turn = user.ws(TRANSPORT_WS).await;
    turn.subscribe(
        CHAT,
        json!({ "input": { "query": "again", "conversationId": conversation } }),
    )
    .await;
    let refused = turn.collect().await.expect_err("one turn at a time");
    assert_eq!(error_code(&refused), "CONFLICT");
    let mut resumed = user.ws(TRANSPORT_WS).await;
    resumed
        .subscribe(RESUME, json!({ "id": id, "after": 1 }))
        .await;
    let snapshot = first_event(&mut resumed).await;
    assert_eq!(snapshot["__typename"], "ChatSnapshot", "{snapshot}");
    assert_eq!(snapshot["message"]["status"], "STREAMING");

    // A dies without a word.
    let mut a = a;
    a.child.start_kill().unwrap();
    let killed = Instant::now();
    a.child.wait().await.unwrap();
    wait_for_status(&b, &id, "INTERRUPTED").await;
    let took = killed.elapsed();
    assert!(took < LEASE * 3, "marked after {took:?}");
    assert!(stored(&b, &id, "error").await.contains("interrupted"));
    // The resumer on B sees the end.
    let mut last = Value::Null;
    while let OpMessage::Next(payload) = resumed.next_op().await {
        last = payload["data"]["resumeChat"].clone();
    }
    assert_eq!(last["__typename"], "ChatFailed", "{last}");
    assert_eq!(last["error"]["code"], "interrupted");
}
