use std::time::Duration;

use serde_json::{Value, json};

use crate::chat::chat;
use crate::harness::fake_dify::Script;
use crate::harness::ws::{OpMessage, TRANSPORT_WS};
use crate::harness::{Actor, TestApp, error_code};

const LIST: &str = "query($first: Int, $after: String, $archived: Boolean, $search: String) {
  conversations(first: $first, after: $after, archived: $archived, search: $search) {
    totalCount
    edges { cursor node { id title isPinned isArchived messageCount updatedAt } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
  } }";

fn hex(id: &str) -> String {
    id.replace('-', "")
}

/// Inserts `count` conversations for a user straight into MySQL (each with two messages), the
/// newest last; returns their ids, oldest activity first.
async fn seed(
    app: &TestApp,
    user: &Actor<'_>,
    count: usize,
    title: impl Fn(usize) -> String,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        let id = uuid::Uuid::now_v7().to_string();
        let at = format!("UTC_TIMESTAMP(6) - INTERVAL {} SECOND", 10_000 - i);
        app.sql(&format!(
            "INSERT INTO conversations (id, user_id, title, message_count, created_at, updated_at) VALUES \
             (UNHEX('{}'), UNHEX('{}'), '{}', 2, {at}, {at})",
            hex(&id),
            hex(&user.id),
            title(i)
        ))
        .await;
        for (role, content) in [
            ("USER", format!("question {i}")),
            ("ASSISTANT", format!("answer number {i}")),
        ] {
            app.sql(&format!(
                "INSERT INTO messages (id, conversation_id, role, content, status, created_at, updated_at) VALUES \
                 (UNHEX('{}'), UNHEX('{}'), '{role}', '{content}', 'COMPLETED', {at}, {at})",
                hex(&uuid::Uuid::now_v7().to_string()),
                hex(&id)
            ))
            .await;
        }
        ids.push(id);
    }
    ids
}

async fn list(user: &Actor<'_>, variables: Value) -> Value {
    let answer = user.gql(LIST, variables).await;
    assert!(answer["errors"].is_null(), "{answer}");
    answer["data"]["conversations"].clone()
}

fn ids_of(page: &Value) -> Vec<String> {
    page["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every id of the default list, page by page.
async fn walk(user: &Actor<'_>, first: i64) -> Vec<String> {
    let mut all = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = list(user, json!({ "first": first, "after": after })).await;
        all.extend(ids_of(&page));
        if page["pageInfo"]["hasNextPage"] == false {
            return all;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_walk_the_list_in_activity_order() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    let empty = list(&user, json!({})).await;
    assert_eq!(empty["totalCount"], 0);
    assert_eq!(empty["edges"], json!([]));
    assert_eq!(empty["pageInfo"]["hasNextPage"], false);
    assert!(empty["pageInfo"]["endCursor"].is_null());

    let mut ids = seed(&app, &user, 45, |i| format!("talk {i}")).await;
    ids.reverse(); // newest activity first
    assert_eq!(walk(&user, 20).await, ids);
    assert_eq!(walk(&user, 7).await, ids);
    let one_page = list(&user, json!({ "first": 45 })).await;
    assert_eq!(one_page["totalCount"], 45);
    assert_eq!(one_page["pageInfo"]["hasNextPage"], false);
    let default_page = list(&user, json!({})).await;
    assert_eq!(ids_of(&default_page).len(), 20);
    assert_eq!(default_page["pageInfo"]["hasNextPage"], true);

    for variables in [
        json!({ "first": 0 }),
        json!({ "first": 101 }),
        json!({ "after": "bogus" }),
        json!({ "after": "eyJ4IjoxfQ" }),
    ] {
        let answer = user.gql(LIST, variables.clone()).await;
        assert_eq!(error_code(&answer), "BAD_USER_INPUT", "{variables}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cursors_stay_correct_after_deletions_and_new_activity() {
    let app = TestApp::spawn().await;
    let user = chat_user(&app).await;
    let mut ids = seed(&app, &user, 30, |i| format!("talk {i}")).await;
    ids.reverse();
    let first = list(&user, json!({ "first": 10 })).await;
    assert_eq!(ids_of(&first), ids[..10]);
    // The cursor's own conversation is deleted, and an old one gets a new message.
    let deleted = user
        .gql(
            "mutation($id: ID!) { deleteConversation(id: $id) }",
            json!({ "id": ids[9] }),
        )
        .await;
    assert_eq!(deleted["data"]["deleteConversation"], ids[9].as_str());
    let revived = &ids[25];
    let events = chat(
        &user,
        TRANSPORT_WS,
        json!({ "conversationId": revived, "query": "back again" }),
    )
    .await;
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");

    let second = list(
        &user,
        json!({ "first": 10, "after": first["pageInfo"]["endCursor"] }),
    )
    .await;
    assert_eq!(
        ids_of(&second),
        ids[10..20],
        "continues right after the deleted cursor"
    );
    assert_eq!(second["pageInfo"]["hasPreviousPage"], true);
    let top = list(&user, json!({ "first": 1 })).await;
    assert_eq!(
        ids_of(&top),
        std::slice::from_ref(revived),
        "new activity moves a conversation to the top"
    );
    assert_eq!(top["edges"][0]["node"]["messageCount"], 4);
    assert_eq!(top["totalCount"], 29);
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_come_first_and_archived_only_on_request() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    let ids = seed(&app, &user, 5, |i| format!("talk {i}")).await; // ids[4] is the newest
    const UPDATE: &str = "mutation($id: ID!, $input: UpdateConversationInput!) { updateConversation(id: $id, input: $input) { id isPinned isArchived } }";
    user.gql(
        UPDATE,
        json!({ "id": ids[0], "input": { "isPinned": true } }),
    )
    .await;
    let archived = user
        .gql(
            UPDATE,
            json!({ "id": ids[3], "input": { "isArchived": true } }),
        )
        .await;
    assert_eq!(archived["data"]["updateConversation"]["isArchived"], true);

    let page = list(&user, json!({})).await;
    assert_eq!(
        ids_of(&page),
        [
            ids[0].clone(),
            ids[4].clone(),
            ids[2].clone(),
            ids[1].clone()
        ]
    );
    assert_eq!(page["totalCount"], 4);
    assert_eq!(page["edges"][0]["node"]["isPinned"], true);
    let only_archived = list(&user, json!({ "archived": true })).await;
    assert_eq!(ids_of(&only_archived), [ids[3].clone()]);
    assert_eq!(
        walk(&user, 1).await,
        ids_of(&page),
        "paging through the pin boundary"
    );

    user.gql(
        UPDATE,
        json!({ "id": ids[3], "input": { "isArchived": false } }),
    )
    .await;
    user.gql(
        UPDATE,
        json!({ "id": ids[0], "input": { "isPinned": false } }),
    )
    .await;
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(ids_of(&list(&user, json!({})).await), expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn search_finds_titles_and_message_bodies() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    let other = app.register("bob@example.com").await;
    let ids = seed(&app, &user, 4, |i| {
        [
            "Holiday plans",
            "年假 policy",
            "Quarterly 100% report",
            "misc",
        ][i]
            .to_owned()
    })
    .await;
    seed(&app, &other, 2, |_| "Holiday plans too".to_owned()).await;
    let search = |term: &str| list(&user, json!({ "search": term }));

    assert_eq!(
        ids_of(&search("holiday").await),
        [ids[0].clone()],
        "case-insensitive title match, own only"
    );
    assert_eq!(ids_of(&search("年假").await), [ids[1].clone()]);
    assert_eq!(
        ids_of(&search("ANSWER NUMBER 3").await),
        [ids[3].clone()],
        "matches message bodies"
    );
    assert_eq!(
        search("100%").await["totalCount"],
        1,
        "LIKE wildcards are literal"
    );
    assert_eq!(search("_").await["totalCount"], 0);
    assert_eq!(
        search("   ").await["totalCount"],
        4,
        "blank search lists all"
    );
    assert_eq!(
        error_code(&user.gql(LIST, json!({ "search": "x".repeat(201) })).await),
        "BAD_USER_INPUT"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_page_forward_and_backward() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    let conversation = seed(&app, &user, 1, |_| "long".into()).await.remove(0);
    for i in 2..25 {
        let at = format!("UTC_TIMESTAMP(6) + INTERVAL {i} SECOND");
        app.sql(&format!(
            "INSERT INTO messages (id, conversation_id, role, content, status, created_at, updated_at) VALUES \
             (UNHEX('{}'), UNHEX('{}'), 'USER', 'message {i}', 'COMPLETED', {at}, {at})",
            hex(&uuid::Uuid::now_v7().to_string()),
            hex(&conversation)
        ))
        .await;
    }
    app.sql(&format!(
        "UPDATE conversations SET message_count = 25 WHERE id = UNHEX('{}')",
        hex(&conversation)
    ))
    .await;
    const MESSAGES: &str = "query($c: ID!, $first: Int, $after: String, $last: Int, $before: String) {
      messages(conversationId: $c, first: $first, after: $after, last: $last, before: $before) {
        totalCount nodes { content } pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";
    let page = |v: Value| {
        let mut v = v;
        v["c"] = json!(conversation);
        user.gql(MESSAGES, v)
    };
    let contents = |p: &Value| -> Vec<String> {
        p["data"]["messages"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["content"].as_str().unwrap().to_owned())
            .collect()
    };
    let all: Vec<String> = ["question 0".to_owned(), "answer number 0".to_owned()]
        .into_iter()
        .chain((2..25).map(|i| format!("message {i}")))
        .collect();

    let first = page(json!({ "first": 10 })).await;
    assert_eq!(contents(&first), all[..10]);
    assert_eq!(first["data"]["messages"]["totalCount"], 25);
    let next =
        page(json!({ "first": 10, "after": first["data"]["messages"]["pageInfo"]["endCursor"] }))
            .await;
    assert_eq!(contents(&next), all[10..20]);
    let newest = page(json!({ "last": 10 })).await;
    assert_eq!(
        contents(&newest),
        all[15..],
        "last: the newest, still oldest first"
    );
    assert_eq!(
        newest["data"]["messages"]["pageInfo"]["hasPreviousPage"],
        true
    );
    assert_eq!(newest["data"]["messages"]["pageInfo"]["hasNextPage"], false);
    let older = page(
        json!({ "last": 10, "before": newest["data"]["messages"]["pageInfo"]["startCursor"] }),
    )
    .await;
    assert_eq!(contents(&older), all[5..15]);
    let oldest =
        page(json!({ "last": 10, "before": older["data"]["messages"]["pageInfo"]["startCursor"] }))
            .await;
    assert_eq!(contents(&oldest), all[..5]);
    assert_eq!(
        oldest["data"]["messages"]["pageInfo"]["hasPreviousPage"],
        false
    );

    for bad in [
        json!({ "first": 1, "last": 1 }),
        json!({ "last": 1, "after": "x" }),
        json!({ "first": 1, "before": "x" }),
        json!({ "after": "bogus" }),
        json!({ "last": 0 }),
    ] {
        assert_eq!(
            error_code(&page(bad.clone()).await),
            "BAD_USER_INPUT",
            "{bad}"
        );
    }
    // The same pages through the nested field.
    let nested = user
        .gql(
            "query($id: ID!) { conversation(id: $id) { messages(last: 2) { nodes { content } } } }",
            json!({ "id": conversation }),
        )
        .await;
    assert_eq!(
        nested["data"]["conversation"]["messages"]["nodes"],
        json!([{ "content": "message 23" }, { "content": "message 24" }])
    );
}

/// Registers an admin (who sets the fake Dify) and returns a second, ordinary user.
async fn chat_user(app: &TestApp) -> Actor<'_> {
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    user
}

#[tokio::test(flavor = "multi_thread")]
async fn rename_reaches_dify_and_survives_its_failure() {
    let app = TestApp::spawn().await;
    let user = chat_user(&app).await;
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "first question" })).await;
    let id = events[0]["conversation"]["id"].as_str().unwrap().to_owned();
    const RENAME: &str = "mutation($id: ID!, $title: String) { updateConversation(id: $id, input: { title: $title }) { title updatedAt } }";
    let renamed = user
        .gql(RENAME, json!({ "id": id, "title": "  Leave questions  " }))
        .await;
    assert_eq!(
        renamed["data"]["updateConversation"]["title"],
        "Leave questions"
    );
    let call = &app.dify.requests_to("/name")[0];
    assert_eq!(call.body["name"], "Leave questions");
    assert_eq!(call.body["user"], format!("rechat-{}", user.id));
    let listed = list(&user, json!({})).await;
    assert_eq!(
        listed["edges"][0]["node"]["title"], "Leave questions",
        "the rename shows in the list"
    );

    app.dify.forget_conversations(); // Dify now answers 404
    let again = user
        .gql(RENAME, json!({ "id": id, "title": "Still renamed" }))
        .await;
    assert_eq!(
        again["data"]["updateConversation"]["title"],
        "Still renamed"
    );
    for bad in ["", "   ", &"x".repeat(256)] {
        assert_eq!(
            error_code(&user.gql(RENAME, json!({ "id": id, "title": bad })).await),
            "BAD_USER_INPUT"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_removes_everything_and_stops_a_running_answer() {
    let app = TestApp::spawn().await;
    let user = chat_user(&app).await;
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "to be deleted" })).await;
    let id = events[0]["conversation"]["id"].as_str().unwrap().to_owned();
    app.dify.push(Script::Long {
        deltas: 500,
        pause: Duration::from_millis(20),
    });
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(
        crate::chat::CHAT,
        json!({ "input": { "conversationId": id, "query": "keep talking" } }),
    )
    .await;
    for _ in 0..4 {
        assert!(matches!(ws.next_op().await, OpMessage::Next(_)));
    }

    let deleted = user
        .gql(
            "mutation($id: ID!) { deleteConversation(id: $id) }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(deleted["data"]["deleteConversation"], id.as_str());
    assert_eq!(
        app.dify.requests_to("/stop").len(),
        1,
        "the running answer was stopped first"
    );
    let dify_delete = app
        .dify
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE")
        .expect("deleted in Dify");
    assert_eq!(dify_delete.body["user"], format!("rechat-{}", user.id));
    let left = app.sql_strings(&format!(
        "SELECT CAST((SELECT COUNT(*) FROM conversations WHERE id = UNHEX('{0}')) + (SELECT COUNT(*) FROM messages WHERE conversation_id = UNHEX('{0}')) AS CHAR) AS value",
        hex(&id)
    ))
    .await;
    assert_eq!(left, ["0"]);
    assert!(
        user.gql(
            "query($id: ID!) { conversation(id: $id) { id } }",
            json!({ "id": id })
        )
        .await["data"]["conversation"]
            .is_null()
    );
    // The subscriber still gets a terminal event.
    let mut last = Value::Null;
    while let OpMessage::Next(payload) = ws.next_op().await {
        last = payload["data"]["chat"].clone();
    }
    assert_eq!(last["__typename"], "ChatCompleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_of_another_account_can_be_seen_or_touched() {
    let app = TestApp::spawn().await;
    let owner = chat_user(&app).await;
    let stranger = app.register("stranger@example.com").await;
    let events = chat(&owner, TRANSPORT_WS, json!({ "query": "private" })).await;
    let conversation = events[0]["conversation"]["id"].clone();
    let message = events.last().unwrap()["message"]["id"].clone();

    assert!(
        stranger
            .gql(
                "query($id: ID!) { conversation(id: $id) { id } }",
                json!({ "id": conversation })
            )
            .await["data"]["conversation"]
            .is_null()
    );
    assert!(
        stranger
            .gql(
                "query($id: ID!) { message(id: $id) { id } }",
                json!({ "id": message })
            )
            .await["data"]["message"]
            .is_null()
    );
    assert_eq!(list(&stranger, json!({})).await["totalCount"], 0);
    assert_eq!(
        list(&stranger, json!({ "search": "private" })).await["totalCount"],
        0
    );
    for (query, variables) in [
        (
            "query($id: ID!) { messages(conversationId: $id) { totalCount } }",
            json!({ "id": conversation }),
        ),
        (
            "mutation($id: ID!) { updateConversation(id: $id, input: { title: \"mine now\" }) { id } }",
            json!({ "id": conversation }),
        ),
        (
            "mutation($id: ID!) { updateConversation(id: $id, input: { isPinned: true }) { id } }",
            json!({ "id": conversation }),
        ),
        (
            "mutation($id: ID!) { deleteConversation(id: $id) }",
            json!({ "id": conversation }),
        ),
        (
            "mutation($id: ID!) { stopChat(messageId: $id) { id } }",
            json!({ "id": message }),
        ),
        (
            "mutation($id: ID!) { setMessageFeedback(messageId: $id, rating: LIKE) { id } }",
            json!({ "id": message }),
        ),
    ] {
        assert_eq!(
            error_code(&stranger.gql(query, variables).await),
            "NOT_FOUND",
            "{query}"
        );
    }
    for query in [
        "query { conversation(id: \"nope\") { id } }",
        "query { message(id: \"nope\") { id } }",
        "query { messages(conversationId: \"nope\") { totalCount } }",
        "mutation { updateConversation(id: \"nope\", input: {}) { id } }",
        "mutation { deleteConversation(id: \"nope\") }",
    ] {
        assert_eq!(
            error_code(&owner.gql(query, json!({})).await),
            "BAD_USER_INPUT",
            "{query}"
        );
    }
    let still = owner
        .gql(
            "query($id: ID!) { conversation(id: $id) { title isPinned messageCount } }",
            json!({ "id": conversation }),
        )
        .await;
    assert_eq!(
        still["data"]["conversation"],
        json!({ "title": "private", "isPinned": false, "messageCount": 2 })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_costs_the_same_queries_for_any_page_size() {
    // One connection, so the session's statement counter sees every query of a request.
    let app = TestApp::spawn_with(|config| config.db_pool_size = 1).await;
    let user = app.register("ada@example.com").await;
    seed(&app, &user, 40, |i| format!("talk {i}")).await;
    async fn questions(app: &TestApp) -> i64 {
        app.sql_strings("SELECT VARIABLE_VALUE AS value FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'QUESTIONS'")
            .await[0]
            .parse()
            .unwrap()
    }
    let mut costs = Vec::new();
    let user_id = rechat::users::domain::UserId::parse("id", &user.id).unwrap();
    for first in [2, 40] {
        // The token check reads the account each time, as it does when its cache is cold.
        app.app.accounts.forget(user_id);
        let before = questions(&app).await;
        let page = list(&user, json!({ "first": first })).await;
        assert_eq!(page["edges"].as_array().unwrap().len(), first as usize);
        costs.push(questions(&app).await - before);
    }
    assert_eq!(
        costs[0], costs[1],
        "messageCount and the page cost no query per conversation: {costs:?}"
    );
    // Token check, page and count, the pool's liveness check per checkout and the counter
    // read itself.
    assert!(costs[0] <= 7, "{costs:?}");
}
