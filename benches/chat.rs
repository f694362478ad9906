//! End-to-end chat latency through the real gateway: `cargo bench --bench chat`.
//!
//! Needs the local MySQL/MariaDB like the tests. Starts the gateway and the fake Dify (replaying
//! the chatflow capture with no pacing), runs chat turns over the WebSocket one after another
//! and then concurrently, and prints time to `ChatStarted` (the turn's transaction), to the first
//! `AnswerDelta`, and to `ChatCompleted` (the final write), plus peak RSS.

#[path = "../tests/integration/harness/mod.rs"]
#[allow(dead_code)]
mod harness;

use std::time::{Duration, Instant};

use harness::fake_dify::Script;
use harness::ws::{OpMessage, TRANSPORT_WS};
use harness::{Actor, TestApp};
use serde_json::json;

const CHAT: &str = "subscription($input: ChatInput!) { chat(input: $input) { __typename } }";

struct Timing {
    started: Duration,
    first_delta: Duration,
    completed: Duration,
}

async fn turn(user: &Actor<'_>) -> Timing {
    let mut ws = user.ws(TRANSPORT_WS).await;
    let begin = Instant::now();
    ws.subscribe(CHAT, json!({ "input": { "query": "你好" } }))
        .await;
    let (mut started, mut first_delta) = (None, None);
    loop {
        match ws.next_op().await {
            OpMessage::Next(payload) => match payload["data"]["chat"]["__typename"].as_str() {
                Some("ChatStarted") => started = Some(begin.elapsed()),
                Some("AnswerDelta") if first_delta.is_none() => first_delta = Some(begin.elapsed()),
                Some("ChatFailed") => panic!("chat failed: {payload}"),
                _ => {}
            },
            OpMessage::Complete => break,
            OpMessage::Error(e) => panic!("{e}"),
        }
    }
    let completed = begin.elapsed();
    ws.close().await;
    Timing {
        started: started.unwrap(),
        first_delta: first_delta.unwrap(),
        completed,
    }
}

fn report(label: &str, mut timings: Vec<Timing>) {
    let pct = |values: &mut Vec<Duration>, p: f64| {
        values.sort();
        values[((values.len() as f64 - 1.0) * p).round() as usize]
    };
    let mut started: Vec<_> = timings.iter().map(|t| t.started).collect();
    let mut first: Vec<_> = timings.iter().map(|t| t.first_delta).collect();
    let mut done: Vec<_> = timings.drain(..).map(|t| t.completed).collect();
    println!(
        "{label:<24} ChatStarted p50 {:>7.2?} p95 {:>7.2?} | first delta p50 {:>7.2?} p95 {:>7.2?} | completed p50 {:>7.2?} p95 {:>7.2?}",
        pct(&mut started, 0.5),
        pct(&mut started, 0.95),
        pct(&mut first, 0.5),
        pct(&mut first, 0.95),
        pct(&mut done, 0.5),
        pct(&mut done, 0.95)
    );
}

#[tokio::main]
async fn main() {
    let app = TestApp::spawn_with(|config| config.db_pool_size = 16).await;
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "advanced-chat").await;
    app.dify.set_default(Script::Replay {
        fixture: "chatflow.sse",
        chunks: vec![4096],
        pause: Duration::ZERO,
    });

    turn(&user).await; // warm-up
    let mut sequential = Vec::new();
    for _ in 0..50 {
        sequential.push(turn(&user).await);
    }
    report("50 sequential turns", sequential);

    let begin = Instant::now();
    let concurrent = futures::future::join_all((0..50).map(|_| turn(&user))).await;
    let wall = begin.elapsed();
    report("50 concurrent turns", concurrent);
    println!("50 concurrent turns took {wall:.2?} in all");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        println!(
            "peak RSS (gateway + fake Dify + clients in one process): {}",
            line.trim_start_matches("VmHWM:").trim()
        );
    }
}
