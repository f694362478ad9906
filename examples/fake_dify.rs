//! A fake Dify to try rechat without a Dify account: it speaks the Service API that rechat
//! uses and replays real captured streams (the same fake the integration tests use).
//!
//! ```sh
//! cargo run --example fake_dify -- --mode chat --port 5001 [--slow | --long]
//! ```
//! Then, as admin: `createDifyApp(input: {apiKey: "app-fakeDifyKey0123456789", apiUrl: "http://127.0.0.1:5001"})`.

#[path = "../tests/integration/harness/fake_dify.rs"]
#[allow(dead_code)]
mod fake_dify;

use std::time::Duration;

use fake_dify::{AWKWARD_CHUNKS, DIFY_KEY, FakeDify, Script};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mode = value("--mode").unwrap_or_else(|| "chat".into());
    let port: u16 = value("--port").and_then(|p| p.parse().ok()).unwrap_or(5001);
    let modes = [
        "chat",
        "agent-chat",
        "advanced-chat",
        "workflow",
        "completion",
    ];
    if !modes.contains(&mode.as_str()) {
        eprintln!("--mode must be one of {modes:?}");
        std::process::exit(2);
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        });
    let dify = FakeDify::serve(listener, &mode).await;
    if args.iter().any(|a| a == "--long") {
        // A long answer, a word every 150 ms: time to close the tab or press stop.
        dify.set_default(Script::Long {
            deltas: 400,
            pause: Duration::from_millis(150),
        });
    } else {
        let fixture = match mode.as_str() {
            "agent-chat" => "agent-chat-tool-call.sse",
            "advanced-chat" => "chatflow.sse",
            "workflow" => "workflow-run.sse",
            _ => "chat-basic.sse",
        };
        // Paced so the answer visibly streams in GraphiQL.
        let pause = if args.iter().any(|a| a == "--slow") {
            60
        } else {
            15
        };
        dify.set_default(Script::Replay {
            fixture,
            chunks: AWKWARD_CHUNKS.to_vec(),
            pause: Duration::from_millis(pause),
        });
    }
    println!("fake Dify ({mode} app) on {}", dify.url);
    println!("API key: {DIFY_KEY}");
    println!("As an admin in GraphiQL:");
    println!(
        "  mutation {{ createDifyApp(input: {{apiKey: \"{DIFY_KEY}\", apiUrl: \"{}\"}}) {{ id name mode isDefault }} }}",
        dify.url
    );
    tokio::signal::ctrl_c().await.ok();
}
