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

/// The Redis database index the tests use; each test keeps to its own key prefix.
const REDIS_URL: &str = "redis://127.0.0.1:6379/9";

/// Points a gateway at the tests' Redis under `prefix`.
fn with_redis(config: &mut rechat::Config, prefix: &str) {
    config.redis_url = Some(REDIS_URL.to_owned().into());
    config.redis_prefix = prefix.to_owned();
}

/// A second gateway in this process, on `a`'s database, fake Dify and Redis prefix.
struct Peer {
    app: rechat::App,
    addr: SocketAddr,
}

impl Peer {
    async fn start(a: &TestApp) -> Self {
        let mut config = rechat::Config::for_tests(&a.db.url(), &a.dify.url);
        config.redis_url = a.app.config.redis_url.clone();
        config.redis_prefix = a.app.config.redis_prefix.clone();
        config.chat_turns_per_minute = a.app.config.chat_turns_per_minute;
        config.max_active_answers_per_user = a.app.config.max_active_answers_per_user;
        config.gateway_lease = a.app.config.gateway_lease;
        config.auth_attempts_per_minute_per_address =
            a.app.config.auth_attempts_per_minute_per_address;
        let app = rechat::App::build(config).await.expect("gateway B");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(rechat::http::serve(
            listener,
            app.clone(),
            std::future::pending(),
        ));
        Self { app, addr }
    }

    async fn gql(&self, a: &TestApp, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request = a
            .http
            .post(format!("http://{}/graphql", self.addr))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().json().await.unwrap()
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
        .expect("connection_ack from B")
    }
}

/// Waits until both gateways talk to Redis and listen for each other's signals.
async fn wait_for_redis(a: &TestApp, b: &Peer) {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}:signals", a.app.config.redis_prefix);
    for _ in 0..100 {
        let (_, listeners): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async::<Vec<(String, i64)>>(&mut connection)
            .await
            .unwrap()
            .remove(0);
        let connected = a.app.shared.ping().await && b.app.shared.ping().await;
        if listeners >= 2 && connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateways never reached Redis");
}

/// Deletes what a test left under its prefix.
async fn clean_redis(prefix: &str) {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<i64>(&mut connection)
            .await
            .unwrap();
    }
}

fn prefix() -> String {
    format!("rechat-test-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_hold_across_gateways_through_redis() {
    let prefix = prefix();
    let a = TestApp::spawn_with(|c| {
        with_redis(c, &prefix);
        c.chat_turns_per_minute = 2;
        c.auth_attempts_per_minute_per_address = 6;
    })
    .await;
    let b = Peer::start(&a).await;
    wait_for_redis(&a, &b).await;
    // Two registrations on A count against the address.
    let (admin, user) = a.admin_and_user().await;
    a.configure_dify(&admin, "chat").await;
    const LOGIN: &str = "mutation($i: LoginInput!) { login(input: $i) { token } }";
    let wrong = json!({ "i": { "email": "nobody@example.com", "password": "wrong password" } });
    for _ in 0..2 {
        let on_a = a.gql(None, LOGIN, wrong.clone()).await;
        assert_eq!(error_code(&on_a), "UNAUTHENTICATED", "{on_a}");
        let on_b = b.gql(&a, None, LOGIN, wrong.clone()).await;
        assert_eq!(error_code(&on_b), "UNAUTHENTICATED", "{on_b}");
    }
    let refused = b.gql(&a, None, LOGIN, wrong).await;
    assert_eq!(
        error_code(&refused),
        "RATE_LIMITED",
        "six attempts from one address in all"
    );

    // Turns: one on each gateway, the third refused on either.
    for ws in [user.ws(TRANSPORT_WS).await, b.ws(&user).await] {
        let mut ws = ws;
        ws.subscribe(CHAT, json!({ "input": { "query": "q" } }))
            .await;
        ws.collect().await.expect("a turn");
    }
    let mut third = b.ws(&user).await;
    third
        .subscribe(CHAT, json!({ "input": { "query": "q" } }))
        .await;
    assert_eq!(
        error_code(&third.collect().await.expect_err("limited")),
        "RATE_LIMITED"
    );
    clean_redis(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_and_admin_changes_reach_the_other_gateway_at_once() {
    let prefix = prefix();
    let a = TestApp::spawn_with(|c| with_redis(c, &prefix)).await;
    let b = Peer::start(&a).await;
    wait_for_redis(&a, &b).await;
    let (admin, user) = a.admin_and_user().await;
    a.configure_dify(&admin, "chat").await;

    // An answer relayed by A, stopped from B.
    a.dify.push(Script::Long {
        deltas: 10_000,
        pause: Duration::from_millis(20),
    });
    let mut on_a = user.ws(TRANSPORT_WS).await;
    on_a.subscribe(CHAT, json!({ "input": { "query": "long" } }))
        .await;
    let started = first_event(&mut on_a).await;
    let id = started["messageId"].as_str().unwrap().to_owned();
    a.dify.wait_for_requests("/chat-messages", 1).await;
    let asked = Instant::now();
    let stopped = b
        .gql(
            &a,
            user.token.as_deref(),
            "mutation($id: ID!) { stopChat(messageId: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        stopped["data"]["stopChat"]["status"], "STOPPED",
        "{stopped}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(a.dify.requests_to("/stop").len(), 1, "Dify is told once");
    let mut last = Value::Null;
    while let OpMessage::Next(payload) = on_a.next_op().await {
        last = payload["data"]["chat"].clone();
    }
    assert_eq!(last["message"]["status"], "STOPPED", "{last}");

    // An app disabled through B is unavailable on A at once (its cache would keep it 5 s).
    let apps = a
        .gql(admin.token.as_deref(), "{ apps { id } }", json!({}))
        .await;
    let app_id = apps["data"]["apps"][0]["id"].as_str().unwrap().to_owned();
    let changed = b
        .gql(
            &a,
            admin.token.as_deref(),
            "mutation($id: ID!) { updateDifyApp(id: $id, input: { isEnabled: false }) { isEnabled } }",
            json!({ "id": app_id }),
        )
        .await;
    assert_eq!(
        changed["data"]["updateDifyApp"]["isEnabled"], false,
        "{changed}"
    );
    let mut turn = user.ws(TRANSPORT_WS).await;
    turn.subscribe(CHAT, json!({ "input": { "query": "q" } }))
        .await;
    let refused = turn.collect().await.expect_err("the app is disabled");
    assert_eq!(error_code(&refused), "APP_UNAVAILABLE");
    clean_redis(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_whose_redis_is_away_works_on_its_own() {
    // Nothing listens on port 1: every shared feature falls back to this process.
    let a = TestApp::spawn_with(|c| {
        c.redis_url = Some("redis://127.0.0.1:1/0".to_owned().into());
        c.chat_turns_per_minute = 1;
    })
    .await;
    let (admin, user) = a.admin_and_user().await;
    a.configure_dify(&admin, "chat").await;
    let events = crate::chat::chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    assert_eq!(events.last().unwrap()["message"]["status"], "COMPLETED");
    let mut second = user.ws(TRANSPORT_WS).await;
    second
        .subscribe(CHAT, json!({ "input": { "query": "q" } }))
        .await;
    assert_eq!(
        error_code(&second.collect().await.expect_err("limited here")),
        "RATE_LIMITED"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_relayed_by_one_gateway_resumes_on_the_other_without_a_gap() {
    let prefix = prefix();
    let a = TestApp::spawn_with(|c| with_redis(c, &prefix)).await;
    let b = Peer::start(&a).await;
    wait_for_redis(&a, &b).await;
    let (admin, user) = a.admin_and_user().await;
    a.configure_dify(&admin, "chat").await;
    a.dify.push(Script::Long {
        deltas: 150,
        pause: Duration::from_millis(10),
    });
    const WORDS: fn(usize) -> String = |n| (0..n).map(|i| format!("word{i} ")).collect();
    let input = json!({ "query": "long", "clientMessageId": "across" });
    let mut on_a = user.ws(TRANSPORT_WS).await;
    on_a.subscribe(CHAT, json!({ "input": input })).await;
    let mut head = Vec::new();
    for _ in 0..8 {
        head.push(first_event(&mut on_a).await);
    }
    drop(on_a);
    let id = head[0]["messageId"].as_str().unwrap().to_owned();

    // The page reconnects to B and resumes after the 8th event.
    let mut on_b = b.ws(&user).await;
    on_b.subscribe(crate::resume::RESUME_ALL, json!({ "id": id, "after": 8 }))
        .await;
    let mut tail = Vec::new();
    while let OpMessage::Next(payload) = on_b.next_op().await {
        tail.push(payload["data"]["resumeChat"].clone());
    }
    assert_eq!(tail[0]["seq"], 9, "{:?}", tail.first());
    let events: Vec<Value> = head.into_iter().chain(tail).collect();
    crate::chat::check_shape(&events);
    assert_eq!(crate::chat::answer_of(&events), WORDS(150));
    let metrics = reqwest::get(format!("http://{}/metrics", b.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rechat_resumes_total{from=\"mirror\"} 1"),
        "{metrics}"
    );

    // The same send retried on B once the answer ended: the same turn, nothing new.
    let mut retry = b.ws(&user).await;
    retry.subscribe(CHAT, json!({ "input": input })).await;
    let again = retry.collect().await.expect("replayed");
    assert_eq!(
        again.last().unwrap()["data"]["chat"]["messageId"],
        id.as_str()
    );
    assert_eq!(a.dify.requests_to("/chat-messages").len(), 1);
    clean_redis(&prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_answers_are_counted_across_gateways_and_a_dead_ones_are_dropped() {
    // A place left by a gateway that died (its presence key is gone) does not count.
    let prefix = prefix();
    let a = TestApp::spawn_with(|c| {
        with_redis(c, &prefix);
        c.max_active_answers_per_user = 1;
        c.gateway_lease = LEASE;
    })
    .await;
    let b = Peer::start(&a).await;
    wait_for_redis(&a, &b).await;
    let (admin, user) = a.admin_and_user().await;
    a.configure_dify(&admin, "chat").await;
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("ZADD")
        .arg(format!("{prefix}:active:{}", user.id))
        .arg(0)
        .arg("0190a4e2-0000-7000-8000-000000000000/left-behind")
        .query_async::<i64>(&mut connection)
        .await
        .unwrap();
    a.dify.push(Script::Long {
        deltas: 10_000,
        pause: Duration::from_millis(20),
    });
    let mut on_a = user.ws(TRANSPORT_WS).await;
    on_a.subscribe(CHAT, json!({ "input": { "query": "long" } }))
        .await;
    let started = first_event(&mut on_a).await;
    assert_eq!(started["__typename"], "ChatStarted", "{started}");
    let id = started["messageId"].as_str().unwrap().to_owned();

    const USAGE: &str = "{ me { usage { activeAnswers } } }";
    let usage = b.gql(&a, user.token.as_deref(), USAGE, json!({})).await;
    assert_eq!(usage["data"]["me"]["usage"]["activeAnswers"], 1, "{usage}");
    let mut on_b = b.ws(&user).await;
    on_b.subscribe(CHAT, json!({ "input": { "query": "another" } }))
        .await;
    let refused = on_b
        .collect()
        .await
        .expect_err("one answer at a time, on any gateway");
    assert_eq!(error_code(&refused), "LIMIT_EXCEEDED");

    // Once the answer on A ends, B takes a turn.
    user.gql(
        "mutation($id: ID!) { stopChat(messageId: $id) { status } }",
        json!({ "id": id }),
    )
    .await;
    let mut turn = None;
    for _ in 0..50 {
        let mut on_b = b.ws(&user).await;
        on_b.subscribe(CHAT, json!({ "input": { "query": "now" } }))
            .await;
        match on_b.collect().await {
            Ok(events) => {
                turn = Some(events);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(turn.is_some(), "the slot was given back");
    clean_redis(&prefix).await;
}

/// A Redis server of the test's own, on a free port, that the test can stop and start again.
struct OwnRedis {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let mut redis = Self { port, child: None };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn restart(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start");
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    async fn keys(&self) -> Vec<String> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_go_on_while_redis_is_away_and_sharing_comes_back_with_it() {
    let mut own = OwnRedis::start().await;
    let url = own.url();
    let a = TestApp::spawn_with(|c| c.redis_url = Some(url.into())).await;
    while !a.app.shared.ping().await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (admin, user) = a.admin_and_user().await;
    a.configure_dify(&admin, "chat").await;
    let turns_key = |keys: &[String]| keys.iter().any(|k| k.contains(":limit:turns:"));
    let events = crate::chat::chat(&user, TRANSPORT_WS, json!({ "query": "one" })).await;
    assert_eq!(events.last().unwrap()["message"]["status"], "COMPLETED");
    assert!(turns_key(&own.keys().await), "counted in Redis");

    // Redis goes away mid-answer: the answer streams on and is stored; new turns are counted here.
    a.dify.push(Script::Long {
        deltas: 100,
        pause: Duration::from_millis(10),
    });
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "two" } }))
        .await;
    first_event(&mut ws).await;
    own.stop().await;
    let mut last = Value::Null;
    while let OpMessage::Next(payload) = ws.next_op().await {
        last = payload["data"]["chat"].clone();
    }
    assert_eq!(last["message"]["status"], "COMPLETED", "{last}");
    let events = crate::chat::chat(&user, TRANSPORT_WS, json!({ "query": "three" })).await;
    assert_eq!(events.last().unwrap()["message"]["status"], "COMPLETED");

    // Redis is back (empty): the next turns are counted there again.
    own.restart().await;
    let mut shared_again = false;
    for _ in 0..50 {
        crate::chat::chat(&user, TRANSPORT_WS, json!({ "query": "again" })).await;
        if turns_key(&own.keys().await) {
            shared_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shared_again, "limits are counted in Redis again");
    own.stop().await;
}
