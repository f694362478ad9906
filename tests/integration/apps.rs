//! Several Dify apps: connecting them, their parameters and input forms, conversations bound to
//! their app, suggested questions, and the part-1 key migrated as the default app.

use serde_json::{Value, json};

use crate::chat::{CHAT, chat};
use crate::harness::fake_dify::{DIFY_KEY, FakeDify, default_parameters};
use crate::harness::ws::TRANSPORT_WS;
use crate::harness::{Actor, TestApp, TestDatabase, error_code};

const WORKFLOW_KEY: &str = "app-fakeWorkflowKey0123456789";
const CREATE: &str = "mutation($input: CreateDifyAppInput!) { createDifyApp(input: $input) { id name mode isDefault isEnabled apiKeyPreview } }";
const APPS: &str = "{ apps { id name mode isDefault isEnabled apiKeyPreview apiUrl parameters { openingStatement suggestedQuestions suggestedQuestionsAfterAnswer userInputForm { variable label type required maxLength options raw } fileUpload { enabled allowedFileTypes numberLimit maxBytes } } } }";

/// A workflow app whose form asks for a city (required, one of two) and an optional note.
fn workflow_parameters() -> Value {
    json!({
        "opening_statement": "",
        "suggested_questions": [],
        "suggested_questions_after_answer": { "enabled": false },
        "user_input_form": [
            { "select": { "label": "City", "variable": "city", "required": true, "options": ["Paris", "Tokyo"], "default": "" } },
            { "text-input": { "label": "Note", "variable": "note", "required": false, "max_length": 10, "default": "" } },
            { "paragraph": { "label": "Query", "variable": "query", "required": true, "default": "" } }
        ],
        "file_upload": { "enabled": false },
        "system_parameters": { "file_size_limit": 15 }
    })
}

/// An admin with the fake chat app (default) and a workflow app connected; returns the apps' ids.
async fn two_apps(app: &TestApp) -> (Actor<'_>, String, String) {
    let admin = app.register("admin@example.com").await;
    app.dify
        .add_app(WORKFLOW_KEY, "workflow", workflow_parameters());
    let chat_app = admin
        .gql(
            CREATE,
            json!({ "input": { "apiKey": DIFY_KEY, "apiUrl": app.dify.url } }),
        )
        .await;
    let chat_app = &chat_app["data"]["createDifyApp"];
    assert_eq!(chat_app["isDefault"], true, "the first app is the default");
    assert_eq!(chat_app["mode"], "chat");
    let workflow = admin
        .gql(
            CREATE,
            json!({ "input": { "apiKey": WORKFLOW_KEY, "apiUrl": app.dify.url, "name": "Reports" } }),
        )
        .await;
    let workflow = &workflow["data"]["createDifyApp"];
    assert_eq!(workflow["name"], "Reports", "{workflow}");
    assert_eq!(workflow["isDefault"], false);
    (
        admin,
        chat_app["id"].as_str().unwrap().to_owned(),
        workflow["id"].as_str().unwrap().to_owned(),
    )
}

async fn stored_messages(app: &TestApp) -> usize {
    app.sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages")
        .await[0]
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_see_each_apps_opening_statement_and_form() {
    let app = TestApp::spawn().await;
    let (admin, chat_id, workflow_id) = two_apps(&app).await;
    let user = app.register("user@example.com").await;

    let listed = user.gql(APPS, json!({})).await;
    let apps = listed["data"]["apps"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(apps.len(), 2);
    let chat_app = &apps[0];
    assert_eq!(chat_app["id"], chat_id.as_str());
    assert_eq!(chat_app["apiKeyPreview"], Value::Null, "admins only");
    assert_eq!(chat_app["apiUrl"], Value::Null);
    let parameters = &chat_app["parameters"];
    assert_eq!(
        parameters["openingStatement"],
        default_parameters()["opening_statement"]
    );
    assert_eq!(
        parameters["suggestedQuestions"][0],
        "How many days of leave do I have?"
    );
    assert_eq!(
        parameters["fileUpload"]["allowedFileTypes"],
        json!(["image"])
    );
    assert_eq!(parameters["fileUpload"]["maxBytes"], 15 << 20);
    let form = &apps[1]["parameters"]["userInputForm"];
    assert_eq!(form[0]["type"], "select");
    assert_eq!(form[0]["options"], json!(["Paris", "Tokyo"]));
    assert_eq!(form[1]["maxLength"], 10);

    // Disabled: gone for users, still there for admins (with the key's preview).
    let disable =
        "mutation($id: ID!) { updateDifyApp(id: $id, input: { isEnabled: false }) { isEnabled } }";
    let disabled = admin.gql(disable, json!({ "id": workflow_id })).await;
    assert_eq!(
        disabled["data"]["updateDifyApp"]["isEnabled"], false,
        "{disabled}"
    );
    let listed = user.gql(APPS, json!({})).await;
    assert_eq!(listed["data"]["apps"].as_array().unwrap().len(), 1);
    let one = user
        .gql(
            "query($id: ID!) { app(id: $id) { id } }",
            json!({ "id": workflow_id }),
        )
        .await;
    assert_eq!(one["data"]["app"], Value::Null);
    let listed = admin.gql(APPS, json!({})).await;
    assert_eq!(listed["data"]["apps"][1]["isEnabled"], false);
    assert_eq!(listed["data"]["apps"][1]["apiKeyPreview"], "app-...6789");

    // Only admins manage apps; a key Dify refuses is not stored.
    let refused = user
        .gql(
            CREATE,
            json!({ "input": { "apiKey": "app-x", "apiUrl": app.dify.url } }),
        )
        .await;
    assert_eq!(error_code(&refused), "FORBIDDEN");
    let bad_key = admin
        .gql(
            CREATE,
            json!({ "input": { "apiKey": "app-wrongKey000000", "apiUrl": app.dify.url } }),
        )
        .await;
    assert_eq!(error_code(&bad_key), "UPSTREAM_ERROR", "{bad_key}");
    assert_eq!(
        admin.gql(APPS, json!({})).await["data"]["apps"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_keeps_its_app_and_its_inputs_are_checked_first() {
    let app = TestApp::spawn().await;
    let (admin, chat_id, workflow_id) = two_apps(&app).await;
    let user = app.register("user@example.com").await;
    let messages = stored_messages(&app).await;

    // Told clearly which input is missing or wrong; nothing saved, nothing sent.
    for (inputs, field) in [
        (json!({}), "inputs.city"),
        (json!({ "city": "Rome" }), "inputs.city"),
        (
            json!({ "city": "Paris", "note": "far too long a note" }),
            "inputs.note",
        ),
    ] {
        let mut ws = user.ws(TRANSPORT_WS).await;
        ws.subscribe(
            CHAT,
            json!({ "input": { "query": "report", "appId": workflow_id, "inputs": inputs } }),
        )
        .await;
        let errors = ws.collect().await.expect_err("refused");
        let error = &errors["errors"][0];
        assert_eq!(error["extensions"]["code"], "BAD_USER_INPUT", "{errors}");
        assert_eq!(error["extensions"]["field"], field, "{errors}");
    }
    assert_eq!(stored_messages(&app).await, messages);
    assert!(app.dify.requests_to("/workflows/run").is_empty());

    // The workflow app gets the turn, with its own key; the query fills the `query` variable.
    let events = chat(
        &user,
        TRANSPORT_WS,
        json!({ "query": "monthly report", "appId": workflow_id, "inputs": { "city": "Tokyo" } }),
    )
    .await;
    assert_eq!(
        events.last().unwrap()["__typename"],
        "ChatCompleted",
        "{events:?}"
    );
    let runs = app.dify.requests_to("/workflows/run");
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].authorization.as_deref(),
        Some(&*format!("Bearer {WORKFLOW_KEY}"))
    );
    assert_eq!(runs[0].body["inputs"]["query"], "monthly report");
    let conversation_id = events[0]["conversation"]["id"].as_str().unwrap().to_owned();

    // A chat on the default app, without appId.
    chat(&user, TRANSPORT_WS, json!({ "query": "hello" })).await;
    let by_app =
        "query($app: ID) { conversations(appId: $app) { totalCount nodes { app { id name } } } }";
    let listed = user.gql(by_app, json!({ "app": workflow_id })).await;
    assert_eq!(listed["data"]["conversations"]["totalCount"], 1, "{listed}");
    assert_eq!(
        listed["data"]["conversations"]["nodes"][0]["app"]["name"],
        "Reports"
    );
    let listed = user.gql(by_app, json!({ "app": chat_id })).await;
    assert_eq!(listed["data"]["conversations"]["totalCount"], 1);
    let listed = user.gql(by_app, json!({ "app": null })).await;
    assert_eq!(listed["data"]["conversations"]["totalCount"], 2);

    // Another app on a later turn is refused.
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "again", "conversationId": conversation_id, "appId": chat_id } }))
        .await;
    let errors = ws.collect().await.expect_err("refused");
    assert_eq!(
        errors["errors"][0]["extensions"]["field"], "appId",
        "{errors}"
    );

    // Disabled, then deleted: no new turns; the conversation stays readable.
    async fn turn(user: &Actor<'_>, conversation_id: &str) -> String {
        let mut ws = user.ws(TRANSPORT_WS).await;
        ws.subscribe(CHAT, json!({ "input": { "query": "again", "conversationId": conversation_id, "inputs": { "city": "Paris" } } }))
            .await;
        ws.refused_code().await
    }
    admin
        .gql(
            "mutation($id: ID!) { updateDifyApp(id: $id, input: { isEnabled: false }) { id } }",
            json!({ "id": workflow_id }),
        )
        .await;
    assert_eq!(turn(&user, &conversation_id).await, "APP_UNAVAILABLE");
    let deleted = admin
        .gql(
            "mutation($id: ID!) { deleteDifyApp(id: $id) }",
            json!({ "id": workflow_id }),
        )
        .await;
    assert_eq!(
        deleted["data"]["deleteDifyApp"],
        workflow_id.as_str(),
        "{deleted}"
    );
    assert_eq!(turn(&user, &conversation_id).await, "APP_UNAVAILABLE");
    let read = user
        .gql(
            "query($id: ID!) { conversation(id: $id) { app { id } messages { totalCount } } }",
            json!({ "id": conversation_id }),
        )
        .await;
    assert_eq!(read["data"]["conversation"]["app"], Value::Null, "{read}");
    assert_eq!(read["data"]["conversation"]["messages"]["totalCount"], 2);
    let stored = app
        .sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM dify_apps WHERE api_key_encrypted IS NOT NULL")
        .await;
    assert_eq!(stored[0], "1", "a deleted app's key is erased");
}

#[tokio::test(flavor = "multi_thread")]
async fn suggested_questions_follow_the_apps_setting() {
    let app = TestApp::spawn().await;
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "leave?" })).await;
    let message_id = events.last().unwrap()["messageId"]
        .as_str()
        .unwrap()
        .to_owned();
    const SUGGESTED: &str = "query($id: ID!) { suggestedQuestions(messageId: $id) }";
    let suggested = user.gql(SUGGESTED, json!({ "id": message_id })).await;
    assert_eq!(
        suggested["data"]["suggestedQuestions"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "{suggested}"
    );
    let asked = app.dify.requests_to("/suggested");
    assert!(asked[0].path.contains("/messages/"), "Dify's message id");
    assert_eq!(
        error_code(&admin.gql(SUGGESTED, json!({ "id": message_id })).await),
        "NOT_FOUND"
    );

    // Turned off in Dify, and read again by an admin: [] without asking Dify.
    let mut off = default_parameters();
    off["suggested_questions_after_answer"]["enabled"] = json!(false);
    app.dify.set_parameters(off);
    let refreshed = admin.gql("{ apps { id } }", json!({})).await;
    let id = refreshed["data"]["apps"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refreshed = admin
        .gql(
            "mutation($id: ID!) { refreshDifyApp(id: $id) { parameters { suggestedQuestionsAfterAnswer } } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        refreshed["data"]["refreshDifyApp"]["parameters"]["suggestedQuestionsAfterAnswer"], false,
        "{refreshed}"
    );
    let suggested = user.gql(SUGGESTED, json!({ "id": message_id })).await;
    assert_eq!(suggested["data"]["suggestedQuestions"], json!([]));
    assert_eq!(app.dify.requests_to("/suggested").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_part_one_key_becomes_the_default_app_with_every_conversation() {
    use diesel::migration::MigrationSource;
    use diesel_async::AsyncMysqlConnection;
    use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
    use diesel_migrations::MigrationHarness;

    // A database as the first release left it: a key in `settings`, a conversation.
    let db = TestDatabase::new().await;
    let dify = FakeDify::start("chat").await;
    let config = rechat::Config::for_tests(&db.url(), &dify.url);
    rechat::db::ensure_database(&config).await.unwrap();
    let url = db.url();
    tokio::task::spawn_blocking(move || {
        let mut conn: AsyncConnectionWrapper<AsyncMysqlConnection> =
            diesel::Connection::establish(&url).unwrap();
        diesel::migration::MigrationConnection::setup(&mut conn).unwrap();
        let migrations =
            MigrationSource::<diesel::mysql::Mysql>::migrations(&rechat::db::MIGRATIONS).unwrap();
        for migration in migrations
            .iter()
            .filter(|m| m.name().to_string().as_str() < "2026-12-01-000003")
        {
            conn.run_migration(migration.as_ref()).unwrap();
        }
    })
    .await
    .unwrap();
    let keys = rechat::auth::token::Keys::new(
        secrecy::ExposeSecret::expose_secret(config.secret_key.as_ref().unwrap()).as_bytes(),
        std::time::Duration::from_secs(60),
    );
    let sealed = rechat::admin::domain::encrypt(&keys.cipher_key, &DIFY_KEY.into());
    let hex: String = sealed.iter().map(|b| format!("{b:02X}")).collect();
    let setup = [
        format!("UPDATE settings SET dify_api_key_encrypted = X'{hex}', dify_api_key_preview = 'app-...6789', dify_api_url = '{}', dify_app_mode = 'chat', dify_app_name = 'HR', dify_updated_at = UTC_TIMESTAMP(6) WHERE id = 1", dify.url),
        "INSERT INTO users (id, email, password_hash, is_active, is_admin, token_version, created_at, updated_at) VALUES (X'0190000000007000800000000000000A', 'old@example.com', '$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$abc', TRUE, TRUE, 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))".into(),
        "INSERT INTO conversations (id, user_id, title, message_count, created_at, updated_at) VALUES (X'0190000000007000800000000000000B', X'0190000000007000800000000000000A', 'from before', 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))".into(),
    ];
    {
        use diesel_async::{AsyncConnection, RunQueryDsl};
        let mut conn = AsyncMysqlConnection::establish(&db.url()).await.unwrap();
        for statement in setup {
            diesel::sql_query(statement)
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }

    let app = TestApp::spawn_on(db, dify, |_| {}).await;
    let apps = app.app.apps().await.unwrap();
    assert_eq!(apps.all.len(), 1);
    let default = apps
        .default_app()
        .expect("the migrated key is the default app");
    assert_eq!(default.record.name, "HR");
    assert!(default.dify.is_some(), "its key still decrypts");
    let bound = app
        .sql_strings("SELECT HEX(app_id) AS value FROM conversations")
        .await;
    assert_eq!(
        bound,
        [default.record.id.0.simple().to_string().to_uppercase()]
    );
    // And it works: the old conversation goes on, on the default app, and a new user chats.
    let old_user =
        rechat::users::domain::UserId::parse("id", "01900000-0000-7000-8000-00000000000a").unwrap();
    let (token, _) = app.app.keys.issue(old_user, 0).unwrap();
    let old = Actor {
        app: &app,
        token: Some(token),
        id: old_user.to_string(),
    };
    let default_id = default.record.id.to_string();
    let events = chat(
        &old,
        TRANSPORT_WS,
        json!({ "query": "still there?", "conversationId": "01900000-0000-7000-8000-00000000000b", "appId": default_id }),
    )
    .await;
    assert_eq!(
        events.last().unwrap()["__typename"],
        "ChatCompleted",
        "{events:?}"
    );
    let user = app.register("new@example.com").await;
    let events = chat(&user, TRANSPORT_WS, json!({ "query": "hi" })).await;
    assert_eq!(events.last().unwrap()["__typename"], "ChatCompleted");
}
