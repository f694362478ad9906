//! Sessions follow the account on open WebSockets: demotion, deactivation, revocation and expiry
//! take effect within seconds, whichever gateway made the change.

use std::time::Duration;

use serde_json::{Value, json};

use crate::chat::{CHAT, actor, setup, stored};
use crate::harness::fake_dify::Script;
use crate::harness::ws::{LEGACY_WS, OpMessage, TRANSPORT_WS, WsClient};
use crate::harness::{TestApp, error_code};

const SET_ADMIN: &str =
    "mutation($id: ID!, $on: Boolean!) { setUserAdmin(userId: $id, isAdmin: $on) { isAdmin } }";
const SET_ACTIVE: &str =
    "mutation($id: ID!, $on: Boolean!) { setUserActive(userId: $id, isActive: $on) { isActive } }";

/// Runs one query over the socket and returns its payload.
async fn query(ws: &mut WsClient, query: &str) -> Value {
    ws.subscribe(query, json!({})).await;
    match ws.next_op().await {
        OpMessage::Next(payload) => {
            assert!(matches!(ws.next_op().await, OpMessage::Complete));
            payload
        }
        OpMessage::Error(errors) => json!({ "errors": errors }),
        OpMessage::Complete => panic!("completed without an answer"),
    }
}

/// Reads until the server closes the socket, within `within`; returns the close code.
async fn closed_within(ws: &mut WsClient, within: Duration) -> String {
    tokio::time::timeout(within, async {
        loop {
            match ws.recv().await {
                Some(Err(close)) => return close,
                Some(Ok(_)) => continue,
                None => return "ended without a close frame".to_owned(),
            }
        }
    })
    .await
    .expect("the socket was not closed in time")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_demotion_applies_to_sockets_opened_before_it() {
    let app = TestApp::spawn().await;
    let (admin, user) = app.admin_and_user().await;
    let promoted = admin
        .gql(SET_ADMIN, json!({ "id": user.id, "on": true }))
        .await;
    assert_eq!(promoted["data"]["setUserAdmin"]["isAdmin"], true);
    for protocol in [TRANSPORT_WS, LEGACY_WS] {
        let mut ws = user.ws(protocol).await;
        let listed = query(&mut ws, "{ users { totalCount } }").await;
        assert_eq!(listed["data"]["users"]["totalCount"], 2, "{listed}");

        admin
            .gql(SET_ADMIN, json!({ "id": user.id, "on": false }))
            .await;
        let refused = query(&mut ws, "{ users { totalCount } }").await;
        assert_eq!(error_code(&refused), "FORBIDDEN", "{refused}");
        let me = query(&mut ws, "{ me { isAdmin } }").await;
        assert_eq!(me["data"]["me"]["isAdmin"], false, "the socket stays open");

        admin
            .gql(SET_ADMIN, json!({ "id": user.id, "on": true }))
            .await;
        ws.close().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deactivation_closes_the_sockets_and_stops_live_answers() {
    let (app, admin_token, token) = setup("chat").await;
    let (admin, user) = (actor(&app, &admin_token), actor(&app, &token));
    app.dify.push(Script::Long {
        deltas: 1000,
        pause: Duration::from_millis(20),
    });
    let mut chatting = user.ws(TRANSPORT_WS).await;
    chatting
        .subscribe(CHAT, json!({ "input": { "query": "talk for a while" } }))
        .await;
    let OpMessage::Next(started) = chatting.next_op().await else {
        panic!("no ChatStarted")
    };
    let id = started["data"]["chat"]["messageId"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut idle = user.ws(LEGACY_WS).await;

    let answer = admin
        .gql(SET_ACTIVE, json!({ "id": user.id, "on": false }))
        .await;
    assert_eq!(
        answer["data"]["setUserActive"]["isActive"], false,
        "{answer}"
    );
    for ws in [&mut chatting, &mut idle] {
        let close = closed_within(ws, Duration::from_secs(5)).await;
        assert!(close.starts_with("close 4403"), "{close}");
    }
    let mut status = String::new();
    for _ in 0..50 {
        status = stored(&app, &id, "status").await;
        if status != "STREAMING" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "STOPPED");
    assert!(
        app.dify.wait_for_requests("/stop", 1).await > 0,
        "Dify was asked to stop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_made_by_another_gateway_reaches_open_sockets() {
    let app = TestApp::spawn().await;
    let (admin, user) = app.admin_and_user().await;
    let mut admin_ws = admin.ws(TRANSPORT_WS).await;
    let mut user_ws = user.ws(TRANSPORT_WS).await;
    // Another gateway on the same database: only the table changes here.
    app.sql(&format!(
        "UPDATE users SET token_version = token_version + 1, updated_at = UTC_TIMESTAMP(6) \
         WHERE id = UNHEX(REPLACE('{}', '-', ''))",
        user.id
    ))
    .await;
    let close = closed_within(&mut user_ws, Duration::from_secs(5)).await;
    assert!(close.starts_with("close 4403"), "revoked tokens: {close}");
    let listed = query(&mut admin_ws, "{ users { totalCount } }").await;
    assert_eq!(listed["data"]["users"]["totalCount"], 2, "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_closes_when_its_token_expires() {
    let app = TestApp::spawn().await;
    let user = app.register("expiring@example.com").await;
    let session = app.app.keys.verify(user.token.as_deref().unwrap()).unwrap();
    let now = chrono::Utc::now().timestamp();
    let short = app
        .app
        .keys
        .sign(&rechat::auth::token::Claims {
            sub: session.user.to_string(),
            iat: now,
            exp: now + 1,
            ver: session.token_version,
        })
        .unwrap();
    let mut ws = WsClient::connect(
        &app.ws_url(),
        TRANSPORT_WS,
        Some(json!({ "Authorization": format!("Bearer {short}") })),
    )
    .await
    .expect("accepted while valid");
    let me = query(&mut ws, "{ me { id } }").await;
    assert_eq!(me["data"]["me"]["id"], user.id.as_str());
    // One second of life, five of leeway for clock skew.
    let close = closed_within(&mut ws, Duration::from_secs(10)).await;
    assert!(close.starts_with("close 4403"), "{close}");
}
