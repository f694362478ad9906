//! Files: `uploadFile` over the GraphQL multipart request spec, streamed to Dify, and
//! attachments in `ChatInput.files`, checked against the app's upload settings.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::chat::{CHAT, chat};
use crate::harness::fake_dify::default_parameters;
use crate::harness::ws::TRANSPORT_WS;
use crate::harness::{Actor, TestApp, error_code};

const UPLOAD: &str = "mutation($file: Upload!, $app: ID) { uploadFile(file: $file, appId: $app) { id name size mimeType extension type } }";

/// Sends `uploadFile` as a GraphQL multipart request; returns the status and the JSON answer.
async fn upload(
    app: &TestApp,
    token: Option<&str>,
    name: &str,
    mime: &str,
    bytes: Vec<u8>,
) -> (StatusCode, Value) {
    let operations = json!({ "query": UPLOAD, "variables": { "file": null, "app": null } });
    let form = reqwest::multipart::Form::new()
        .text("operations", operations.to_string())
        .text("map", json!({ "0": ["variables.file"] }).to_string())
        .part(
            "0",
            reqwest::multipart::Part::bytes(bytes)
                .file_name(name.to_owned())
                .mime_str(mime)
                .unwrap(),
        );
    let mut request = app.http.post(app.url("/graphql")).multipart(form);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn setup(app: &TestApp) -> (Actor<'_>, Actor<'_>) {
    let (admin, user) = app.admin_and_user().await;
    app.configure_dify(&admin, "chat").await;
    (admin, user)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_picture_is_attached_to_a_turn() {
    let app = TestApp::spawn().await;
    let (admin, user) = setup(&app).await;
    let png = vec![0x89, b'P', b'N', b'G', 0, 1, 2, 3];
    let (status, answer) = upload(&app, user.token.as_deref(), "cat.PNG", "image/png", png).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let file = &answer["data"]["uploadFile"];
    assert_eq!(file["type"], "image", "{answer}");
    assert_eq!(file["size"], 8);
    assert_eq!(file["extension"], "png");
    assert_eq!(file["mimeType"], "image/png");
    let sent = app.dify.requests_to("/files/upload");
    assert_eq!(
        sent[0].body["user"],
        format!("rechat-{}", user.id),
        "as the caller's Dify user"
    );
    assert_eq!(sent[0].body["file"]["size"], 8);
    let file_id = file["id"].as_str().unwrap().to_owned();

    let events = chat(
        &user,
        TRANSPORT_WS,
        json!({ "query": "what is in this picture?", "files": [
            { "uploadedFileId": file_id },
            { "url": "https://example.com/pictures/dog.jpg" }
        ] }),
    )
    .await;
    assert_eq!(
        events.last().unwrap()["__typename"],
        "ChatCompleted",
        "{events:?}"
    );
    let turn = &app.dify.requests_to("/chat-messages")[0].body;
    assert_eq!(turn["files"][0]["transfer_method"], "local_file");
    assert_eq!(turn["files"][0]["type"], "image");
    assert!(turn["files"][0]["upload_file_id"].is_string());
    assert_eq!(
        turn["files"][1],
        json!({ "type": "image", "transfer_method": "remote_url", "url": "https://example.com/pictures/dog.jpg" })
    );
    let conversation = events[0]["conversation"]["id"].as_str().unwrap();
    let read = user
        .gql(
            "query($id: ID!) { conversation(id: $id) { messages { nodes { role files { id type url belongsTo } } } } }",
            json!({ "id": conversation }),
        )
        .await;
    let files = &read["data"]["conversation"]["messages"]["nodes"][0]["files"];
    assert_eq!(files[0]["id"], file_id.as_str(), "{read}");
    assert_eq!(files[0]["belongsTo"], "user");
    assert_eq!(files[1]["url"], "https://example.com/pictures/dog.jpg");

    // Someone else cannot attach it.
    let mut ws = admin.ws(TRANSPORT_WS).await;
    ws.subscribe(
        CHAT,
        json!({ "input": { "query": "mine now", "files": [{ "uploadedFileId": file_id }] } }),
    )
    .await;
    assert_eq!(ws.refused_code().await, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_are_refused_clearly_and_lose_nothing() {
    let app = TestApp::spawn_with(|c| c.upload_max_bytes = 4096).await;
    let (_, user) = setup(&app).await;
    let token = user.token.as_deref();

    let (status, answer) = upload(&app, None, "cat.png", "image/png", vec![1; 10]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&answer), "UNAUTHENTICATED");

    // The app takes images only (the fake's default settings).
    let (_, answer) = upload(&app, token, "notes.pdf", "application/pdf", vec![1; 10]).await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT", "{answer}");
    assert_eq!(answer["errors"][0]["extensions"]["field"], "file");

    // Larger than UPLOAD_MAX_BYTES (4 KiB here): refused while reading, before Dify.
    let (status, answer) = upload(&app, token, "big.png", "image/png", vec![1; 10_000]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(error_code(&answer), "LIMIT_EXCEEDED");
    assert!(
        app.dify.requests_to("/files/upload").is_empty(),
        "nothing reached Dify"
    );

    // Dify's own refusal (415) is a clear error too.
    let mut parameters = default_parameters();
    parameters["file_upload"]["allowed_file_types"] = json!(["image", "custom"]);
    parameters["file_upload"]["allowed_file_extensions"] = json!([".bin"]);
    app.dify.set_parameters(parameters);
    let apps = app.app.apps().await.unwrap();
    app.app
        .store_parameters(apps.default_app().unwrap().dify.as_ref().unwrap())
        .await
        .unwrap();
    app.app.app_cache.invalidate();
    let (_, answer) = upload(
        &app,
        token,
        "blob.bin",
        "application/octet-stream",
        vec![1; 10],
    )
    .await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT", "{answer}");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("Dify"),
        "{answer}"
    );
    let stored = app
        .sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM uploaded_files")
        .await;
    assert_eq!(stored[0], "0");

    // 20 uploads a minute per user (this test's earlier attempts count too).
    let mut codes = Vec::new();
    for _ in 0..20 {
        let (_, answer) = upload(&app, token, "cat.png", "image/png", vec![1; 10]).await;
        let code = answer["errors"][0]["extensions"]["code"].as_str();
        codes.push(code.unwrap_or("uploaded").to_owned());
    }
    assert_eq!(codes.last().unwrap(), "RATE_LIMITED", "{codes:?}");

    // Attachments the app does not take are refused before anything is saved.
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "read this", "files": [{ "url": "https://example.com/a.pdf" }] } }))
        .await;
    let errors = ws.collect().await.expect_err("refused");
    assert_eq!(
        errors["errors"][0]["extensions"]["field"], "files.0",
        "{errors}"
    );
    let mut ws = user.ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "two at once", "files": [{ "url": "ftp://example.com/a.png" }] } }))
        .await;
    let errors = ws.collect().await.expect_err("refused");
    assert_eq!(
        errors["errors"][0]["extensions"]["field"], "files.0.url",
        "{errors}"
    );
    let messages = app
        .sql_strings("SELECT CAST(COUNT(*) AS CHAR) AS value FROM messages")
        .await;
    assert_eq!(messages[0], "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_takes_files_in_its_file_variables() {
    const KEY: &str = "app-fakeWorkflowFiles0123456789";
    let app = TestApp::spawn().await;
    let admin = app.register("admin@example.com").await;
    let mut parameters = default_parameters();
    parameters["file_upload"]["allowed_file_types"] = json!(["document", "image"]);
    parameters["user_input_form"] = json!([
        { "file": { "label": "Report", "variable": "report", "required": true, "allowed_file_types": ["document"], "allowed_file_upload_methods": ["local_file"] } },
        { "file-list": { "label": "Pictures", "variable": "pictures", "required": false, "max_length": 2, "allowed_file_types": ["image"], "allowed_file_upload_methods": ["remote_url"] } }
    ]);
    app.dify.add_app(KEY, "workflow", parameters);
    let created = admin
        .gql(
            "mutation($input: CreateDifyAppInput!) { createDifyApp(input: $input) { id } }",
            json!({ "input": { "apiKey": KEY, "apiUrl": app.dify.url } }),
        )
        .await;
    let app_id = created["data"]["createDifyApp"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, answer) = upload(
        &app,
        admin.token.as_deref(),
        "q3.pdf",
        "application/pdf",
        vec![1; 100],
    )
    .await;
    let file_id = answer["data"]["uploadFile"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
        .to_owned();

    // A picture where the report goes: refused before anything is saved.
    let mut ws = admin.ws(TRANSPORT_WS).await;
    ws.subscribe(
        CHAT,
        json!({ "input": { "query": "summarise", "appId": app_id, "inputs": {
        "report": { "uploadedFileId": file_id },
        "pictures": [{ "url": "https://example.com/chart.pdf" }]
    } } }),
    )
    .await;
    let errors = ws.collect().await.expect_err("refused");
    assert_eq!(
        errors["errors"][0]["extensions"]["field"], "inputs.pictures.0",
        "{errors}"
    );

    let events = chat(
        &admin,
        TRANSPORT_WS,
        json!({ "query": "summarise", "appId": app_id, "inputs": {
            "report": { "uploadedFileId": file_id },
            "pictures": [{ "url": "https://example.com/chart.png" }]
        } }),
    )
    .await;
    assert_eq!(
        events.last().unwrap()["__typename"],
        "ChatCompleted",
        "{events:?}"
    );
    let run = &app.dify.requests_to("/workflows/run")[0].body;
    assert_eq!(
        run["inputs"]["report"]["transfer_method"], "local_file",
        "{run}"
    );
    assert_eq!(run["inputs"]["report"]["type"], "document");
    assert!(run["inputs"]["report"]["upload_file_id"].is_string());
    assert_eq!(
        run["inputs"]["pictures"],
        json!([{ "type": "image", "transfer_method": "remote_url", "url": "https://example.com/chart.png" }])
    );
}
