//! Load benchmark: `cargo bench --bench load [-- ROW …]` (rows: 1 200 1000 4000 8000 raw1 raw20
//! freeze freeze70 neverread logins uploads; default all). Not part of `cargo test`. Results and the machine: docs/PERFORMANCE.md.
//!
//! The gateway is the release binary in its own process, pinned to core 0 (`taskset`), on a
//! fresh database of the local MariaDB (the freeze row's gateway reaches it through a TCP proxy
//! that can stop passing bytes, as a frozen server would look). This process,
//! pinned to core 1, is everything else: a paced Dify-shaped SSE emitter whose deltas carry
//! their send time, N real WebSocket clients running the `chat` subscription, and the direct
//! path (the same stream read straight from the emitter), the floor each row is compared with.
//!
//! Per row it prints: streams completed and stored, per-delta latency (send → receipt) p50/p99
//! direct and through rechat, time to first delta, deltas per second, the gateway's RSS per
//! stream, and MariaDB statements per second (its global `Questions` counter).

#[path = "../tests/integration/harness/proxy.rs"]
#[allow(dead_code)] // the benchmark freezes; it never cuts
mod proxy;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SERVER: &str = "mysql://root@127.0.0.1:3306";
const SUBSCRIPTION: &str = "subscription($input: ChatInput!) { chat(input: $input) { __typename seq \
     ... on AnswerDelta { delta } ... on ChatCompleted { message { status } } \
     ... on ChatFailed { error { code message } } } }";

/// How fast new chats arrive in a row: 8,000 streams are all open after 8 s.
const RAMP_PER_SECOND: f64 = 1000.0;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the benchmark started: the emitter stamps deltas with it, readers
/// subtract. Both sides are this process, so one clock.
fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    streams: usize,
    deltas: usize,
    pause: Duration,
    /// Freeze the database this long, starting 5 s into the row.
    freeze: Option<Duration>,
}

const ROWS: &[Row] = &[
    row("1", 1, 40, 250),
    row("200", 200, 40, 250),
    row("1000", 1000, 40, 250),
    row("4000", 4000, 40, 250),
    row("8000", 8000, 40, 500),
    row("raw1", 1, 2000, 0),
    row("raw20", 20, 2000, 0),
    Row {
        freeze: Some(Duration::from_secs(15)),
        ..row("freeze", 200, 100, 250)
    },
    // Longer than a gateway lease (20 s); every answer ends while the database is frozen, and
    // its final write waits for the thaw.
    Row {
        freeze: Some(Duration::from_secs(70)),
        ..row("freeze70", 200, 200, 250)
    },
    // Five clients that never read a 50 MB answer (its own table; see `never_reading`).
    row("neverread", 5, 51_200, 0),
    // Bursts of sign-ins (see `login_bursts`).
    row("logins", 200, 0, 0),
    // 10 MB uploads (see `uploads`).
    row("uploads", 5, 0, 0),
];

const fn row(name: &'static str, streams: usize, deltas: usize, pause_ms: u64) -> Row {
    Row {
        name,
        streams,
        deltas,
        pause: Duration::from_millis(pause_ms),
        freeze: None,
    }
}

// ---------------------------------------------------------------- the emitter (a paced Dify)

/// `query` is `n=<deltas>;p=<pause ms>[;b=<padding bytes per delta>]`.
fn plan(query: &str) -> (usize, Duration, usize) {
    let mut n = 10;
    let mut pause = 0;
    let mut padding = 0;
    for part in query.split(';') {
        match part.split_once('=') {
            Some(("n", v)) => n = v.parse().unwrap_or(n),
            Some(("p", v)) => pause = v.parse().unwrap_or(pause),
            Some(("b", v)) => padding = v.parse().unwrap_or(padding),
            _ => {}
        }
    }
    (n, Duration::from_millis(pause), padding)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn chat_messages(Json(body): Json<Value>) -> Response {
    let (n, pause, padding) = plan(body["query"].as_str().unwrap_or_default());
    let padding = "x".repeat(padding);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let ids = format!(
        r#""conversation_id":"00000000-0000-4000-8000-{id:012}","message_id":"10000000-0000-4000-8000-{id:012}","task_id":"20000000-0000-4000-8000-{id:012}""#
    );
    let start = tokio::time::Instant::now();
    let frames = futures::stream::unfold(0usize, move |i| {
        let (ids, padding) = (ids.clone(), padding.clone());
        async move {
            if i > n {
                return None;
            }
            if !pause.is_zero() {
                tokio::time::sleep_until(start + pause * i as u32).await;
            } else if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
            let frame = if i < n {
                format!(
                    "data: {{\"event\":\"message\",{ids},\"answer\":\"{} {padding}\",\"created_at\":0}}\n\n",
                    now_ns()
                )
            } else {
                format!(
                    "data: {{\"event\":\"message_end\",{ids},\"metadata\":{{\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{n},\"total_tokens\":{}}}}}}}\n\n",
                    n + 5
                )
            };
            Some((Ok::<_, std::io::Error>(Bytes::from(frame)), i + 1))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(frames))
        .unwrap()
}

/// Reads an upload to the end without keeping it, as Dify's side of the upload row.
async fn drain_upload(body: Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut size = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        size += chunk.len();
    }
    (
        axum::http::StatusCode::CREATED,
        Json(json!({ "id": "30000000-0000-4000-8000-000000000001", "name": "report.txt", "size": size, "extension": "txt", "mime_type": "text/plain" })),
    )
        .into_response()
}

async fn serve_emitter() -> (u16, u16) {
    let router = axum::Router::new()
        .route(
            "/v1/info",
            get(|| async { Json(json!({ "name": "load", "mode": "chat", "tags": [] })) }),
        )
        .route(
            "/v1/parameters",
            get(|| async {
                Json(json!({ "user_input_form": [], "suggested_questions": [],
                    "file_upload": { "enabled": true, "allowed_file_types": ["document"], "allowed_file_upload_methods": ["local_file"], "number_limits": 1 },
                    "system_parameters": { "file_size_limit": 15 } }))
            }),
        )
        .route("/v1/files/upload", post(drain_upload))
        .route("/v1/chat-messages", post(chat_messages));
    let mut ports = Vec::new();
    // Two listeners: the gateway's connections and the direct path's do not share a port's
    // TIME_WAIT space.
    for _ in 0..2 {
        // Dify's own listeners are not the subject: the same backlog as the gateway's.
        let listener = rechat::http::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        ports.push(listener.local_addr().unwrap().port());
        let router = router.clone();
        tokio::spawn(async move { axum::serve(listener, router).await });
    }
    (ports[0], ports[1])
}

// ---------------------------------------------------------------- readers

#[derive(Default)]
struct StreamResult {
    ok: bool,
    deltas: usize,
    latencies_ns: Vec<u64>,
    first_delta: Option<Duration>,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    error: Option<String>,
}

impl StreamResult {
    fn delta(&mut self, text: &str, begin: Instant) {
        let received = now_ns();
        let now = Instant::now();
        if let Ok(sent) = text.trim().parse::<u64>() {
            self.latencies_ns.push(received.saturating_sub(sent));
        }
        self.deltas += 1;
        self.first_delta.get_or_insert(begin.elapsed());
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
    }
}

async fn direct(port: u16, n: usize, pause: Duration, http: reqwest::Client) -> StreamResult {
    let mut result = StreamResult::default();
    let begin = Instant::now();
    let response = http
        .post(format!("http://127.0.0.1:{port}/v1/chat-messages"))
        .json(&json!({ "query": format!("n={n};p={}", pause.as_millis()), "user": "direct" }))
        .send()
        .await;
    let Ok(response) = response else {
        result.error = Some("direct request failed".into());
        return result;
    };
    let mut body = response.bytes_stream();
    let mut decoder = rechat::dify::sse::Decoder::new();
    let mut frames = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        decoder.push(&chunk, &mut frames);
        for frame in frames.drain(..) {
            let rechat::dify::sse::Frame::Data { data, .. } = frame else {
                continue;
            };
            match rechat::dify::events::decode(&data).map(|e| e.event) {
                Ok(rechat::dify::events::Event::AnswerDelta(text)) => result.delta(&text, begin),
                Ok(rechat::dify::events::Event::MessageEnd { .. }) => result.ok = true,
                _ => {}
            }
        }
    }
    result.ok &= result.deltas == n;
    result
}

async fn through_gateway(
    gateway: u16,
    token: String,
    n: usize,
    pause: Duration,
    connecting: std::sync::Arc<tokio::sync::Semaphore>,
) -> StreamResult {
    let mut result = StreamResult::default();
    let permit = connecting.acquire_owned().await.unwrap();
    let mut socket = match open_socket(gateway, &token).await {
        Ok(socket) => socket,
        Err(error) => {
            result.error = Some(error);
            return result;
        }
    };
    let begin = Instant::now();
    subscribe(&mut socket, &format!("n={n};p={}", pause.as_millis())).await;
    drop(permit);
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        // Deltas are nearly every message: read them without building a JSON tree, so that the
        // driver's core, shared with the emitter, is not what the row measures.
        if let Ok(delta) = serde_json::from_str::<DeltaMessage>(&text) {
            result.delta(&delta.payload.data.chat.delta, begin);
            continue;
        }
        let message: Value = serde_json::from_str(&text).unwrap_or_default();
        match message["type"].as_str() {
            Some("next") => {
                let event = &message["payload"]["data"]["chat"];
                match event["__typename"].as_str() {
                    Some("AnswerDelta") => result.delta(event["delta"].as_str().unwrap(), begin),
                    Some("ChatCompleted") => {
                        result.ok = event["message"]["status"] == "COMPLETED";
                    }
                    Some("ChatFailed") => result.error = Some(event["error"].to_string()),
                    None => result.error = Some(message["payload"].to_string()),
                    _ => {}
                }
            }
            Some("error") => {
                result.error = Some(message["payload"].to_string());
                break;
            }
            Some("complete") => break,
            _ => {}
        }
    }
    let _ = socket.close(None).await;
    if result.ok && result.deltas != n {
        result.error = Some(format!("{} of {n} deltas arrived", result.deltas));
    }
    result.ok &= result.deltas == n;
    result
}

/// A `next` message carrying an `AnswerDelta` (which alone has a `delta` field).
#[derive(serde::Deserialize)]
struct DeltaMessage<'a> {
    #[serde(borrow)]
    payload: DeltaPayload<'a>,
}

#[derive(serde::Deserialize)]
struct DeltaPayload<'a> {
    #[serde(borrow)]
    data: DeltaData<'a>,
}

#[derive(serde::Deserialize)]
struct DeltaData<'a> {
    #[serde(borrow)]
    chat: DeltaEvent<'a>,
}

#[derive(serde::Deserialize)]
struct DeltaEvent<'a> {
    #[serde(borrow)]
    delta: std::borrow::Cow<'a, str>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A signed-in graphql-transport-ws socket.
async fn open_socket(gateway: u16, token: &str) -> Result<Socket, String> {
    let mut request = format!("ws://127.0.0.1:{gateway}/graphql")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await else {
        return Err("connect failed".into());
    };
    let init = json!({ "type": "connection_init", "payload": { "Authorization": format!("Bearer {token}") } });
    socket
        .send(Message::Text(init.to_string().into()))
        .await
        .unwrap();
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("connection_ack") => return Ok(socket),
            Some(Ok(_)) => continue,
            _ => return Err("no connection_ack".into()),
        }
    }
}

/// Starts a chat whose query is the emitter's plan.
async fn subscribe(socket: &mut Socket, plan: &str) {
    let subscribe = json!({ "id": "1", "type": "subscribe", "payload": { "query": SUBSCRIPTION,
        "variables": { "input": { "query": plan } } } });
    socket
        .send(Message::Text(subscribe.to_string().into()))
        .await
        .unwrap();
}

/// Five clients in a row, each starting a 50 MB answer and never reading it: the gateway's RSS
/// over idle while each answer runs, and after each client left.
async fn never_reading(gateway: &Gateway) {
    let pid = gateway.child.id();
    let idle = rss_kib(pid);
    println!(
        "\nnever-reading clients, one after another (idle RSS {:.1} MiB):",
        idle as f64 / 1024.0
    );
    println!("| client | answer | peak RSS over idle MiB | RSS after it left, over idle |");
    println!("|---|---|---|---|");
    for client in 1..=5 {
        let mut socket = open_socket(gateway.port, &gateway.token).await.unwrap();
        // 51,200 deltas of 1 KiB, unpaced: 50 MiB.
        subscribe(&mut socket, "n=51200;p=0;b=1000").await;
        let mut peak = idle;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        while started.elapsed() < Duration::from_secs(120) {
            peak = peak.max(rss_kib(pid));
            let active = scrape(gateway.port).await;
            if active.get("rechat_active_streams").copied().unwrap_or(0.0) == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(socket);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid);
        println!(
            "| {client} | ended in {:.1} s | {:+.1} | {:+.1} MiB ({:+.0} %) |",
            started.elapsed().as_secs_f64(),
            peak.saturating_sub(idle) as f64 / 1024.0,
            (after as f64 - idle as f64) / 1024.0,
            100.0 * (after as f64 - idle as f64) / idle as f64,
        );
    }
}

/// Bursts of 200 sign-ins (50 at a time; argon2id, 19 MiB each): the gateway's RSS during each
/// burst and 5 s after it.
async fn login_bursts(gateway: &Gateway) {
    let pid = gateway.child.id();
    let idle = rss_kib(pid);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/graphql", gateway.port);
    println!(
        "\nsign-in bursts (idle RSS {:.1} MiB):",
        idle as f64 / 1024.0
    );
    println!("| burst | took | peak RSS over idle MiB | RSS 5 s later, over idle |");
    println!("|---|---|---|---|");
    for burst in 1..=3 {
        let started = Instant::now();
        let peak = std::sync::Arc::new(AtomicU64::new(idle));
        let sampler = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        let attempts = futures::stream::iter(0..200)
            .map(|i| {
                let request = http.post(&url).json(&json!({
                    "query": "mutation($i: LoginInput!) { login(input: $i) { token } }",
                    "variables": { "i": { "email": format!("nobody{burst}x{i}@example.com"), "password": "not the password" } },
                }));
                async move { request.send().await.map(|r| r.status()) }
            })
            .buffer_unordered(50)
            .collect::<Vec<_>>()
            .await;
        sampler.abort();
        assert!(
            attempts
                .iter()
                .all(|a| a.as_ref().is_ok_and(|s| s.is_success()))
        );
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = rss_kib(pid);
        println!(
            "| {burst} | {:.1} s | {:+.1} | {:+.1} MiB |",
            took.as_secs_f64(),
            AtomicU64::load(&peak, Ordering::Relaxed).saturating_sub(idle) as f64 / 1024.0,
            (after as f64 - idle as f64) / 1024.0,
        );
    }
}

/// Five uploads of 10 MB in a row through the gateway (streamed on to the emitter): the
/// gateway's RSS over idle during each and after it.
async fn uploads(gateway: &Gateway) {
    let pid = gateway.child.id();
    let idle = rss_kib(pid);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/graphql", gateway.port);
    let file = vec![b'x'; 10 * 1024 * 1024];
    println!(
        "\n10 MB uploads, one after another (idle RSS {:.1} MiB):",
        idle as f64 / 1024.0
    );
    println!("| upload | took | peak RSS over idle MiB | RSS after it, over idle |");
    println!("|---|---|---|---|");
    for n in 1..=5 {
        let started = Instant::now();
        let peak = std::sync::Arc::new(AtomicU64::new(idle));
        let sampler = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        let operations = json!({ "query": "mutation($f: Upload!) { uploadFile(file: $f) { id size } }", "variables": { "f": null } });
        let form = reqwest::multipart::Form::new()
            .text("operations", operations.to_string())
            .text("map", json!({ "0": ["variables.f"] }).to_string())
            .part(
                "0",
                reqwest::multipart::Part::bytes(file.clone())
                    .file_name("report.txt")
                    .mime_str("text/plain")
                    .unwrap(),
            );
        let answer: Value = http
            .post(&url)
            .bearer_auth(&gateway.token)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        sampler.abort();
        // The emitter counts the whole multipart body it received: the file and its framing.
        let size = answer["data"]["uploadFile"]["size"].as_u64().unwrap_or(0);
        assert!(size >= 10 * 1024 * 1024, "{answer}");
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "| {n} | {:.2} s | {:+.1} | {:+.1} MiB |",
            took.as_secs_f64(),
            AtomicU64::load(&peak, Ordering::Relaxed).saturating_sub(idle) as f64 / 1024.0,
            (rss_kib(pid) as f64 - idle as f64) / 1024.0,
        );
    }
}

// ---------------------------------------------------------------- measurements

struct Summary {
    ok: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    first_delta_p50_ms: f64,
    deltas_per_s: f64,
    first_error: Option<String>,
}

/// How late the driver's own timers fire (a 10 ms sleep, over and over): when its one core is
/// saturated, deltas wait in the driver too, and a row's latency is partly the driver's.
struct LagProbe(
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
);

impl LagProbe {
    fn start() -> Self {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let samples = samples.clone();
            async move {
                loop {
                    let asked = Instant::now() + Duration::from_millis(10);
                    tokio::time::sleep_until(asked.into()).await;
                    let late = Instant::now().saturating_duration_since(asked);
                    samples.lock().unwrap().push(late.as_nanos() as u64);
                }
            }
        });
        Self(task, samples)
    }

    /// The lags seen, sorted (nanoseconds).
    fn stop(self) -> Vec<u64> {
        self.0.abort();
        let mut samples = std::mem::take(&mut *self.1.lock().unwrap());
        samples.sort_unstable();
        samples
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1e6
}

fn summarise(results: &[StreamResult]) -> Summary {
    let mut latencies: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    latencies.sort_unstable();
    let mut firsts: Vec<u64> = results
        .iter()
        .filter_map(|r| r.first_delta.map(|d| d.as_nanos() as u64))
        .collect();
    firsts.sort_unstable();
    let first = results.iter().filter_map(|r| r.first_at).min();
    let last = results.iter().filter_map(|r| r.last_at).max();
    let deltas: usize = results.iter().map(|r| r.deltas).sum();
    let span = match (first, last) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    Summary {
        ok: results.iter().filter(|r| r.ok).count(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().map_or(f64::NAN, |l| *l as f64 / 1e6),
        first_delta_p50_ms: percentile(&firsts, 0.5),
        deltas_per_s: deltas as f64 / span,
        first_error: results.iter().find_map(|r| r.error.clone()),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time the process has used (user and system, all threads).
fn cpu_time(pid: u32) -> Duration {
    static TICKS_PER_SECOND: std::sync::LazyLock<f64> = std::sync::LazyLock::new(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let ticks: u64 = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // After the command name (in parentheses, which may hold spaces): utime and stime
            // are the 12th and 13th fields.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / *TICKS_PER_SECOND)
}

async fn questions(conn: &mut AsyncMysqlConnection) -> u64 {
    #[derive(diesel::QueryableByName)]
    struct Status {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "Value")]
        value: String,
    }
    let rows: Vec<Status> = diesel::sql_query("SHOW GLOBAL STATUS LIKE 'Questions'")
        .load(conn)
        .await
        .unwrap();
    rows[0].value.parse().unwrap()
}

/// The gateway's metrics without labels, by name.
async fn scrape(port: u16) -> std::collections::HashMap<String, f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------- the run

struct Gateway {
    child: std::process::Child,
    port: u16,
    token: String,
}

async fn start_gateway(database_url: &str, emitter_port: u16) -> Gateway {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let child = std::process::Command::new("taskset")
        .args(["-c", "0", env!("CARGO_BIN_EXE_rechat")])
        .env("DATABASE_URL", database_url)
        .env("SECRET_KEY", "load-benchmark-secret-key-0123456789abcdef")
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("RUST_LOG", "warn")
        // One account drives every stream: lift the per-user limits.
        .env("MAX_ACTIVE_ANSWERS_PER_USER", "1000000")
        .env("CHAT_TURNS_PER_MINUTE", "1000000")
        .env("AUTH_ATTEMPTS_PER_MINUTE_PER_ADDRESS", "1000000")
        .env("UPLOADS_PER_MINUTE", "1000000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting the gateway (taskset and the release binary)");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gql = |query: &str, variables: Value, token: Option<&str>| {
        let mut request = http
            .post(format!("{url}/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let registered = gql(
        "mutation($i: RegisterInput!) { register(input: $i) { token } }",
        json!({ "i": { "email": "load@example.com", "password": "load benchmark password" } }),
        None,
    )
    .await;
    let token = registered["data"]["register"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("register: {registered}"))
        .to_owned();
    let configured = gql(
        "mutation($i: DifyConfigInput!) { setDifyConfig(input: $i) { isConfigured } }",
        json!({ "i": { "apiKey": "app-loadBenchmarkKey0123456789", "apiUrl": format!("http://127.0.0.1:{emitter_port}/v1") } }),
        Some(&token),
    )
    .await;
    assert_eq!(
        configured["data"]["setDifyConfig"]["isConfigured"], true,
        "{configured}"
    );
    Gateway { child, port, token }
}

fn pin_this_process_to_core_1() {
    let _ = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status();
}

fn main() {
    now_ns();
    pin_this_process_to_core_1();
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rows: Vec<Row> = ROWS
        .iter()
        .copied()
        .filter(|r| wanted.is_empty() || wanted.iter().any(|w| w == r.name))
        .collect();
    let settle = std::env::var("LOAD_SETTLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60u64);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(rows, Duration::from_secs(settle)));
}

async fn run(rows: Vec<Row>, settle: Duration) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut admin = AsyncMysqlConnection::establish(SERVER).await.unwrap();
    let (gateway_side, direct_side) = serve_emitter().await;
    // The gateway of the ordinary rows reaches MariaDB as in production; the freeze row's
    // gateway goes through the proxy, whose forwarding would otherwise cost the driver's core.
    let main_db = format!("rechat_bench_{stamp}");
    let mut main = start_gateway(&format!("{SERVER}/{main_db}"), gateway_side).await;
    let proxy = proxy::FreezableProxy::start("127.0.0.1:3306".into()).await;
    let frozen_db = format!("rechat_bench_{stamp}_freeze");
    let mut frozen = None;
    let idle_kib = rss_kib(main.child.id());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    println!(
        "gateway idle RSS {:.1} MiB; rows: {}\n",
        idle_kib as f64 / 1024.0,
        rows.iter().map(|r| r.name).collect::<Vec<_>>().join(" ")
    );
    println!(
        "| row | streams × deltas, pause | ok | direct p50 / p99 ms | rechat p50 / p99 / max ms | added p99 ms | first delta p50 ms direct / rechat | deltas/s direct / rechat | RSS before → peak MiB | KiB / stream | DB statements/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        if row.name == "neverread" {
            never_reading(&main).await;
            continue;
        }
        if row.name == "logins" {
            login_bursts(&main).await;
            continue;
        }
        if row.name == "uploads" {
            uploads(&main).await;
            continue;
        }
        let gateway = if row.freeze.is_some() {
            if frozen.is_none() {
                let url = format!(
                    "mysql://root@127.0.0.1:{}/{frozen_db}?prefer_socket=false",
                    proxy.addr.port()
                );
                frozen = Some(start_gateway(&url, gateway_side).await);
            }
            frozen.as_ref().unwrap()
        } else {
            &main
        };
        let pid = gateway.child.id();
        let n = row.deltas;
        // The floor: the same streams read straight from the emitter.
        let direct_lag = LagProbe::start();
        let direct_results = futures::future::join_all((0..row.streams).map(|i| {
            let arrival = Duration::from_secs_f64(i as f64 / RAMP_PER_SECOND);
            let stream = direct(direct_side, n, row.pause, http.clone());
            async move {
                tokio::time::sleep(arrival).await;
                stream.await
            }
        }))
        .await;
        let floor = summarise(&direct_results);
        let direct_lag = direct_lag.stop();
        drop(direct_results);

        let before_kib = rss_kib(pid);
        let peak = std::sync::Arc::new(AtomicU64::new(before_kib));
        let sampler = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let freeze = async {
            if let Some(freeze) = row.freeze {
                tokio::time::sleep(Duration::from_secs(5)).await;
                proxy.freeze();
                tokio::time::sleep(freeze).await;
                proxy.thaw();
            }
        };
        let questions_before = questions(&mut admin).await;
        let metrics_before = scrape(gateway.port).await;
        let started = Instant::now();
        let cpu_before = cpu_time(pid);
        let connecting = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
        let lag = LagProbe::start();
        // New chats arrive at RAMP_PER_SECOND, not all in the same millisecond.
        let streams = futures::future::join_all((0..row.streams).map(|i| {
            let arrival = Duration::from_secs_f64(i as f64 / RAMP_PER_SECOND);
            let stream = through_gateway(
                gateway.port,
                gateway.token.clone(),
                n,
                row.pause,
                connecting.clone(),
            );
            async move {
                tokio::time::sleep(arrival).await;
                stream.await
            }
        }));
        let (results, ()) = tokio::join!(streams, freeze);
        let cpu = cpu_time(pid).saturating_sub(cpu_before);
        let lag = lag.stop();
        report(
            row,
            &floor,
            &results,
            before_kib,
            &peak,
            questions(&mut admin).await - questions_before,
            started.elapsed(),
        );
        let metrics_after = scrape(gateway.port).await;
        let delta = |name: &str| {
            metrics_after.get(name).unwrap_or(&0.0) - metrics_before.get(name).unwrap_or(&0.0)
        };
        let mean_ms = |name: &str| {
            1e3 * delta(&format!("{name}_sum")) / delta(&format!("{name}_count")).max(1.0)
        };
        println!(
            "  gateway: CPU {:.2} s ({:.1} µs per delta, start-up included), writer {:.0} statements ({:.1}/s), mean pool wait {:.2} ms, mean turn start {:.2} ms ({:.1} first turns per save), mean Dify first event {:.2} ms, mean relay {:.3} ms",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / (row.streams * n) as f64,
            delta("rechat_writer_statements_total"),
            delta("rechat_writer_statements_total") / started.elapsed().as_secs_f64(),
            mean_ms("rechat_pool_wait_seconds"),
            mean_ms("rechat_turn_start_seconds"),
            delta("rechat_turn_save_batch_sum") / delta("rechat_turn_save_batch_count").max(1.0),
            mean_ms("rechat_dify_first_event_seconds"),
            mean_ms("rechat_relay_seconds"),
        );
        println!(
            "  driver (emitter and clients, one core): lag p99 {:.1} ms (max {:.0}) during the direct streams, {:.1} ms (max {:.0}) during rechat's",
            percentile(&direct_lag, 0.99),
            percentile(&direct_lag, 1.0),
            percentile(&lag, 0.99),
            percentile(&lag, 1.0),
        );
        sampler.abort();
        // Let the final writes land and sockets close before the next row.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let after_kib = rss_kib(main.child.id());
    tokio::time::sleep(settle).await;
    let settled_kib = rss_kib(main.child.id());
    println!(
        "\ngateway RSS: idle {:.1} MiB, right after the rows {:.1} MiB, {} s later {:.1} MiB",
        idle_kib as f64 / 1024.0,
        after_kib as f64 / 1024.0,
        settle.as_secs(),
        settled_kib as f64 / 1024.0
    );
    for (database, gateway) in [(&main_db, Some(&mut main)), (&frozen_db, frozen.as_mut())] {
        let Some(gateway) = gateway else {
            continue;
        };
        let stored: Vec<StoredCount> = diesel::sql_query(format!(
            "SELECT status, CAST(COUNT(*) AS CHAR) AS n FROM `{database}`.messages WHERE role = 'ASSISTANT' GROUP BY status"
        ))
        .load(&mut admin)
        .await
        .unwrap();
        println!(
            "stored answers in {database}: {}",
            stored
                .iter()
                .map(|s| format!("{} {}", s.status, s.n))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // SIGTERM: the gateway ends cleanly (and a `dhat-heap` build writes its profile).
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &gateway.child.id().to_string()])
            .status();
        let _ = gateway.child.wait();
        diesel::sql_query(format!("DROP DATABASE `{database}`"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

#[derive(diesel::QueryableByName)]
struct StoredCount {
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    n: String,
}

fn report(
    row: Row,
    floor: &Summary,
    results: &[StreamResult],
    before_kib: u64,
    peak: &AtomicU64,
    statements: u64,
    took: Duration,
) {
    let through = summarise(results);
    let peak_kib = peak.load(Ordering::Relaxed);
    println!(
        "| {} | {} × {}, {} ms | {}/{} | {:.2} / {:.2} | {:.2} / {:.2} / {:.0} | {:+.2} | {:.1} / {:.1} | {:.0} / {:.0} | {:.0} → {:.0} | {:.1} | {:.0} |",
        row.name,
        row.streams,
        row.deltas,
        row.pause.as_millis(),
        through.ok,
        row.streams,
        floor.p50_ms,
        floor.p99_ms,
        through.p50_ms,
        through.p99_ms,
        through.max_ms,
        through.p99_ms - floor.p99_ms,
        floor.first_delta_p50_ms,
        through.first_delta_p50_ms,
        floor.deltas_per_s,
        through.deltas_per_s,
        before_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        peak_kib.saturating_sub(before_kib) as f64 / row.streams as f64,
        statements as f64 / took.as_secs_f64(),
    );
    if let Some(error) = through.first_error.or(floor.first_error.clone()) {
        println!("  first error: {error}");
    }
}
