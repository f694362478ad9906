//! Streams that survive: `resumeChat` from the log and from the database, `ChatSnapshot`,
//! `activeMessageId`, and idempotent sends with `clientMessageId`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::chat::{CHAT, answer_of, check_shape, stored, wait_for_status};
use crate::harness::fake_dify::Script;
use crate::harness::ws::{LEGACY_WS, OpMessage, TRANSPORT_WS, WsClient};
use crate::harness::{Actor, TestApp, error_code};

/// `resumeChat` with the selection of `chat::CHAT`.
pub const RESUME_ALL: &str = r#"subscription($id: ID!, $after: Int) { resumeChat(messageId: $id, afterSeq: $after) { __typename messageId seq
  ... on ChatStarted { conversation { id title messageCount } userMessage { id content role status } assistantMessage { id role status } }
  ... on AnswerDelta { delta }
  ... on ChatSnapshot { message { id content status } }
  ... on DifyEvent { event }
  ... on ChatCompleted { message { id conversationId content status } }
  ... on ChatFailed { message { id content status error { code } } error { code message status } }
} }"#;

const RESUME: &str = r#"subscription($id: ID!, $after: Int) { resumeChat(messageId: $id, afterSeq: $after) { __typename messageId seq
  ... on ChatStarted { assistantMessage { id status } }
  ... on AnswerDelta { delta }
  ... on ChatSnapshot { message { id content status } }
  ... on ChatCompleted { message { id content status } }
  ... on ChatFailed { message { id content status } error { code } }
} }"#;

const ACTIVE: &str = "query($id: ID!) { conversation(id: $id) { activeMessageId messageCount \
                      messages(first: 10) { edges { node { role content clientMessageId } } } } }";

/// The words of an answer of `n` deltas from `Script::Long`.
fn words(n: usize) -> String {
    (0..n).map(|i| format!("word{i} ")).collect()
}

async fn spawn(adjust: impl FnOnce(&mut rechat::config::Config)) -> TestApp {
    let app = TestApp::spawn_with(adjust).await;
    let (admin, _) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    app
}

async fn user(app: &TestApp) -> Actor<'_> {
    app.register("resumer@example.com").await
}

/// The next `n` events of a subscription.
async fn take(ws: &mut WsClient, field: &str, n: usize) -> Vec<Value> {
    let mut events = Vec::new();
    while events.len() < n {
        match ws.next_op().await {
            OpMessage::Next(payload) => events.push(payload["data"][field].clone()),
            other => panic!("ended early: {other:?}"),
        }
    }
    events
}

/// Every event of a subscription to its end.
async fn rest(ws: &mut WsClient, field: &str) -> Vec<Value> {
    ws.collect()
        .await
        .unwrap_or_else(|e| panic!("failed: {e}"))
        .into_iter()
        .map(|p| p["data"][field].clone())
        .collect()
}

async fn resume(user: &Actor<'_>, protocol: &str, id: &str, after: i64) -> Vec<Value> {
    let mut ws = user.ws(protocol).await;
    ws.subscribe(RESUME, json!({ "id": id, "after": after }))
        .await;
    rest(&mut ws, "resumeChat").await
}

/// `resumeChat` over HTTP, as multipart/mixed parts.
async fn resume_multipart(app: &TestApp, user: &Actor<'_>, id: &str, after: i64) -> Vec<Value> {
    let text = app
        .http
        .post(app.url("/graphql"))
        .bearer_auth(user.token.as_deref().unwrap())
        .header(
            "accept",
            "multipart/mixed;boundary=\"graphql\";subscriptionSpec=\"1.0\",application/json",
        )
        .json(&json!({ "query": RESUME, "variables": { "id": id, "after": after } }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.split("--graphql")
        .filter_map(|part| part.split_once("\r\n\r\n"))
        .filter_map(|(_, json)| serde_json::from_str::<Value>(json.trim()).ok())
        .filter_map(|r| {
            r["data"]["resumeChat"]
                .as_object()
                .cloned()
                .map(Value::Object)
        })
        .collect()
}

fn seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

async fn active(user: &Actor<'_>, conversation: &str) -> Value {
    let read = user.gql(ACTIVE, json!({ "id": conversation })).await;
    read["data"]["conversation"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_resumed_on_a_new_socket_continues_with_nothing_missing_or_repeated() {
    let app = spawn(|_| {}).await;
    let user = user(&app).await;
    for protocol in [TRANSPORT_WS, LEGACY_WS] {
        app.dify.push(Script::Long {
            deltas: 80,
            pause: Duration::from_millis(15),
        });
        let mut first = user.ws(protocol).await;
        first
            .subscribe(CHAT, json!({ "input": { "query": "a long one" } }))
            .await;
        let head = take(&mut first, "chat", 10).await;
        let id = head[0]["messageId"].as_str().unwrap().to_owned();
        let conversation = head[0]["conversation"]["id"].as_str().unwrap().to_owned();
        // The page reloads: the socket is gone, the answer goes on.
        drop(first);
        let state = active(&user, &conversation).await;
        assert_eq!(state["activeMessageId"], id.as_str(), "{state}");

        let tail = resume(&user, protocol, &id, 10).await;
        assert_eq!(tail[0]["seq"], 11, "{:?}", tail[0]);
        let events: Vec<Value> = head.into_iter().chain(tail).collect();
        check_shape(&events);
        assert_eq!(answer_of(&events), words(80));
        assert_eq!(events.last().unwrap()["message"]["status"], "COMPLETED");
        assert_eq!(
            active(&user, &conversation).await["activeMessageId"],
            Value::Null
        );

        // After the end: the answer as stored, and the original terminal event.
        let last = events.len() as i64;
        let again = resume(&user, protocol, &id, 5).await;
        assert_eq!(seqs(&again), [last - 1, last]);
        assert_eq!(again[0]["__typename"], "ChatSnapshot");
        assert_eq!(again[0]["message"]["status"], "COMPLETED");
        assert_eq!(again.last(), events.last(), "the original terminal event");
        // Over HTTP too.
        let over_http = resume_multipart(&app, &user, &id, 0).await;
        assert_eq!(seqs(&over_http), [last - 1, last]);
        assert_eq!(answer_of(&over_http), words(80));
        // Past the end: nothing more.
        assert!(
            resume(&user, protocol, &id, events.len() as i64)
                .await
                .is_empty()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_answer_resumes_as_a_snapshot_and_the_terminal_event_from_the_database() {
    let app = spawn(|_| {}).await;
    let user = user(&app).await;
    app.dify.push(Script::Long {
        deltas: 20,
        pause: Duration::ZERO,
    });
    let events = crate::chat::chat(&user, TRANSPORT_WS, json!({ "query": "q" })).await;
    check_shape(&events);
    let id = events[0]["messageId"].as_str().unwrap();
    let terminal = events.last().unwrap();
    let last = terminal["seq"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let resumed = resume(&user, TRANSPORT_WS, id, 3).await;
    assert_eq!(
        resumed
            .iter()
            .map(|e| e["__typename"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["ChatSnapshot", "ChatCompleted"]
    );
    assert_eq!(seqs(&resumed), [last - 1, last], "numbered as first sent");
    assert_eq!(resumed[0]["message"]["content"], words(20));
    for field in ["id", "content", "status"] {
        assert_eq!(resumed[1]["message"][field], terminal["message"][field]);
    }
    let resumed = resume_multipart(&app, &user, id, last - 1).await;
    assert_eq!(seqs(&resumed), [last], "only the terminal event was missed");
    assert!(resume(&user, LEGACY_WS, id, last).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_past_the_kept_events_starts_with_a_snapshot() {
    // The smallest log: about 60 small events.
    let app = spawn(|c| c.resume_buffer_bytes = 16 * 1024).await;
    let user = user(&app).await;
    app.dify.push(Script::Long {
        deltas: 300,
        pause: Duration::from_millis(2),
    });
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "q" } }))
        .await;
    let head = take(&mut ws, "chat", 3).await;
    drop(ws);
    let id = head[0]["messageId"].as_str().unwrap().to_owned();
    // Resumed while it streams, long after its third event left the log.
    app.dify.wait_for_requests("/chat-messages", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tail = resume(&user, TRANSPORT_WS, &id, 3).await;
    let snapshot = &tail[0];
    assert_eq!(snapshot["__typename"], "ChatSnapshot", "{snapshot}");
    assert!(snapshot["seq"].as_i64().unwrap() > 3);
    assert_eq!(snapshot["message"]["status"], "STREAMING");
    for pair in tail.windows(2) {
        assert_eq!(pair[1]["seq"], pair[0]["seq"].as_i64().unwrap() + 1);
    }
    assert_eq!(
        answer_of(&tail),
        words(300),
        "the snapshot and the rest make the answer"
    );
    assert_eq!(stored(&app, &id, "content").await, words(300));
}

/// The error code a `resumeChat` is refused with.
async fn refused(who: &Actor<'_>, id: &str, after: i64) -> String {
    let mut ws = who.ws(TRANSPORT_WS).await;
    ws.subscribe(RESUME, json!({ "id": id, "after": after }))
        .await;
    let errors = ws.collect().await.expect_err("refused");
    error_code(&errors).to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_owner_resumes_an_answer() {
    let app = spawn(|_| {}).await;
    let owner = user(&app).await;
    let other = app.register("other@example.com").await;
    app.dify.push(Script::Long {
        deltas: 200,
        pause: Duration::from_millis(10),
    });
    let mut ws = owner.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "mine" } }))
        .await;
    let head = take(&mut ws, "chat", 1).await;
    let id = head[0]["messageId"].as_str().unwrap();
    let question = head[0]["userMessage"]["id"].as_str().unwrap();
    // Live here, and once stored.
    assert_eq!(refused(&other, id, 0).await, "NOT_FOUND");
    assert_eq!(
        refused(&owner, question, 0).await,
        "NOT_FOUND",
        "a user message"
    );
    assert_eq!(
        refused(&owner, "0190a4e2-0000-7000-8000-000000000000", 0).await,
        "NOT_FOUND"
    );
    assert_eq!(refused(&owner, id, -1).await, "BAD_USER_INPUT");
    owner
        .gql(
            "mutation($id: ID!) { stopChat(messageId: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(refused(&other, id, 0).await, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_retried_with_its_client_message_id_starts_one_turn() {
    // Retries are not turns: only the first send and `next` below count.
    let app = spawn(|c| c.chat_turns_per_minute = 2).await;
    let user = user(&app).await;
    app.dify.push(Script::Long {
        deltas: 60,
        pause: Duration::from_millis(15),
    });
    let input = json!({ "query": "once only", "clientMessageId": "send-1_A" });
    let mut first = user.ws(TRANSPORT_WS).await;
    first.subscribe(CHAT, json!({ "input": input })).await;
    let head = take(&mut first, "chat", 5).await;
    let id = head[0]["messageId"].as_str().unwrap().to_owned();
    let conversation = head[0]["conversation"]["id"].as_str().unwrap().to_owned();
    // The socket drops mid-answer; the client sends again with the same key.
    drop(first);
    let mut retry = user.ws(LEGACY_WS).await;
    retry.subscribe(CHAT, json!({ "input": input })).await;
    let replayed = rest(&mut retry, "chat").await;
    check_shape(&replayed);
    assert_eq!(replayed[0]["messageId"], id.as_str(), "the same turn");
    assert_eq!(replayed[..5], head[..], "the same events, from the start");
    assert_eq!(answer_of(&replayed), words(60));

    // The same key for another query: refused, nothing saved.
    let mut other = user.ws(TRANSPORT_WS).await;
    other
        .subscribe(
            CHAT,
            json!({ "input": { "query": "something else", "clientMessageId": "send-1_A" } }),
        )
        .await;
    assert_eq!(
        error_code(&other.collect().await.expect_err("refused")),
        "CONFLICT"
    );
    // Retried after the end, from a stored turn: the same answer again.
    let again = crate::chat::chat(&user, TRANSPORT_WS, input.clone()).await;
    assert_eq!(again.last(), replayed.last());

    let state = active(&user, &conversation).await;
    assert_eq!(
        state["messageCount"], 2,
        "one question, one answer: {state}"
    );
    let question = &state["messages"]["edges"][0]["node"];
    assert_eq!(question["clientMessageId"], "send-1_A");
    assert_eq!(
        app.dify.requests_to("/chat-messages").len(),
        1,
        "one Dify request"
    );
    let next = json!({ "query": "next", "clientMessageId": "send-2" });
    check_shape(&crate::chat::chat(&user, TRANSPORT_WS, next).await);
    let mut over = user.ws(TRANSPORT_WS).await;
    over.subscribe(CHAT, json!({ "input": { "query": "third" } }))
        .await;
    let errors = over.collect().await.expect_err("over the limit");
    assert_eq!(error_code(&errors), "RATE_LIMITED", "the limit holds");

    for bad in ["", "has space", &"x".repeat(65), "ünïcode"] {
        let mut ws = user.ws(TRANSPORT_WS).await;
        ws.subscribe(
            CHAT,
            json!({ "input": { "query": "q", "clientMessageId": bad } }),
        )
        .await;
        let errors = ws.collect().await.expect_err("refused");
        assert_eq!(error_code(&errors), "BAD_USER_INPUT", "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sends_racing_with_one_key_make_one_turn() {
    let app = spawn(|_| {}).await;
    let user = user(&app).await;
    app.dify.push(Script::Long {
        deltas: 30,
        pause: Duration::from_millis(5),
    });
    let input = json!({ "query": "raced", "clientMessageId": "race" });
    let send = || crate::chat::chat(&user, TRANSPORT_WS, input.clone());
    let (a, b) = tokio::join!(send(), send());
    assert_eq!(a[0]["messageId"], b[0]["messageId"]);
    assert_eq!(answer_of(&a), words(30));
    assert_eq!(answer_of(&b), words(30));
    assert_eq!(app.dify.requests_to("/chat-messages").len(), 1);
    let count = app
        .sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages")
        .await;
    assert_eq!(count, ["2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_streaming_in_another_gateway_is_followed_through_its_stored_row() {
    let app = spawn(|_| {}).await;
    let user = user(&app).await;
    // A turn saved by another gateway: its answer streams there, 7 events written so far.
    let (conversation, question, answer) = (
        uuid::Uuid::now_v7().simple().to_string(),
        uuid::Uuid::now_v7().simple().to_string(),
        uuid::Uuid::now_v7().simple().to_string(),
    );
    let owner = user.id.replace('-', "");
    app.sql(&format!(
        "INSERT INTO conversations (id, user_id, title, is_archived, is_pinned, message_count, \
         created_at, updated_at) VALUES (UNHEX('{conversation}'), UNHEX('{owner}'), 't', 0, 0, \
         2, NOW(6), NOW(6))"
    ))
    .await;
    app.sql(&format!(
        "INSERT INTO messages (id, conversation_id, role, content, status, created_at, \
         updated_at, last_seq) VALUES \
         (UNHEX('{question}'), UNHEX('{conversation}'), 'USER', 'q', 'COMPLETED', NOW(6), NOW(6), NULL), \
         (UNHEX('{answer}'), UNHEX('{conversation}'), 'ASSISTANT', 'so far', 'STREAMING', NOW(6), NOW(6), 7)"
    ))
    .await;
    let id = uuid::Uuid::parse_str(&answer).unwrap().to_string();
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(RESUME, json!({ "id": id, "after": 2 })).await;
    let OpMessage::Next(first) = ws.next_op().await else {
        panic!("no event")
    };
    assert!(first["data"]["resumeChat"].is_object(), "{first}");
    let first = [first["data"]["resumeChat"].clone()];
    assert_eq!(first[0]["__typename"], "ChatSnapshot");
    assert_eq!(first[0]["seq"], 7);
    assert_eq!(first[0]["message"]["content"], "so far");
    // The other gateway writes more, then ends the answer with its 12th event.
    app.sql(&format!(
        "UPDATE messages SET content = 'so far and more', last_seq = 9 WHERE id = UNHEX('{answer}')"
    ))
    .await;
    let second = take(&mut ws, "resumeChat", 1).await;
    assert_eq!(second[0]["seq"], 9);
    assert_eq!(second[0]["message"]["content"], "so far and more");
    app.sql(&format!(
        "UPDATE messages SET content = 'so far and more, done', status = 'COMPLETED', \
         last_seq = 12 WHERE id = UNHEX('{answer}')"
    ))
    .await;
    let end = rest(&mut ws, "resumeChat").await;
    assert_eq!(seqs(&end), [11, 12]);
    assert_eq!(end[1]["__typename"], "ChatCompleted");
    assert_eq!(end[1]["message"]["content"], "so far and more, done");
    wait_for_status(&app, &id, "COMPLETED").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_unique_key_decides_between_two_turns_racing_with_one_client_message_id() {
    use rechat::chat::db::{BeginError, Chosen, Starter};
    let app = spawn(|_| {}).await;
    let user = user(&app).await;
    let default_app = app
        .app
        .apps()
        .await
        .unwrap()
        .default_app()
        .unwrap()
        .record
        .id;
    let session = app.app.keys.verify(user.token.as_deref().unwrap()).unwrap();
    let starter = Starter {
        owner: session.user,
        token_version: session.token_version,
        default_quota: None,
        gateway: app.app.gateway,
    };
    let choose = |_| {
        Ok(Chosen {
            app: default_app,
            question_files: None,
        })
    };
    // Both past their check before either is saved (in one batch, or one after the other).
    let turns = &app.app.turns;
    let (first, second) = tokio::join!(
        turns.begin(starter, None, "q", Some("k"), choose),
        turns.begin(starter, None, "q", Some("k"), choose),
    );
    let (won, lost) = match (first, second) {
        (Ok(turn), Err(error)) | (Err(error), Ok(turn)) => (turn, error),
        other => panic!("one turn must win: {other:?}"),
    };
    match lost {
        BeginError::ClientMessageIdTaken => {}
        BeginError::Replay { answer, same_query } => {
            assert_eq!(answer, won.2.id);
            assert!(same_query);
        }
        other => panic!("{other:?}"),
    }
    // Sent again afterwards: the winner's answer, and whether the query matches.
    for (query, same) in [("q", true), ("another", false)] {
        match turns.begin(starter, None, query, Some("k"), choose).await {
            Err(BeginError::Replay { answer, same_query }) => {
                assert_eq!((answer, same_query), (won.2.id, same));
            }
            other => panic!("{other:?}"),
        }
    }
    // The key is per user: someone else may use it.
    let other = app.register("other@example.com").await;
    let session = app
        .app
        .keys
        .verify(other.token.as_deref().unwrap())
        .unwrap();
    let starter = Starter {
        owner: session.user,
        ..starter
    };
    assert!(
        turns
            .begin(starter, None, "q", Some("k"), choose)
            .await
            .is_ok()
    );
    let count = app
        .sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages")
        .await;
    assert_eq!(count, ["4"], "two turns of two messages");
}
