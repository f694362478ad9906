//! Limits per user and per connection, and token quotas: each refused with its code before
//! anything is saved or sent to Dify.

use std::time::Duration;

use rechat::Config;
use serde_json::{Value, json};

use crate::chat::{CHAT, chat};
use crate::harness::fake_dify::Script;
use crate::harness::ws::{TRANSPORT_WS, WsClient};
use crate::harness::{Actor, TestApp, error_code};

async fn setup_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let app = TestApp::spawn_with(adjust).await;
    let admin = app.register("admin@example.com").await;
    app.configure_dify(&admin, "chat").await;
    app
}

async fn admin(app: &TestApp) -> Actor<'_> {
    let answer = app
        .gql(
            None,
            "mutation { login(input: { email: \"admin@example.com\", password: \"correct horse battery\" }) { token user { id } } }",
            json!({}),
        )
        .await;
    Actor {
        app,
        token: Some(
            answer["data"]["login"]["token"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
        id: answer["data"]["login"]["user"]["id"]
            .as_str()
            .unwrap()
            .to_owned(),
    }
}

async fn stored_messages(app: &TestApp) -> usize {
    app.sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages")
        .await[0]
        .parse()
        .unwrap()
}

/// Starts a chat on the socket and waits for its `ChatStarted`.
async fn start_long_chat(app: &TestApp, ws: &mut WsClient, id: &str) {
    app.dify.push(Script::Long {
        deltas: 2000,
        pause: Duration::from_millis(10),
    });
    ws.send(json!({ "id": id, "type": "subscribe", "payload": { "query": CHAT, "variables": { "input": { "query": "go on" } } } }))
        .await;
    loop {
        let message = ws.recv().await.expect("open").expect("not closed");
        if message["id"] == id && message["type"] == "next" {
            let event = &message["payload"]["data"]["chat"];
            assert_eq!(event["__typename"], "ChatStarted", "{message}");
            return;
        }
    }
}

/// The refusal of the operation `id` (its errors), skipping other operations' events.
async fn refusal(ws: &mut WsClient, id: &str) -> Value {
    loop {
        let message = ws.recv().await.expect("open").expect("not closed");
        if message["id"] == id {
            assert_eq!(message["type"], "next", "{message}");
            assert!(message["payload"]["data"].is_null(), "{message}");
            return message["payload"]["errors"][0].clone();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_may_have_three_answers_streaming() {
    let app = setup_with(|_| {}).await;
    let user = app.register("user@example.com").await;
    let mut ws = user.ws(TRANSPORT_WS).await;
    for id in ["a", "b", "c"] {
        start_long_chat(&app, &mut ws, id).await;
    }
    let (messages, calls) = (
        stored_messages(&app).await,
        app.dify.wait_for_requests("/chat-messages", 3).await,
    );
    assert_eq!(calls, 3);
    ws.send(json!({ "id": "d", "type": "subscribe", "payload": { "query": CHAT, "variables": { "input": { "query": "one more" } } } }))
        .await;
    let error = refusal(&mut ws, "d").await;
    assert_eq!(error["extensions"]["code"], "LIMIT_EXCEEDED", "{error}");
    assert_eq!(error["extensions"]["limit"], "MAX_ACTIVE_ANSWERS_PER_USER");
    assert_eq!(error["extensions"]["max"], 3);
    assert_eq!(stored_messages(&app).await, messages, "nothing saved");
    assert_eq!(
        app.dify.requests_to("/chat-messages").len(),
        calls,
        "nothing sent"
    );

    // Another user is not affected; and once an answer ends, there is room again.
    let other = app.register("other@example.com").await;
    let events = chat(&other, TRANSPORT_WS, json!({ "query": "hello" })).await;
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
    ws.unsubscribe("a").await;
    drop(ws);
    let stop = user
        .gql(
            "{ conversations(first: 10) { nodes { messages(last: 1) { nodes { id status } } } } }",
            json!({}),
        )
        .await;
    let id = stop["data"]["conversations"]["nodes"][0]["messages"]["nodes"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stopped = user
        .gql(
            "mutation($id: ID!) { stopChat(messageId: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        stopped["data"]["stopChat"]["status"], "STOPPED",
        "{stopped}"
    );
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "now?" })).await;
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_turns_per_minute_are_limited_per_user() {
    let app = setup_with(|c| c.chat_turns_per_minute = 3).await;
    let user = app.register("user@example.com").await;
    for _ in 0..3 {
        let events = chat(&user, TRANSPORT_WS, json!({ "query": "hi" })).await;
        assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
    }
    let messages = stored_messages(&app).await;
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "hi again" } }))
        .await;
    let errors = ws.collect().await.expect_err("refused");
    let error = &errors["errors"][0];
    assert_eq!(error["extensions"]["code"], "RATE_LIMITED", "{errors}");
    assert!(error["extensions"]["retryAfter"].as_u64().unwrap() <= 60);
    assert_eq!(stored_messages(&app).await, messages, "nothing saved");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_runs_a_bounded_number_of_operations_with_unique_ids() {
    let app = setup_with(|c| c.max_subscriptions_per_connection = 2).await;
    let user = app.register("user@example.com").await;
    let mut ws = user.ws(TRANSPORT_WS).await;
    start_long_chat(&app, &mut ws, "1").await;
    start_long_chat(&app, &mut ws, "2").await;
    ws.send(json!({ "id": "3", "type": "subscribe", "payload": { "query": "{ me { id } }" } }))
        .await;
    let error = refusal(&mut ws, "3").await;
    assert_eq!(error["extensions"]["code"], "LIMIT_EXCEEDED", "{error}");
    assert_eq!(
        error["extensions"]["limit"],
        "MAX_SUBSCRIPTIONS_PER_CONNECTION"
    );
    assert_eq!(error["extensions"]["max"], 2);

    // Completing one makes room; the refused id may be used again.
    ws.unsubscribe("1").await;
    ws.send(json!({ "id": "3", "type": "subscribe", "payload": { "query": "{ me { id } }" } }))
        .await;
    loop {
        let message = ws.recv().await.unwrap().unwrap();
        if message["id"] == "3" && message["type"] == "next" {
            assert_eq!(
                message["payload"]["data"]["me"]["id"],
                user.id.as_str(),
                "{message}"
            );
            break;
        }
    }

    // The protocol's rule for an id that is already running: close with 4409.
    ws.send(json!({ "id": "2", "type": "subscribe", "payload": { "query": "{ me { id } }" } }))
        .await;
    let close = loop {
        match ws.recv().await.expect("a close frame") {
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert!(close.starts_with("close 4409"), "{close}");
}

const USAGE: &str =
    "{ me { usage { totalTokens tokenQuota activeAnswers periodStart resetsAt } } }";

#[tokio::test(flavor = "multi_thread")]
async fn token_quotas_are_settled_from_dify_usage_and_checked_before_a_turn() {
    let app = setup_with(|c| c.default_token_quota = Some(1000)).await;
    let admin = admin(&app).await;
    let user = app.register("user@example.com").await;
    let usage = user.gql(USAGE, json!({})).await;
    assert_eq!(usage["data"]["me"]["usage"]["totalTokens"], 0, "{usage}");
    assert_eq!(usage["data"]["me"]["usage"]["tokenQuota"], 1000);

    // The captured answer used 1,711 tokens: allowed (0 < 1000), then settled by the writer's
    // next tick.
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "hello" })).await;
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
    let usage = settled_usage(&user, 1711).await;
    assert_eq!(usage["data"]["me"]["usage"]["activeAnswers"], 0);

    let messages = stored_messages(&app).await;
    let calls = app.dify.requests_to("/chat-messages").len();
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "more" } }))
        .await;
    let errors = ws.collect().await.expect_err("over quota");
    let error = &errors["errors"][0];
    assert_eq!(error["extensions"]["code"], "QUOTA_EXCEEDED", "{errors}");
    let resets_at = error["extensions"]["resetsAt"].as_str().unwrap();
    assert_eq!(
        resets_at,
        usage["data"]["me"]["usage"]["resetsAt"]
            .as_str()
            .unwrap()
            .replace('Z', "+00:00")
    );
    assert_eq!(stored_messages(&app).await, messages, "nothing saved");
    assert_eq!(
        app.dify.requests_to("/chat-messages").len(),
        calls,
        "nothing sent"
    );

    // An admin lifts the quota (null = unlimited), sees the usage, and only admins may.
    let set = "mutation($id: ID!, $q: Int) { setUserQuota(userId: $id, tokenQuota: $q) { usage { tokenQuota totalTokens } } }";
    let lifted = admin.gql(set, json!({ "id": user.id, "q": null })).await;
    assert_eq!(
        lifted["data"]["setUserQuota"]["usage"]["tokenQuota"],
        Value::Null,
        "{lifted}"
    );
    assert_eq!(lifted["data"]["setUserQuota"]["usage"]["totalTokens"], 1711);
    let denied = user.gql(set, json!({ "id": user.id, "q": 5 })).await;
    assert_eq!(error_code(&denied), "FORBIDDEN");
    let negative = admin.gql(set, json!({ "id": user.id, "q": -1 })).await;
    assert_eq!(error_code(&negative), "BAD_USER_INPUT");
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "more" })).await;
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
    settled_usage(&user, 3422).await;
}

/// `me.usage` once the month's total reached `total` (the writer settles within a tick).
async fn settled_usage(user: &Actor<'_>, total: i64) -> Value {
    let mut usage = Value::Null;
    for _ in 0..50 {
        usage = user.gql(USAGE, json!({})).await;
        if usage["data"]["me"]["usage"]["totalTokens"] == total {
            return usage;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not settled to {total}: {usage}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answers_tokens_are_settled_once_however_often_the_write_is_retried() {
    let app = setup_with(|_| {}).await;
    let user = app.register("user@example.com").await;
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "hello" })).await;
    let message_id = events[0]["messageId"].as_str().unwrap();
    settled_usage(&user, 1711).await;
    // A final write retried after the settlement writes the same tokens again; settling again,
    // as every gateway's writer does, counts nothing more.
    app.sql(&format!(
        "UPDATE messages SET tokens = 1711 WHERE id = UNHEX(REPLACE('{message_id}', '-', ''))"
    ))
    .await;
    let mut conn = app.app.db.get().await.unwrap();
    for _ in 0..3 {
        assert_eq!(rechat::users::quota::settle(&mut conn).await.unwrap(), 0);
    }
    drop(conn);
    settled_usage(&user, 1711).await;
}
