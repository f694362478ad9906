use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::fake_dify::{DIFY_KEY, Script};
use crate::harness::ws::{LEGACY_WS, OpMessage, TRANSPORT_WS};
use crate::harness::{Actor, TestApp, error_code};

pub const CHAT: &str = r#"subscription($input: ChatInput!) { chat(input: $input) { __typename messageId seq
  ... on ChatStarted { conversation { id title messageCount } userMessage { id content role status } assistantMessage { id role status } }
  ... on AnswerDelta { delta }
  ... on AnswerReplaced { answer }
  ... on AgentThoughtUpdated { thought { id position thought tool toolInput observation } }
  ... on MessageFileAdded { file { id type url } }
  ... on WorkflowProgress { event workflowRunId nodeId nodeType title status elapsedTime data }
  ... on DifyEvent { event }
  ... on ChatSnapshot { message { id content status } }
  ... on ChatCompleted { message { id conversationId content status usage { totalTokens totalPrice currency } retrieverResources { documentName score } agentThoughts { id tool observation } error { code } } }
  ... on ChatFailed { message { id content status error { code } } error { code message status } }
} }"#;

/// Runs one chat turn to its end and returns the events.
pub async fn chat(user: &Actor<'_>, protocol: &str, input: Value) -> Vec<Value> {
    let mut ws = user.ws(protocol).await;
    ws.subscribe(CHAT, json!({ "input": input })).await;
    let payloads = ws
        .collect()
        .await
        .unwrap_or_else(|e| panic!("chat failed: {e}"));
    ws.close().await;
    payloads
        .into_iter()
        .map(|p| p["data"]["chat"].clone())
        .collect()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["__typename"].as_str().unwrap())
        .collect()
}

pub fn answer_of(events: &[Value]) -> String {
    let mut answer = String::new();
    for e in events {
        match e["__typename"].as_str() {
            Some("AnswerDelta") => answer.push_str(e["delta"].as_str().unwrap()),
            Some("AnswerReplaced") => answer = e["answer"].as_str().unwrap().to_owned(),
            Some("ChatSnapshot") => answer = e["message"]["content"].as_str().unwrap().to_owned(),
            _ => {}
        }
    }
    answer
}

/// Checks the invariants every answer has: ChatStarted first, one terminal event last,
/// sequence numbers 1, 2, 3 … and one message id.
pub fn check_shape(events: &[Value]) {
    assert_eq!(events[0]["__typename"], "ChatStarted", "{events:?}");
    let last = events.last().unwrap()["__typename"].as_str().unwrap();
    assert!(last == "ChatCompleted" || last == "ChatFailed", "{last}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as i64 + 1, "seq of event {i}");
        assert_eq!(e["messageId"], events[0]["messageId"]);
    }
    assert_eq!(events[0]["assistantMessage"]["status"], "STREAMING");
}

pub async fn setup(mode: &str) -> (TestApp, String, String) {
    let app = TestApp::spawn().await;
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, mode).await;
    let (a, u) = (admin.token.clone().unwrap(), user.token.clone().unwrap());
    (app, a, u)
}

pub fn actor<'a>(app: &'a TestApp, token: &str) -> Actor<'a> {
    let claims = app.app.keys.verify(token).unwrap();
    Actor {
        app,
        token: Some(token.to_owned()),
        id: claims.user.to_string(),
    }
}

pub async fn stored(app: &TestApp, message_id: &str, column: &str) -> String {
    app.sql_strings(&format!(
        "SELECT CAST(COALESCE({column}, '') AS CHAR) AS value FROM messages WHERE id = UNHEX(REPLACE('{message_id}', '-', ''))"
    ))
    .await
    .pop()
    .unwrap_or_default()
}

pub async fn wait_for_status(app: &TestApp, message_id: &str, status: &str) {
    for _ in 0..100 {
        if stored(app, message_id, "status").await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "message {message_id} never became {status}: {}",
        stored(app, message_id, "status").await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chat_answer_streams_in_order_and_is_stored() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    let events = chat(
        &user,
        TRANSPORT_WS,
        json!({ "query": "  How many days of annual leave do I get?  " }),
    )
    .await;
    check_shape(&events);
    assert_eq!(
        kinds(&events),
        [
            "ChatStarted",
            "AnswerDelta",
            "AnswerDelta",
            "AnswerDelta",
            "AnswerDelta",
            "AnswerDelta",
            "AnswerDelta",
            "DifyEvent",
            "ChatCompleted"
        ]
    );
    let started = &events[0];
    assert_eq!(
        started["conversation"]["title"],
        "How many days of annual leave do I get?"
    );
    assert_eq!(started["conversation"]["messageCount"], 2);
    assert_eq!(
        started["userMessage"]["content"],
        "How many days of annual leave do I get?"
    );
    assert_eq!(started["userMessage"]["status"], "COMPLETED");

    let done = &events.last().unwrap()["message"];
    let answer = answer_of(&events);
    assert!(answer.starts_with("根据《员工手册》第 3 章，"));
    assert_eq!(done["content"], answer.as_str());
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["usage"]["totalTokens"], 1711);
    assert_eq!(done["usage"]["totalPrice"], "0.0002958");
    assert_eq!(
        done["retrieverResources"][0]["documentName"],
        "员工手册2026.pdf"
    );

    let id = done["id"].as_str().unwrap();
    assert_eq!(stored(&app, id, "content").await, answer);
    assert_eq!(stored(&app, id, "status").await, "COMPLETED");
    assert_eq!(
        stored(&app, id, "dify_task_id").await,
        "96ced99f-d3ac-49ec-9a1f-5955efe08c55"
    );

    let request = &app.dify.requests_to("/chat-messages")[0];
    assert_eq!(
        request.authorization.as_deref(),
        Some(format!("Bearer {DIFY_KEY}").as_str())
    );
    assert_eq!(request.body["user"], format!("rechat-{}", user.id));
    assert_eq!(request.body["response_mode"], "streaming");
    assert_eq!(request.body["conversation_id"], "");
    assert_eq!(
        request.body["query"],
        "How many days of annual leave do I get?"
    );

    // The stored conversation, seen through the API.
    let conversation = user
        .gql("query($id: ID!) { conversation(id: $id) { messageCount messages { nodes { role content status } } } }", json!({ "id": started["conversation"]["id"] }))
        .await;
    let messages = &conversation["data"]["conversation"]["messages"]["nodes"];
    assert_eq!(conversation["data"]["conversation"]["messageCount"], 2);
    assert_eq!(messages[0]["role"], "USER");
    assert_eq!(messages[1]["content"], answer.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_second_turn_sends_difys_conversation_id() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    let first = chat(&user, LEGACY_WS, json!({ "query": "first" })).await;
    let conversation_id = first[0]["conversation"]["id"].clone();
    let second = chat(
        &user,
        LEGACY_WS,
        json!({ "conversationId": conversation_id, "query": "and then?" }),
    )
    .await;
    check_shape(&second);
    assert_eq!(
        second.last().unwrap()["__typename"],
        "ChatCompleted",
        "{second:?}"
    );
    assert_eq!(second[0]["conversation"]["messageCount"], 4);
    let requests = app.dify.requests_to("/chat-messages");
    let issued = requests[1].body["conversation_id"].as_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(issued).is_ok(),
        "the second turn carries Dify's id: {issued:?}"
    );
    assert_eq!(requests[0].body["conversation_id"], "");

    // When Dify no longer knows the conversation (404), the turn goes on in a new Dify
    // conversation, and the next turns continue that one.
    app.dify.forget_conversations();
    let third = chat(
        &user,
        TRANSPORT_WS,
        json!({ "conversationId": conversation_id, "query": "still there?" }),
    )
    .await;
    assert_eq!(
        third.last().unwrap()["__typename"],
        "ChatCompleted",
        "{third:?}"
    );
    let fourth = chat(
        &user,
        TRANSPORT_WS,
        json!({ "conversationId": conversation_id, "query": "and now?" }),
    )
    .await;
    assert_eq!(fourth.last().unwrap()["__typename"], "ChatCompleted");
    let requests = app.dify.requests_to("/chat-messages");
    assert_eq!(
        requests[2].body["conversation_id"], issued,
        "tried the stored id first"
    );
    assert_eq!(
        requests[3].body["conversation_id"], "",
        "then a new Dify conversation"
    );
    let renewed = requests[4].body["conversation_id"].as_str().unwrap();
    assert!(!renewed.is_empty() && renewed != issued);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_app_mode_streams_through_its_endpoint() {
    let (app, admin_token, token) = setup("agent-chat").await;
    let admin = actor(&app, &admin_token);
    let user = actor(&app, &token);

    let agent = chat(&user, TRANSPORT_WS, json!({ "query": "what time is it?" })).await;
    check_shape(&agent);
    assert!(kinds(&agent).contains(&"AgentThoughtUpdated"));
    let done = &agent.last().unwrap()["message"];
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["content"], answer_of(&agent).as_str());
    let thoughts = done["agentThoughts"].as_array().unwrap();
    assert_eq!(thoughts[0]["tool"], "current_time");
    assert!(
        thoughts[0]["observation"]
            .as_str()
            .unwrap()
            .contains("2026-04-12")
    );

    app.configure_dify(&admin, "agent").await;
    let new_agent = chat(&user, TRANSPORT_WS, json!({ "query": "what time is it?" })).await;
    check_shape(&new_agent);
    assert!(
        kinds(&new_agent).contains(&"AnswerReplaced"),
        "the closing full message replaces"
    );
    assert_eq!(
        new_agent.last().unwrap()["message"]["content"],
        agent.last().unwrap()["message"]["content"],
        "the answer is not doubled"
    );

    app.configure_dify(&admin, "advanced-chat").await;
    let chatflow = chat(&user, LEGACY_WS, json!({ "query": "你好" })).await;
    check_shape(&chatflow);
    let progress: Vec<_> = chatflow
        .iter()
        .filter(|e| e["__typename"] == "WorkflowProgress")
        .collect();
    assert_eq!(progress.first().unwrap()["event"], "workflow_started");
    assert!(progress.iter().any(|e| e["event"] == "node_finished"
        && e["nodeType"].is_string()
        && e["elapsedTime"].is_number()));
    assert_eq!(progress.last().unwrap()["event"], "workflow_finished");
    assert_eq!(chatflow.last().unwrap()["message"]["status"], "COMPLETED");
    assert!(!answer_of(&chatflow).is_empty());

    app.configure_dify(&admin, "workflow").await;
    let workflow = chat(
        &user,
        TRANSPORT_WS,
        json!({ "query": "hello", "inputs": { "lang": "zh" } }),
    )
    .await;
    check_shape(&workflow);
    let done = &workflow.last().unwrap()["message"];
    assert_eq!(done["content"], "你好👋！有什么可以帮助你的吗？");
    let run = &app.dify.requests_to("/workflows/run")[0];
    assert_eq!(
        run.body["inputs"],
        json!({ "query": "hello", "lang": "zh" })
    );
    assert_eq!(run.body["user"], format!("rechat-{}", user.id));

    app.configure_dify(&admin, "completion").await;
    let completion = chat(&user, TRANSPORT_WS, json!({ "query": "complete this" })).await;
    check_shape(&completion);
    assert_eq!(completion.last().unwrap()["message"]["status"], "COMPLETED");
    assert_eq!(app.dify.requests_to("/completion-messages").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_serialisation_and_message_replace() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    let modern = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    app.dify.push(Script::replay("chat-legacy.sse"));
    let legacy = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    assert_eq!(answer_of(&legacy), answer_of(&modern));
    assert_eq!(
        legacy.last().unwrap()["message"]["usage"]["totalTokens"],
        1711
    );

    app.dify.push(Script::replay("chat-message-replace.sse"));
    let replaced = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    assert!(kinds(&replaced).contains(&"AnswerReplaced"));
    let done = &replaced.last().unwrap()["message"];
    assert_eq!(done["content"], "I can't help with that request.");
    assert_eq!(
        stored(&app, done["id"].as_str().unwrap(), "content").await,
        "I can't help with that request."
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dify_failures_end_in_chat_failed_with_the_partial_answer_kept() {
    let (app, admin_token, token) = setup("chat").await;
    let user = actor(&app, &token);
    let cases: Vec<(Script, &str, Option<i64>, &str)> = vec![
        (
            Script::HttpError {
                status: 400,
                fixture: "error-400.json",
            },
            "provider_not_initialize",
            Some(400),
            "",
        ),
        (
            Script::HttpError {
                status: 429,
                fixture: "error-429.json",
            },
            "too_many_requests",
            Some(429),
            "",
        ),
        (
            Script::HttpError {
                status: 500,
                fixture: "error-500.json",
            },
            "internal_server_error",
            Some(500),
            "",
        ),
        (
            Script::replay("chat-error-midstream.sse"),
            "completion_request_error",
            Some(400),
            "Sure — here is  a short summary of  the quarterly report:\n\n1.",
        ),
        (
            Script::Broken {
                fixture: "chat-cut.sse",
            },
            "upstream_unavailable",
            None,
            "根据《员工手册》第 3 章，年假天数按工龄计算：",
        ),
        (
            Script::replay("chat-cut.sse"),
            "stream_interrupted",
            None,
            "根据《员工手册》第 3 章，年假天数按工龄计算：",
        ),
        (Script::Silent, "upstream_unavailable", None, ""),
    ];
    for (script, code, status, partial) in cases {
        app.dify.push(script.clone());
        let events = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
        check_shape(&events);
        let failed = events.last().unwrap();
        assert_eq!(failed["__typename"], "ChatFailed", "{script:?}");
        assert_eq!(failed["error"]["code"], code, "{script:?}");
        assert_eq!(failed["error"]["status"].as_i64(), status, "{script:?}");
        assert_eq!(failed["message"]["status"], "FAILED");
        assert_eq!(failed["message"]["content"], partial, "{script:?}");
        assert_eq!(failed["message"]["error"]["code"], code);
        let id = failed["message"]["id"].as_str().unwrap();
        assert_eq!(stored(&app, id, "status").await, "FAILED");
        assert_eq!(stored(&app, id, "content").await, partial);
    }

    // A chatflow whose node fails: Dify's closing error event gives the code.
    let admin = actor(&app, &admin_token);
    app.configure_dify(&admin, "advanced-chat").await;
    app.dify.push(Script::replay("chatflow-node-failed.sse"));
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    let failed = events.last().unwrap();
    assert_eq!(failed["error"]["code"], "invalid_param", "{failed}");
    assert!(kinds(&events).contains(&"WorkflowProgress"));

    // A workflow that fails before any node: no error event, the workflow's own error.
    app.configure_dify(&admin, "workflow").await;
    app.dify.push(Script::replay("workflow-failed.sse"));
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    let failed = events.last().unwrap();
    assert_eq!(failed["error"]["code"], "workflow_failed");
    assert_eq!(
        failed["error"]["message"],
        "Variable #start.query# not found"
    );

    // Dify unreachable altogether.
    app.sql("UPDATE dify_apps SET api_url = 'http://127.0.0.1:9/v1'")
        .await;
    // Changed behind the gateway's back: as another gateway would, after the cache's TTL.
    app.app.app_cache.invalidate();
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    assert_eq!(
        events.last().unwrap()["error"]["code"],
        "upstream_unavailable"
    );
    let streaming = app
        .sql_strings(
            "SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages WHERE status = 'STREAMING'",
        )
        .await;
    assert_eq!(streaming, ["0"], "no message is left STREAMING");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_is_stored_whole_when_the_subscriber_leaves() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    for leave_by_completing in [false, true] {
        app.dify.push(Script::Long {
            deltas: 30,
            pause: Duration::from_millis(40),
        });
        let mut ws = user.ws(TRANSPORT_WS).await;
        let op = ws
            .subscribe(
                CHAT,
                json!({ "input": { "query": "tell me a long story" } }),
            )
            .await;
        let OpMessage::Next(started) = ws.next_op().await else {
            panic!("no ChatStarted")
        };
        let id = started["data"]["chat"]["messageId"]
            .as_str()
            .unwrap()
            .to_owned();
        for _ in 0..3 {
            assert!(matches!(ws.next_op().await, OpMessage::Next(_)));
        }
        if leave_by_completing {
            ws.unsubscribe(&op).await; // the client completes the operation early
        } else {
            drop(ws); // the browser tab closes
        }

        // The partial answer reaches MySQL while Dify is still talking (bounded-rate flushes) …
        let mut partial = String::new();
        for _ in 0..50 {
            partial = stored(&app, &id, "content").await;
            if !partial.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(partial.starts_with("word0 "), "partial flush: {partial:?}");
        // … and the whole answer when Dify is done.
        wait_for_status(&app, &id, "COMPLETED").await;
        let content = stored(&app, &id, "content").await;
        assert_eq!(content.split_whitespace().count(), 30);
        assert!(content.ends_with("word29 "));
        assert!(
            stored(&app, &id, "`usage`")
                .await
                .contains("\"total_tokens\":35")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_chat_keeps_the_beginning_and_ends_stopped() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    app.dify.push(Script::Long {
        deltas: 500,
        pause: Duration::from_millis(20),
    });
    let mut ws = user.ws(LEGACY_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "count forever" } }))
        .await;
    let OpMessage::Next(started) = ws.next_op().await else {
        panic!("no ChatStarted")
    };
    let id = started["data"]["chat"]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..5 {
        ws.next_op().await;
    }
    let stopped = user
        .gql(
            "mutation($id: ID!) { stopChat(messageId: $id) { id status content } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        stopped["data"]["stopChat"]["status"], "STOPPED",
        "{stopped}"
    );
    let mut last = Value::Null;
    loop {
        match ws.next_op().await {
            OpMessage::Next(payload) => last = payload["data"]["chat"].clone(),
            OpMessage::Complete => break,
            OpMessage::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(last["__typename"], "ChatCompleted");
    assert_eq!(last["message"]["status"], "STOPPED");
    let content = last["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("word0 word1 word2 word3 word4 "));
    assert!(content.split_whitespace().count() < 500);

    let stop = &app.dify.requests_to("/stop")[0];
    assert_eq!(stop.body["user"], format!("rechat-{}", user.id));
    assert!(stop.path.starts_with("/v1/chat-messages/"));
    assert_eq!(stored(&app, &id, "status").await, "STOPPED");

    // Stopping again, or stopping a finished answer, changes nothing.
    let again = user
        .gql(
            "mutation($id: ID!) { stopChat(messageId: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(again["data"]["stopChat"]["status"], "STOPPED");
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_checks_come_before_anything_is_written() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    let other = app.register("other@example.com").await;
    let theirs = chat(&other, TRANSPORT_WS, json!({ "query": "mine" })).await;
    let their_conversation = theirs[0]["conversation"]["id"].clone();

    for (input, code) in [
        (
            json!({ "conversationId": their_conversation, "query": "let me in" }),
            "NOT_FOUND",
        ),
        (
            json!({ "conversationId": uuid::Uuid::now_v7().to_string(), "query": "hello" }),
            "NOT_FOUND",
        ),
        (
            json!({ "conversationId": "not-a-uuid", "query": "hello" }),
            "BAD_USER_INPUT",
        ),
        (json!({ "query": "   " }), "BAD_USER_INPUT"),
        (json!({ "query": "x".repeat(32_001) }), "BAD_USER_INPUT"),
        (json!({ "query": "hi", "inputs": [1, 2] }), "BAD_USER_INPUT"),
        (
            json!({ "query": "hi", "inputs": { "big": "x".repeat(65_536) } }),
            "BAD_USER_INPUT",
        ),
    ] {
        let mut ws = user.ws(TRANSPORT_WS).await;
        ws.subscribe(CHAT, json!({ "input": input })).await;
        assert_eq!(ws.refused_code().await, code, "{input}");
    }
    let count = app
        .sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages")
        .await;
    assert_eq!(count, ["2"], "only the other user's turn is stored");
    assert_eq!(app.dify.requests_to("/chat-messages").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dify_url_with_credentials_is_refused_without_echoing_them() {
    let (app, admin, _) = setup("chat").await;
    let admin = actor(&app, &admin);
    let url = app.dify.url.replace("http://", "http://someone:hunter2@");
    let answer = admin
        .gql(
            "mutation($input: DifyConfigInput!) { setDifyConfig(input: $input) { isConfigured } }",
            json!({ "input": { "apiKey": DIFY_KEY, "apiUrl": url } }),
        )
        .await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT");
    assert_eq!(answer["errors"][0]["extensions"]["field"], "apiUrl");
    assert!(!answer.to_string().contains("hunter2"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dify_config_is_checked_encrypted_and_masked() {
    let app = TestApp::spawn().await;
    let (admin, user) = app.admin_and_user().await;
    const SET: &str = "mutation($input: DifyConfigInput!) { setDifyConfig(input: $input) { isConfigured apiKeyPreview apiUrl appMode appName updatedAt } }";
    let before = admin
        .gql(
            "{ difyConfig { isConfigured apiKeyPreview apiUrl } }",
            json!({}),
        )
        .await;
    assert_eq!(before["data"]["difyConfig"]["isConfigured"], false);
    assert_eq!(
        before["data"]["difyConfig"]["apiUrl"],
        app.dify.url.as_str()
    );

    let wrong = admin
        .gql(
            SET,
            json!({ "input": { "apiKey": "app-wrong-key-123456", "apiUrl": app.dify.url } }),
        )
        .await;
    assert_eq!(error_code(&wrong), "UPSTREAM_ERROR");
    assert_eq!(
        wrong["errors"][0]["extensions"]["upstreamCode"],
        "unauthorized"
    );
    assert_eq!(wrong["errors"][0]["extensions"]["upstreamStatus"], 401);
    let unreachable = admin
        .gql(
            SET,
            json!({ "input": { "apiKey": DIFY_KEY, "apiUrl": "http://127.0.0.1:9" } }),
        )
        .await;
    assert_eq!(error_code(&unreachable), "UPSTREAM_UNAVAILABLE");
    let bad_url = admin
        .gql(
            SET,
            json!({ "input": { "apiKey": DIFY_KEY, "apiUrl": "not a url" } }),
        )
        .await;
    assert_eq!(error_code(&bad_url), "BAD_USER_INPUT");
    assert_eq!(
        admin
            .gql("{ difyConfig { isConfigured } }", json!({}))
            .await["data"]["difyConfig"]["isConfigured"],
        false
    );

    let without_v1 = app.dify.url.trim_end_matches("/v1");
    let set = admin
        .gql(
            SET,
            json!({ "input": { "apiKey": format!("  {DIFY_KEY} "), "apiUrl": without_v1 } }),
        )
        .await;
    let config = &set["data"]["setDifyConfig"];
    assert_eq!(config["isConfigured"], true);
    assert_eq!(config["apiKeyPreview"], "app-...6789");
    assert_eq!(config["apiUrl"], app.dify.url.as_str());
    assert_eq!(config["appMode"], "chat");
    assert_eq!(config["appName"], "Fake HR Assistant");
    assert!(!set.to_string().contains(DIFY_KEY));
    let stored = app.sql_strings("SELECT CONCAT_WS('|', HEX(api_key_encrypted), api_key_preview, api_url) AS value FROM dify_apps").await;
    assert!(
        !stored[0].contains(DIFY_KEY) && !stored[0].contains(&hex(DIFY_KEY)),
        "the key is stored encrypted"
    );
    assert_eq!(
        error_code(
            &user
                .gql(SET, json!({ "input": { "apiKey": DIFY_KEY } }))
                .await
        ),
        "FORBIDDEN"
    );

    let deleted = admin
        .gql(
            "mutation { deleteDifyConfig { isConfigured apiKeyPreview appMode } }",
            json!({}),
        )
        .await;
    assert_eq!(
        deleted["data"]["deleteDifyConfig"],
        json!({ "isConfigured": false, "apiKeyPreview": null, "appMode": null })
    );
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "hello" } }))
        .await;
    assert_eq!(ws.refused_code().await, "DIFY_NOT_CONFIGURED");
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02X}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn feedback_is_stored_and_forwarded_and_messages_are_private() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    let other = app.register("other@example.com").await;
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    let answer_id = events.last().unwrap()["message"]["id"].clone();
    let question_id = events[0]["userMessage"]["id"].clone();
    const FEEDBACK: &str = "mutation($id: ID!, $rating: Rating, $content: String) { setMessageFeedback(messageId: $id, rating: $rating, content: $content) { id feedback } }";

    let liked = user
        .gql(
            FEEDBACK,
            json!({ "id": answer_id, "rating": "LIKE", "content": "spot on" }),
        )
        .await;
    assert_eq!(liked["data"]["setMessageFeedback"]["feedback"], "LIKE");
    let sent = &app.dify.requests_to("/feedbacks")[0];
    assert_eq!(
        sent.path,
        "/v1/messages/3e6ca965-140b-4e0f-92a7-8217a5f079ae/feedbacks"
    );
    assert_eq!(
        sent.body,
        json!({ "rating": "like", "user": format!("rechat-{}", user.id), "content": "spot on" })
    );
    let revoked = user
        .gql(FEEDBACK, json!({ "id": answer_id, "rating": null }))
        .await;
    assert!(revoked["data"]["setMessageFeedback"]["feedback"].is_null());
    assert!(app.dify.requests_to("/feedbacks")[1].body["rating"].is_null());

    assert_eq!(
        error_code(
            &user
                .gql(FEEDBACK, json!({ "id": question_id, "rating": "LIKE" }))
                .await
        ),
        "BAD_USER_INPUT"
    );
    assert_eq!(
        error_code(
            &other
                .gql(FEEDBACK, json!({ "id": answer_id, "rating": "DISLIKE" }))
                .await
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        error_code(
            &other
                .gql(
                    "mutation($id: ID!) { stopChat(messageId: $id) { id } }",
                    json!({ "id": answer_id })
                )
                .await
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        error_code(
            &user
                .gql(FEEDBACK, json!({ "id": "nope", "rating": "LIKE" }))
                .await
        ),
        "BAD_USER_INPUT"
    );

    const MESSAGE: &str = "query($id: ID!) { message(id: $id) { id role feedback } }";
    assert_eq!(
        user.gql(MESSAGE, json!({ "id": answer_id })).await["data"]["message"]["role"],
        "ASSISTANT"
    );
    assert!(other.gql(MESSAGE, json!({ "id": answer_id })).await["data"]["message"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_of_a_dead_gateway_become_interrupted() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    let conversation = events[0]["conversation"]["id"]
        .as_str()
        .unwrap()
        .replace('-', "");
    // Two answers left STREAMING: one by a process that died long ago, one live.
    for (id, age, content) in [
        ("00000000000070008000000000000001", 600, "half an ans"),
        ("00000000000070008000000000000002", 5, "live"),
    ] {
        app.sql(&format!(
            "INSERT INTO messages (id, conversation_id, role, content, status, created_at, updated_at) VALUES \
             (UNHEX('{id}'), UNHEX('{conversation}'), 'ASSISTANT', '{content}', 'STREAMING', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) - INTERVAL {age} SECOND)"
        ))
        .await;
    }
    let mut conn = app.app.db.get().await.unwrap();
    let swept = rechat::chat::db::sweep_interrupted(&mut conn, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert_eq!(
        stored(&app, "00000000-0000-7000-8000-000000000001", "status").await,
        "INTERRUPTED"
    );
    assert_eq!(
        stored(&app, "00000000-0000-7000-8000-000000000001", "content").await,
        "half an ans"
    );
    assert_eq!(
        stored(&app, "00000000-0000-7000-8000-000000000002", "status").await,
        "STREAMING"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_also_stream_as_multipart_over_http() {
    let (app, _, token) = setup("chat").await;
    // From a browser on an allowed origin (the preflight is tested with CORS).
    let body = app
        .http
        .post(app.url("/graphql"))
        .bearer_auth(&token)
        .header("origin", "https://app.example.com")
        .header(
            "accept",
            "multipart/mixed;boundary=\"graphql\";subscriptionSpec=\"1.0\",application/json",
        )
        .json(&json!({ "query": CHAT, "variables": { "input": { "query": "over http" } } }))
        .send()
        .await
        .unwrap();
    assert!(
        body.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("multipart/mixed")
    );
    assert_eq!(
        body.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let text = body.text().await.unwrap();
    let events: Vec<Value> = text
        .split("--graphql")
        .filter_map(|part| part.split_once("\r\n\r\n"))
        .filter_map(|(_, json)| serde_json::from_str::<Value>(json.trim()).ok())
        .filter_map(|response| {
            response["data"]["chat"]
                .as_object()
                .cloned()
                .map(Value::Object)
        })
        .collect();
    check_shape(&events);
    assert_eq!(events.last().unwrap()["message"]["status"], "COMPLETED");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpaced_answer_arrives_whole_and_in_order() {
    // Events are written to the socket in batches; none may be lost between batches.
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    for protocol in [TRANSPORT_WS, LEGACY_WS] {
        app.dify.push(Script::Long {
            deltas: 1500,
            pause: Duration::ZERO,
        });
        let events = chat(&user, protocol, json!({ "query": "fast" })).await;
        check_shape(&events);
        let words: Vec<String> = (0..1500).map(|i| format!("word{i} ")).collect();
        assert_eq!(answer_of(&events), words.concat());
        assert_eq!(events.last().unwrap()["message"]["status"], "COMPLETED");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_hangs_is_given_up_on_and_stopped_at_dify() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    app.dify.push(Script::Stall { deltas: 3 });
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "hang" })).await;
    check_shape(&events);
    let failed = events.last().unwrap();
    assert_eq!(failed["error"]["code"], "upstream_unavailable", "{failed}");
    assert_eq!(failed["message"]["content"], "word0 word1 word2 ");
    // Dify is told to stop, so the model stops generating (and billing).
    let mut stops = Vec::new();
    for _ in 0..50 {
        stops = app.dify.requests_to("/stop");
        if !stops.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stops.len(), 1, "one stop request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_stops_reading_catches_up_through_a_snapshot_and_misses_nothing() {
    let app = TestApp::spawn_with(|c| {
        c.max_answer_bytes = 15 << 20;
        // The client stops reading for seconds on purpose: no pongs meanwhile.
        c.ws_keepalive = Duration::from_secs(60);
    })
    .await;
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    // 12 MiB: more than the kernel's socket buffers and the 256 KiB the log keeps.
    app.dify.push(Script::Flood {
        deltas: 1500,
        bytes: 8 * 1024,
    });
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "flood me" } }))
        .await;
    let OpMessage::Next(started) = ws.next_op().await else {
        panic!("no ChatStarted")
    };
    let id = started["data"]["chat"]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();
    // The client stops reading until the answer is stored.
    wait_for_status(&app, &id, "COMPLETED").await;
    let mut events = vec![started["data"]["chat"].clone()];
    events.extend(
        ws.collect()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p["data"]["chat"].clone()),
    );
    let snapshots: Vec<&Value> = events
        .iter()
        .filter(|e| e["__typename"] == "ChatSnapshot")
        .collect();
    // One for the part trimmed while the client did not read; under load the subscriber can
    // also start behind the flood and catch up through a first one.
    assert!(
        (1..=2).contains(&snapshots.len()),
        "snapshots for the parts no longer kept: {}",
        snapshots.len()
    );
    assert!(events.len() < 1500, "caught up without every delta");
    for pair in events.windows(2) {
        let (before, seq) = (pair[0]["seq"].as_i64().unwrap(), pair[1]["seq"].as_i64());
        if pair[1]["__typename"] == "ChatSnapshot" {
            assert!(seq.unwrap() > before, "a snapshot covers what was skipped");
        } else {
            assert_eq!(seq, Some(before + 1), "no gap");
        }
    }
    let content = stored(&app, &id, "content").await;
    assert_eq!(content.split_whitespace().count(), 1500, "stored whole");
    assert_eq!(answer_of(&events), content, "nothing missing or repeated");
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_past_max_answer_bytes_is_stopped_and_stored_failed_with_what_fits() {
    let app = TestApp::spawn_with(|c| c.max_answer_bytes = 100_000).await;
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    app.dify.push(Script::Flood {
        deltas: 1000,
        bytes: 1000,
    });
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "flood me" })).await;
    check_shape(&events);
    let last = events.last().unwrap();
    assert_eq!(last["__typename"], "ChatFailed", "{last}");
    assert_eq!(last["error"]["code"], "answer_too_large");
    assert_eq!(last["message"]["status"], "FAILED");
    let relayed = answer_of(&events);
    assert_eq!(relayed.len(), 100_000, "relayed up to the limit");
    let id = last["messageId"].as_str().unwrap();
    assert_eq!(stored(&app, id, "status").await, "FAILED");
    assert_eq!(
        stored(&app, id, "content").await,
        relayed,
        "stored what fits"
    );
    assert_eq!(
        app.dify.wait_for_requests("/stop", 1).await,
        1,
        "Dify was stopped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_breaks_after_message_end_leaves_the_answer_completed() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    app.dify.push(Script::Broken {
        fixture: "chat-basic.sse",
    });
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    check_shape(&events);
    let last = events.last().unwrap();
    assert_eq!(last["__typename"], "ChatCompleted", "{last}");
    assert_eq!(last["message"]["status"], "COMPLETED");
    assert!(app.dify.requests_to("/stop").is_empty(), "nothing to stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_takes_one_turn_at_a_time() {
    let (app, _, token) = setup("chat").await;
    let user = actor(&app, &token);
    app.dify.push(Script::Long {
        deltas: 1000,
        pause: Duration::from_millis(20),
    });
    let mut first = user.ws(TRANSPORT_WS).await;
    first
        .subscribe(CHAT, json!({ "input": { "query": "a long one" } }))
        .await;
    let OpMessage::Next(started) = first.next_op().await else {
        panic!("no ChatStarted")
    };
    let started = &started["data"]["chat"];
    let (message_id, conversation_id) = (
        started["messageId"].as_str().unwrap().to_owned(),
        started["conversation"]["id"].as_str().unwrap().to_owned(),
    );
    const ACTIVE: &str =
        "query($id: ID!) { conversation(id: $id) { activeMessageId messageCount } }";
    let read = user.gql(ACTIVE, json!({ "id": conversation_id })).await;
    assert_eq!(
        read["data"]["conversation"]["activeMessageId"],
        message_id.as_str(),
        "{read}"
    );

    // A second turn while the answer streams: refused, nothing saved, nothing sent.
    let calls = app.dify.wait_for_requests("/chat-messages", 1).await;
    let mut second = user.ws(TRANSPORT_WS).await;
    second
        .subscribe(
            CHAT,
            json!({ "input": { "query": "and another", "conversationId": conversation_id } }),
        )
        .await;
    let errors = second.collect().await.expect_err("refused");
    let error = &errors["errors"][0];
    assert_eq!(error["extensions"]["code"], "CONFLICT", "{errors}");
    assert_eq!(error["extensions"]["activeMessageId"], message_id.as_str());
    let read = user.gql(ACTIVE, json!({ "id": conversation_id })).await;
    assert_eq!(
        read["data"]["conversation"]["messageCount"], 2,
        "nothing saved"
    );
    assert_eq!(
        app.dify.requests_to("/chat-messages").len(),
        calls,
        "nothing sent"
    );

    // Once it ended, the conversation takes turns again; two sent at once: one wins.
    user.gql(
        "mutation($id: ID!) { stopChat(messageId: $id) { status } }",
        json!({ "id": message_id }),
    )
    .await;
    let read = user.gql(ACTIVE, json!({ "id": conversation_id })).await;
    assert_eq!(read["data"]["conversation"]["activeMessageId"], Value::Null);
    for _ in 0..2 {
        app.dify.push(Script::Long {
            deltas: 100,
            pause: Duration::from_millis(20),
        });
    }
    let (mut a, mut b) = (user.ws(TRANSPORT_WS).await, user.ws(TRANSPORT_WS).await);
    let turn = json!({ "input": { "query": "race", "conversationId": conversation_id } });
    tokio::join!(
        a.subscribe(CHAT, turn.clone()),
        b.subscribe(CHAT, turn.clone())
    );
    let outcomes = [a.next_op().await, b.next_op().await];
    let started = outcomes
        .iter()
        .filter(
            |o| matches!(o, OpMessage::Next(p) if p["data"]["chat"]["__typename"] == "ChatStarted"),
        )
        .count();
    assert_eq!(started, 1, "{outcomes:?}");
}
