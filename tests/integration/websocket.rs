use serde_json::json;

use crate::harness::TestApp;
use crate::harness::ws::{LEGACY_WS, OpMessage, TRANSPORT_WS, WsClient};

const CHAT: &str = "subscription($input: ChatInput!) { chat(input: $input) { __typename seq } }";

#[tokio::test(flavor = "multi_thread")]
async fn both_protocols_authenticate_from_connection_init() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    for protocol in [TRANSPORT_WS, LEGACY_WS] {
        let mut ws = user.ws(protocol).await;
        // Signed in, but no Dify key yet: the subscription itself answers with a coded error.
        ws.subscribe(CHAT, json!({ "input": { "query": "hello" } }))
            .await;
        assert_eq!(ws.refused_code().await, "DIFY_NOT_CONFIGURED", "{protocol}");
        ws.close().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_key_and_upgrade_header_are_accepted() {
    let app = TestApp::spawn().await;
    let user = app.register("ada@example.com").await;
    let token = user.token.clone().unwrap();
    let by_token =
        WsClient::connect(&app.ws_url(), TRANSPORT_WS, Some(json!({ "token": token }))).await;
    assert!(by_token.is_ok());
    let by_header = WsClient::connect_with_header(
        &app.ws_url(),
        TRANSPORT_WS,
        Some(json!({})),
        Some(&format!("Bearer {token}")),
    )
    .await;
    let mut ws = by_header.expect("ack");
    ws.subscribe(CHAT, json!({ "input": { "query": "hello" } }))
        .await;
    assert_eq!(
        ws.refused_code().await,
        "DIFY_NOT_CONFIGURED",
        "signed in through the header"
    );

    // The /graphql/ws alias serves the same.
    let alias = format!("ws://{}/graphql/ws", app.addr);
    assert!(
        WsClient::connect(&alias, TRANSPORT_WS, Some(json!({ "token": user.token })))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_is_rejected_at_init() {
    let app = TestApp::spawn().await;
    let refused = WsClient::connect(
        &app.ws_url(),
        TRANSPORT_WS,
        Some(json!({ "Authorization": "Bearer not.a.token" })),
    )
    .await
    .err()
    .expect("refused");
    assert!(refused.starts_with("close 4403"), "{refused}");
    let legacy = WsClient::connect(
        &app.ws_url(),
        LEGACY_WS,
        Some(json!({ "token": "not.a.token" })),
    )
    .await
    .err()
    .expect("refused");
    assert!(legacy.contains("connection_error"), "{legacy}");
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_connections_get_unauthenticated_operations() {
    let app = TestApp::spawn().await;
    let mut ws = app.anon().ws(TRANSPORT_WS).await;
    ws.subscribe(CHAT, json!({ "input": { "query": "hello" } }))
        .await;
    assert_eq!(ws.refused_code().await, "UNAUTHENTICATED");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_init_is_closed() {
    let app = TestApp::spawn().await;
    for protocol in [TRANSPORT_WS, LEGACY_WS] {
        let mut ws = WsClient::connect(&app.ws_url(), protocol, None)
            .await
            .expect("upgrade");
        match ws.recv().await {
            Some(Err(close)) => assert!(close.starts_with("close 4408"), "{close}"),
            other => panic!("expected a close, got {other:?}"),
        }
    }
    // An operation before init is refused too.
    let mut ws = WsClient::connect(&app.ws_url(), TRANSPORT_WS, None)
        .await
        .expect("upgrade");
    ws.subscribe(CHAT, json!({ "input": { "query": "hello" } }))
        .await;
    assert!(matches!(ws.recv().await, Some(Err(_))));
    let _ = OpMessage::Complete;
}
