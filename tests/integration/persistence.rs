//! Write-behind persistence: the writer batches every live answer into a few statements, a
//! frozen database delays no delta, and the answer is stored whole once the database is back.

use std::time::Duration;

use rechat::chat::db::{Chosen, Starter};
use rechat::conversations::domain::MessageId;
use rechat::dify::events::Ids;
use serde_json::json;
use tokio::time::Instant;

use crate::chat::CHAT;
use crate::harness::fake_dify::Script;
use crate::harness::proxy::FreezableProxy;
use crate::harness::ws::{OpMessage, TRANSPORT_WS, WsClient};
use crate::harness::{TestApp, db::server_url};

#[tokio::test(flavor = "multi_thread")]
async fn the_writer_batches_every_live_answer_into_a_few_statements() {
    // No background tick: this test drives the writer by hand.
    let app = TestApp::spawn_with(|c| c.flush_interval = Duration::from_secs(3600)).await;
    let (starter, chosen) = starter(&app, "writer@example.com").await;
    let mut answers = Vec::new();
    for i in 0..600 {
        let chosen = chosen.clone();
        let (conversation, _, answer) = app
            .app
            .turns
            .begin(starter, None, &format!("question {i}"), None, |_| {
                Ok(chosen)
            })
            .await
            .unwrap();
        answers.push((conversation.id, answer.id));
    }

    let writer = &app.app.writer;
    let statements = || app.app.metrics.writer_statements.get();
    let before = statements();
    for (i, (conversation, answer)) in answers.iter().enumerate() {
        writer.partial(*answer, format!("old {i}"), 2);
        writer.partial(*answer, format!("partial {i}"), 3); // the newer content replaces the older
        let ids = Ids {
            conversation_id: Some(format!("dify-conversation-{i}")),
            message_id: Some(format!("dify-message-{i}")),
            task_id: Some(format!("dify-task-{i}")),
            workflow_run_id: None,
        };
        writer.ids(*answer, &ids, Some(*conversation));
    }
    writer.flush().await.unwrap();
    // 600 rows per table in chunks of 500: two statements for each of the three kinds of row.
    assert_eq!(statements() - before, 6);
    assert_eq!(
        first(&app, "SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages WHERE content LIKE 'partial %' AND last_seq = 3 AND dify_task_id LIKE 'dify-task-%'").await,
        "600"
    );
    assert_eq!(
        first(&app, "SELECT CAST(COUNT(*) AS CHAR) AS value FROM conversations WHERE dify_conversation_id LIKE 'dify-conversation-%'").await,
        "600"
    );
    // Nothing pending: the next flush writes nothing.
    writer.flush().await.unwrap();
    assert_eq!(statements() - before, 6);

    // Heartbeats: one statement per 500 live answers.
    let live: Vec<MessageId> = answers.iter().map(|(_, a)| *a).collect();
    app.sql("UPDATE messages SET updated_at = '2020-01-01 00:00:00'")
        .await;
    writer.heartbeat(&live).await.unwrap();
    assert_eq!(statements() - before, 8);
    assert_eq!(
        first(&app, "SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages WHERE status = 'STREAMING' AND updated_at > '2020-01-02'").await,
        "600"
    );

    // A late partial never overwrites an answer that has ended.
    let (_, ended) = answers[0];
    app.sql(&format!(
        "UPDATE messages SET status = 'COMPLETED', content = 'final' WHERE id = UNHEX('{}')",
        ended.0.simple()
    ))
    .await;
    writer.partial(ended, "late".into(), 9);
    writer.flush().await.unwrap();
    assert_eq!(
        first(
            &app,
            "SELECT content AS value FROM messages WHERE content IN ('final', 'late')"
        )
        .await,
        "final"
    );
}

/// The one who starts turns in `app`'s tests, on its default app.
async fn starter(app: &TestApp, email: &str) -> (Starter, Chosen) {
    let user = app.register(email).await;
    app.configure_dify(&user, "chat").await;
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
    let chosen = Chosen {
        app: default_app,
        question_files: None,
    };
    (starter, chosen)
}

#[tokio::test(flavor = "multi_thread")]
async fn first_turns_are_saved_in_batches_and_a_refused_one_fails_alone() {
    use rechat::chat::db::BeginError;
    let app = TestApp::spawn().await;
    let (starter, chosen) = starter(&app, "batches@example.com").await;
    // 40 new conversations at once; the first two share a clientMessageId.
    let begins = (0..40).map(|i| {
        let key = (i < 2).then_some("dup");
        let chosen = chosen.clone();
        let query = format!("question {i}");
        let turns = &app.app.turns;
        async move {
            turns
                .begin(starter, None, &query, key, move |_| Ok(chosen))
                .await
        }
    });
    let outcomes = futures::future::join_all(begins).await;
    assert!(outcomes[2..].iter().all(Result::is_ok), "{outcomes:?}");
    match (&outcomes[0], &outcomes[1]) {
        (Ok(_), Err(lost)) | (Err(lost), Ok(_)) => assert!(
            matches!(
                lost,
                BeginError::ClientMessageIdTaken | BeginError::Replay { .. }
            ),
            "{lost:?}"
        ),
        other => panic!("one of the two must win: {other:?}"),
    }
    let count = |sql| first(&app, sql);
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS CHAR) AS value FROM conversations").await,
        "39"
    );
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages").await,
        "78"
    );
    // Fewer transactions than turns: turns handed over during a save wait for the next one.
    let metrics = app.get_text("/metrics").await;
    let batches: u32 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("rechat_turn_save_batch_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!((1..40).contains(&batches), "{batches} batches for 40 turns");
}

#[tokio::test(flavor = "multi_thread")]
async fn final_writes_are_batched_and_a_refused_one_fails_alone() {
    use rechat::chat::db::FinalAnswer;
    use rechat::conversations::domain::MessageStatus;
    let app = TestApp::spawn().await;
    let (starter, chosen) = starter(&app, "finals@example.com").await;
    let mut turns = Vec::new();
    for i in 0..30 {
        let chosen = chosen.clone();
        let (conversation, _, answer) = app
            .app
            .turns
            .begin(starter, None, &format!("question {i}"), None, |_| {
                Ok(chosen)
            })
            .await
            .unwrap();
        turns.push((conversation.id, answer.id));
    }
    // 30 answers end at once; one carries a Dify task id longer than its column.
    let writes = turns.iter().enumerate().map(|(i, (conversation, answer))| {
        app.app.finals.write(std::sync::Arc::new(FinalAnswer {
            id: *answer,
            conversation: *conversation,
            content: format!("answer {i}"),
            last_seq: 3,
            status: MessageStatus::Completed,
            error: None,
            usage: None,
            retriever_resources: None,
            agent_thoughts: None,
            files: None,
            dify_message_id: Some(format!("dify-message-{i}")),
            dify_task_id: Some(if i == 7 {
                "x".repeat(65)
            } else {
                format!("task-{i}")
            }),
            dify_workflow_run_id: None,
            dify_conversation_id: Some(format!("dify-conversation-{i}")),
            tokens: 0,
        }))
    });
    let written = futures::future::join_all(writes).await;
    for (i, written) in written.iter().enumerate() {
        match written {
            Err(_) if i == 7 => {}
            Ok(Some(stored)) if i != 7 => assert_eq!(stored.status, MessageStatus::Completed),
            other => panic!("answer {i}: {other:?}"),
        }
    }
    let count = |sql| first(&app, sql);
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages WHERE status = 'COMPLETED' AND content = CONCAT('answer ', SUBSTRING(dify_task_id, 6)) AND last_seq = 3").await,
        "29"
    );
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS CHAR) AS value FROM conversations WHERE dify_conversation_id LIKE 'dify-conversation-%'").await,
        "29"
    );
    let metrics = app.get_text("/metrics").await;
    let batches: u32 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("rechat_final_write_batch_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(
        (1..30).contains(&batches),
        "{batches} batches for 30 answers"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_first_turn_that_cannot_be_saved_is_refused_as_unavailable_and_leaves_nothing() {
    use rechat::chat::db::BeginError;
    let (proxy, app) = behind_proxy(|_| {}).await;
    let (starter, chosen) = starter(&app, "cut@example.com").await;
    // MySQL goes away once the turn is checked: its save fails at once, and says so.
    let began = app
        .app
        .turns
        .begin(starter, None, "anyone?", None, |_| {
            proxy.cut();
            Ok(chosen)
        })
        .await;
    assert!(matches!(began, Err(BeginError::Unavailable)), "{began:?}");
    proxy.restore();
    assert_eq!(
        first(&app, "SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages").await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_whose_chat_went_away_during_its_save_is_not_left_streaming() {
    let (proxy, app) = behind_proxy(|_| {}).await;
    let (starter, chosen) = starter(&app, "gone@example.com").await;
    // The database freezes once the turn is checked: its save hangs, and the chat gives up.
    let begin = app.app.turns.begin(starter, None, "anyone?", None, |_| {
        proxy.freeze();
        Ok(chosen)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), begin)
            .await
            .is_err()
    );
    proxy.thaw();
    // Saved once the database is back, with no relay to stream it: INTERRUPTED at once, not
    // STREAMING until the sweeper finds it stale.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = app
            .sql_strings("SELECT status AS value FROM messages WHERE role = 'ASSISTANT'")
            .await;
        if status == ["INTERRUPTED"] {
            break;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_database_delays_no_delta_and_loses_no_answer() {
    let (proxy, app) = behind_proxy(|_| {}).await;
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    app.dify.push(Script::Long {
        deltas: 60,
        pause: Duration::from_millis(50),
    });
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "a long answer" } }))
        .await;
    let mut deltas = 0;
    let mut longest_gap_frozen = Duration::ZERO;
    let mut last = Instant::now();
    let message = loop {
        let next = tokio::time::timeout(Duration::from_millis(1500), ws.next_op()).await;
        let Ok(OpMessage::Next(payload)) = next else {
            // Silence: Dify is done and the final write waits for the database.
            assert_eq!(
                deltas, 60,
                "only the terminal event may wait for the database"
            );
            proxy.thaw();
            let OpMessage::Next(payload) = ws.next_op().await else {
                panic!("no terminal event after the thaw")
            };
            break payload["data"]["chat"].clone();
        };
        let event = payload["data"]["chat"].clone();
        match event["__typename"].as_str().unwrap() {
            "AnswerDelta" => {
                deltas += 1;
                if deltas > 10 {
                    longest_gap_frozen = longest_gap_frozen.max(last.elapsed());
                }
                if deltas == 10 {
                    proxy.freeze();
                }
                last = Instant::now();
            }
            "ChatCompleted" | "ChatFailed" => panic!("terminal event while frozen: {event}"),
            _ => {}
        }
    };
    // Dify paces deltas 50 ms apart; a relay that waited on the database would show seconds.
    assert!(
        longest_gap_frozen < Duration::from_millis(1000),
        "a delta waited {longest_gap_frozen:?} while the database was frozen"
    );
    assert_eq!(message["__typename"], "ChatCompleted", "{message}");
    assert_eq!(message["message"]["status"], "COMPLETED");
    let content = message["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 60);
    let stored = app
        .sql_strings("SELECT content AS value FROM messages WHERE role = 'ASSISTANT'")
        .await;
    assert_eq!(stored, [content]);

    // What happened shows on /metrics.
    let metrics = app.get_text("/metrics").await;
    for line in [
        "rechat_deltas_relayed_total 60",
        "rechat_answers_total{outcome=\"completed\"} 1",
        "rechat_active_streams 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(metrics.contains("rechat_relay_seconds_bucket"));
    assert!(metrics.contains("rechat_writer_lag_seconds_count"));
}

/// A freeze longer than a lease lets every gateway's lease lapse at once. When the database
/// returns, neither the relaying gateway nor another one marks the live answer INTERRUPTED:
/// a gateway never judges its own lease, and judges others' only after reaching the database
/// for a whole lease.
#[tokio::test(flavor = "multi_thread")]
async fn a_freeze_longer_than_a_lease_interrupts_no_live_answer() {
    const LEASE: Duration = Duration::from_secs(1);
    let (proxy, a) = behind_proxy(|c| c.gateway_lease = LEASE).await;
    rechat::chat::spawn_sweeper(a.app.clone());
    // A second gateway on the same database, behind the same proxy, sweeping too.
    let b = rechat::App::build(a.app.config.clone())
        .await
        .expect("gateway B");
    rechat::chat::spawn_sweeper(b.clone());
    let (admin, user) = a.admin_and_user().await;
    a.configure_dify(&admin, "chat").await;
    a.dify.push(Script::Long {
        deltas: 160,
        pause: Duration::from_millis(50),
    });
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "a long answer" } }))
        .await;
    // The client reads all along (a client that stops reading is closed after two pings).
    let mut events = Vec::new();
    let mut read_for = async |ws: &mut WsClient, time: Duration| {
        let until = Instant::now() + time;
        while let Ok(message) = tokio::time::timeout_at(until, ws.next_op()).await {
            let OpMessage::Next(payload) = message else {
                panic!("the stream ended early: {events:?}")
            };
            events.push(payload["data"]["chat"].clone());
        }
    };
    // Both sweepers have looked at the leases by now (every quarter of a lease).
    read_for(&mut ws, LEASE * 2).await;
    proxy.freeze();
    read_for(&mut ws, LEASE * 3).await;
    proxy.thaw();
    // Several sweeps of both gateways after the thaw, while Dify still streams.
    read_for(&mut ws, LEASE * 3 / 2).await;
    let status = "SELECT status AS value FROM messages WHERE role = 'ASSISTANT'";
    assert_eq!(a.sql_strings(status).await, ["STREAMING"]);
    let rest = ws.collect().await.expect("the answer's events");
    events.extend(rest.iter().map(|payload| payload["data"]["chat"].clone()));
    let done = events.last().unwrap();
    assert_eq!(done["__typename"], "ChatCompleted", "{done}");
    let content = done["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 160);
    assert_eq!(a.sql_strings(status).await, ["COMPLETED"]);
}

async fn first(app: &TestApp, sql: &str) -> String {
    app.sql_strings(sql).await.remove(0)
}

/// A gateway whose MySQL connections go through a proxy the test controls.
async fn behind_proxy(adjust: impl FnOnce(&mut rechat::Config)) -> (FreezableProxy, TestApp) {
    let upstream = url::Url::parse(&server_url()).unwrap();
    let proxy = FreezableProxy::start(format!(
        "{}:{}",
        upstream.host_str().unwrap(),
        upstream.port().unwrap_or(3306)
    ))
    .await;
    let app = TestApp::spawn_with(|c| {
        let _ = c.database_url.set_ip_host(proxy.addr.ip());
        let _ = c.database_url.set_port(Some(proxy.addr.port()));
        // mysql_async would otherwise switch to MariaDB's Unix socket, around the proxy.
        c.database_url.set_query(Some("prefer_socket=false"));
        adjust(c);
    })
    .await;
    (proxy, app)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_is_service_unavailable_and_passes() {
    let (proxy, app) = behind_proxy(|_| {}).await;
    let user = app.register("outage@example.com").await;
    let user_id = rechat::users::domain::UserId::parse("id", &user.id).unwrap();
    let list = "query { conversations { totalCount } }";
    let login = r#"mutation { login(input: { email: "outage@example.com", password: "correct horse battery" }) { token } }"#;
    let post = |token: Option<String>, query: &'static str| {
        let mut request = app
            .http
            .post(app.url("/graphql"))
            .json(&json!({ "query": query }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };

    proxy.cut();
    for (token, query) in [(user.token.clone(), list), (None, login)] {
        let (status, body) = post(token, query).await;
        assert_eq!(status, 503, "{query}: {body}");
        assert_eq!(crate::harness::error_code(&body), "SERVICE_UNAVAILABLE");
    }
    // A socket whose token cannot be checked is closed as the server's failure, not the client's.
    app.app.accounts.forget(user_id);
    let refused = crate::harness::WsClient::connect(
        &app.ws_url(),
        TRANSPORT_WS,
        Some(json!({ "token": user.token })),
    )
    .await
    .err()
    .expect("no ack while the database is down");
    assert!(refused.starts_with("close 1011"), "{refused}");

    // Back: the pool replaces its dead connections and nothing else is needed.
    proxy.restore();
    let (status, body) = post(user.token.clone(), list).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["conversations"]["totalCount"], 0);
    let (status, body) = post(None, login).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_that_cannot_be_saved_ends_not_saved() {
    // The final write is retried for as long as the sweep would leave the answer alone.
    let (proxy, app) = behind_proxy(|c| c.stale_stream_after = Duration::from_secs(2)).await;
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    app.dify.push(Script::Long {
        deltas: 20,
        pause: Duration::from_millis(20),
    });
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "unlucky" } }))
        .await;
    let mut deltas = 0;
    let terminal = loop {
        let OpMessage::Next(payload) = ws.next_op().await else {
            panic!("the subscription ended without a terminal event")
        };
        let event = payload["data"]["chat"].clone();
        match event["__typename"].as_str().unwrap() {
            "AnswerDelta" => {
                deltas += 1;
                if deltas == 5 {
                    proxy.cut();
                }
            }
            "ChatCompleted" | "ChatFailed" => break event,
            _ => {}
        }
    };
    proxy.restore();
    assert_eq!(deltas, 20, "the answer kept streaming without the database");
    assert_eq!(terminal["__typename"], "ChatFailed", "{terminal}");
    assert_eq!(terminal["error"]["code"], "not_saved");
    assert_eq!(terminal["message"]["status"], "FAILED");
    assert_eq!(
        terminal["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        20,
        "the client still gets the whole answer"
    );
    let metrics = app.get_text("/metrics").await;
    assert!(metrics.contains("rechat_answers_total{outcome=\"not_saved\"} 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_database_fails_operations_in_time_instead_of_hanging() {
    // Tests give operations 2 s (30 s in production).
    let (proxy, app) = behind_proxy(|_| {}).await;
    let admin = app.register("frozen@example.com").await;
    app.configure_dify(&admin, "chat").await;
    let mut ws = admin.ws(TRANSPORT_WS).await;
    proxy.freeze();
    let started = Instant::now();
    let answer = app
        .http
        .post(app.url("/graphql"))
        .bearer_auth(admin.token.as_deref().unwrap())
        .json(&json!({ "query": "{ conversations { totalCount } }" }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 503);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        crate::harness::error_code(&body),
        "SERVICE_UNAVAILABLE",
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );

    // A chat's start: refused in time, and nothing reaches Dify.
    let started = Instant::now();
    ws.subscribe(CHAT, json!({ "input": { "query": "anyone there?" } }))
        .await;
    assert_eq!(ws.refused_code().await, "SERVICE_UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(app.dify.requests_to("/chat-messages").is_empty());

    proxy.thaw();
    let events = crate::chat::chat(&admin, TRANSPORT_WS, json!({ "query": "and now?" })).await;
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
}
