//! GraphQL over WebSocket (graphql-transport-ws and the legacy graphql-ws) on async-graphql's
//! protocol handling, with what a gateway on the internet needs around it: origin checks,
//! sessions that follow their account, per-socket operation limits, keepalive pings and batched
//! writes.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_graphql::Data;
use async_graphql::http::{WebSocketProtocols, WsMessage};
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use futures::{FutureExt, SinkExt, StreamExt};
use http::{StatusCode, header};
use serde_json::json;
use tokio::sync::broadcast;
use tracing::Instrument;

use super::serve::ConnectionPermit;
use super::{BODY_LIMIT, HttpState, bearer, client_addr, error_response};
use crate::auth::token::Session;
use crate::error::AppError;
use crate::graphql::context::{ClientAddr, Viewer};

/// Bytes read from a WebSocket at a time; a frame may be larger (up to `BODY_LIMIT`).
const WS_READ_BUFFER: usize = 4096;
/// Bytes of frames gathered before a write; a batch is flushed as a whole anyway.
const WS_WRITE_BUFFER: usize = 16 * 1024;
/// Most events sent in one write.
const WS_BATCH: usize = 64;

pub(super) async fn websocket(state: HttpState, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    // Browsers send `Origin` on WebSocket upgrades but do not apply CORS to them: with
    // CORS_ORIGINS set, a page from another origin must not ride on a user's token. No `Origin`
    // means no browser (a server, a CLI), which CORS would not restrict either.
    let origins = &state.app.config.cors_origins;
    if let Some(origin) = parts.headers.get(header::ORIGIN)
        && !origins.is_empty()
        && !origins.contains(origin)
    {
        return error_response(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "this origin is not allowed (CORS_ORIGINS)",
        );
    }
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let protocol = parts
        .headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .and_then(|list| {
            list.split(',')
                .find_map(|p| p.trim().parse::<WebSocketProtocols>().ok())
        });
    let Some(protocol) = protocol else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
            "ask for the graphql-transport-ws or graphql-ws subprotocol (Sec-WebSocket-Protocol)",
        );
    };
    let header_credentials = bearer(&parts.headers).map(str::to_owned);
    let client = client_addr(&state.app, &parts.headers, &parts.extensions);
    let permit = parts.extensions.get::<ConnectionPermit>().cloned();
    let span = tracing::Span::current();
    upgrade
        // Chat traffic is small frames: the library's 128 KiB default read buffer per socket was
        // most of the gateway's memory per stream. Writes are flushed per batch (see below).
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_frame_size(BODY_LIMIT)
        .max_message_size(BODY_LIMIT)
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| {
            let connection = WsConnection {
                state,
                header_credentials,
                client,
                _permit: permit,
            };
            serve_websocket(socket, protocol, connection).instrument(span)
        })
}

/// The operations running on one socket: started by the client's `subscribe` (`start` in the
/// legacy protocol), ended by its `complete` (`stop`) or by the server's `complete`.
struct Operations {
    running: HashSet<String>,
    max: usize,
}

/// The fields of a client or server message that say which operation it concerns.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
}

impl Operations {
    fn new(max: usize) -> Self {
        Self {
            running: HashSet::new(),
            max,
        }
    }

    /// A client message: `Err` with the answer when it must not reach the schema (an operation
    /// over `MAX_SUBSCRIPTIONS_PER_CONNECTION`, or an id already running: close 4409, as the
    /// graphql-transport-ws protocol says).
    fn client(
        &mut self,
        message: &[u8],
        protocol: WebSocketProtocols,
    ) -> Result<(), Vec<WsMessage>> {
        let Ok(Envelope { kind, id: Some(id) }) = serde_json::from_slice(message) else {
            return Ok(());
        };
        match kind.as_str() {
            "subscribe" | "start" => {
                if self.running.contains(&id) {
                    return Err(vec![WsMessage::Close(
                        4409,
                        format!("Subscriber for {id} already exists"),
                    )]);
                }
                if self.running.len() >= self.max {
                    let error = AppError::LimitExceeded {
                        limit: "MAX_SUBSCRIPTIONS_PER_CONNECTION",
                        max: self.max as u64,
                        message: format!(
                            "at most {} operations may run at once on one connection",
                            self.max
                        ),
                    };
                    let next = match protocol {
                        WebSocketProtocols::SubscriptionsTransportWS => "data",
                        _ => "next",
                    };
                    let payload = async_graphql::Response::from_errors(vec![
                        async_graphql::Error::from(error).into_server_error(Default::default()),
                    ]);
                    // Refused like async-graphql refuses an operation: its errors, then complete.
                    return Err(vec![
                        WsMessage::Text(
                            json!({ "type": next, "id": id, "payload": payload }).to_string(),
                        ),
                        WsMessage::Text(json!({ "type": "complete", "id": id }).to_string()),
                    ]);
                }
                self.running.insert(id);
            }
            "complete" | "stop" => {
                self.running.remove(&id);
            }
            _ => {}
        }
        Ok(())
    }

    /// A message the schema sends: a `complete` ends its operation.
    fn server(&mut self, text: &str) {
        if text.starts_with(r#"{"type":"complete""#)
            && let Ok(Envelope { id: Some(id), .. }) = serde_json::from_str(text)
        {
            self.running.remove(&id);
        }
    }
}

/// Credentials from a `connection_init` payload: `Authorization` (any case) or `token`.
fn init_credentials(payload: &serde_json::Value) -> Option<String> {
    let object = payload.as_object()?;
    object
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.as_str())
        .or_else(|| object.get("token").and_then(|v| v.as_str()))
        .map(str::to_owned)
}

/// What a WebSocket keeps from the request that opened it.
struct WsConnection {
    state: HttpState,
    header_credentials: Option<String>,
    client: ClientAddr,
    /// Counts the socket against `MAX_CONNECTIONS` while it is open.
    _permit: Option<ConnectionPermit>,
}

/// Runs one GraphQL WebSocket connection. Beyond what async-graphql does, it closes a connection
/// that has not sent `connection_init` in time (4408), answers a bad token with 4403 and closes
/// the socket (4403) when its session ends (expiry, revocation, deactivation), limits the
/// operations running at once (a reused id closes it with 4409), pings the peer, and writes
/// events in batches.
async fn serve_websocket(
    socket: WebSocket,
    protocol: WebSocketProtocols,
    connection: WsConnection,
) {
    let WsConnection {
        state,
        header_credentials,
        client,
        _permit,
    } = connection;
    let (mut sink, stream) = socket.split();
    let initialised = Arc::new(AtomicBool::new(false));
    let rejected = Arc::new(AtomicBool::new(false));
    // The token could not be checked because the database is away: not the client's fault.
    let unavailable = Arc::new(AtomicBool::new(false));
    // Anything from the client (a pong included) shows the peer is alive.
    let heard = Arc::new(AtomicBool::new(true));
    // Set when the client sent a message over BODY_LIMIT: closed with 1009.
    let too_big = Arc::new(AtomicBool::new(false));
    let operations = Arc::new(std::sync::Mutex::new(Operations::new(
        state.app.config.max_subscriptions_per_connection,
    )));
    // What the server says on its own: refusals of operations over the limit, a duplicate id.
    let (say, mut said) = tokio::sync::mpsc::unbounded_channel::<WsMessage>();
    let input = {
        let (heard, too_big, operations) = (heard.clone(), too_big.clone(), operations.clone());
        stream
            .take_while(move |message| {
                if let Err(error) = message
                    && error.to_string().contains("Space limit exceeded")
                {
                    too_big.store(true, Ordering::SeqCst);
                }
                futures::future::ready(message.is_ok())
            })
            .filter_map(move |message| {
                heard.store(true, Ordering::Relaxed);
                let bytes = match message {
                    Ok(Message::Text(text)) => Bytes::from(text),
                    Ok(Message::Binary(bytes)) => bytes,
                    _ => return futures::future::ready(None),
                };
                let admitted = operations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .client(&bytes, protocol);
                futures::future::ready(match admitted {
                    Ok(()) => Some(bytes),
                    Err(answers) => {
                        for answer in answers {
                            let _ = say.send(answer);
                        }
                        None
                    }
                })
            })
    };
    // The session the connection signed in with, once `connection_init` was accepted.
    let signed_in = Arc::new(std::sync::OnceLock::<Session>::new());
    // A stream, polled in place: a `recv()` made anew at every turn of the loop below would
    // register and unregister with the process-wide channel once per batch of events.
    let account_changes = futures::stream::unfold(
        state.app.account_events.subscribe(),
        |mut changes| async move { Some((changes.recv().await, changes)) },
    );
    futures::pin_mut!(account_changes);
    let on_init = {
        let (app, initialised, rejected, unavailable, signed_in) = (
            state.app.clone(),
            initialised.clone(),
            rejected.clone(),
            unavailable.clone(),
            signed_in.clone(),
        );
        move |payload: serde_json::Value| async move {
            let credentials = init_credentials(&payload).or(header_credentials);
            let session = Session::from_credentials(&app, credentials.as_deref());
            let viewer = match &session {
                None => Viewer::Anonymous,
                Some(None) => Viewer::Rejected,
                Some(Some(session)) => Viewer::of_session(&app, session).await.map_err(|_| {
                    unavailable.store(true, Ordering::SeqCst);
                    async_graphql::Error::new("the server could not check the token")
                })?,
            };
            if matches!(viewer, Viewer::Rejected) {
                rejected.store(true, Ordering::SeqCst);
                return Err(async_graphql::Error::new(
                    "Forbidden: the token is invalid, expired or revoked",
                ));
            }
            let mut data = Data::default();
            data.insert(client);
            // Each operation resolves the account anew from the session (`SessionViewer`).
            if let Some(Some(session)) = session {
                let _ = signed_in.set(session);
                data.insert(session);
            }
            initialised.store(true, Ordering::SeqCst);
            Ok(data)
        }
    };
    let messages = async_graphql::http::WebSocket::new(state.schema.clone(), input, protocol)
        .on_connection_init(on_init)
        .keepalive_timeout(None);
    futures::pin_mut!(messages);
    let deadline = tokio::time::sleep(state.app.config.ws_init_timeout);
    tokio::pin!(deadline);
    // Until sign-in, the init deadline; then the token's expiry.
    let mut watching = false;
    let every = state.app.config.ws_keepalive;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // Nothing was heard from the client during the last keepalive interval.
    let mut silent = false;
    // Grows to the largest batch this socket sees (a chat's are a few events), not WS_BATCH.
    let mut batch = Vec::new();
    'connection: loop {
        if !watching && let Some(session) = signed_in.get() {
            watching = true;
            let left = (session.expires_at - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
            deadline.as_mut().reset(tokio::time::Instant::now() + left);
        }
        let first = tokio::select! {
            message = messages.next() => message,
            () = &mut deadline, if watching || !initialised.load(Ordering::SeqCst) => {
                if watching {
                    Some(WsMessage::Close(4403, "Forbidden: the token expired".into()))
                } else {
                    Some(WsMessage::Close(4408, "Connection initialisation timeout".into()))
                }
            }
            Some(answer) = said.recv() => Some(answer),
            _ = keepalive.tick() => {
                if heard.swap(false, Ordering::Relaxed) {
                    silent = false;
                } else if std::mem::replace(&mut silent, true) {
                    // Two intervals without a word, not even a pong: the peer is gone.
                    return;
                }
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
                continue;
            }
            Some(changed) = account_changes.next(), if watching => {
                let session = signed_in.get().expect("watching a signed-in session");
                let ours = match changed {
                    Ok(id) => id == session.user,
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => false,
                };
                // A database outage keeps the socket: each operation checks again anyway.
                if ours && matches!(Viewer::of_session(&state.app, session).await, Ok(Viewer::Rejected)) {
                    Some(WsMessage::Close(4403, "Forbidden: the session was revoked".into()))
                } else {
                    continue;
                }
            }
        };
        // Everything already produced goes out in one write: under load, one system call per
        // event was half of the gateway's CPU. Under load, the relays run once more first.
        batch.push(first);
        let mut yielded = false;
        while batch.len() < WS_BATCH && matches!(batch.last(), Some(Some(WsMessage::Text(_)))) {
            match messages.next().now_or_never() {
                Some(next) => batch.push(next),
                None if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                None => break,
            }
        }
        for message in batch.drain(..) {
            match message {
                None => break 'connection,
                Some(WsMessage::Text(text)) => {
                    operations
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .server(&text);
                    if sink.feed(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Some(WsMessage::Close(code, reason)) => {
                    let (code, reason) = if rejected.load(Ordering::SeqCst) {
                        (4403, "Forbidden".to_owned())
                    } else if unavailable.load(Ordering::SeqCst) {
                        (
                            1011,
                            "the server cannot check the token now; retry".to_owned(),
                        )
                    } else {
                        (code, reason)
                    };
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    return;
                }
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    // The legacy protocol reports a rejected init as `connection_error` and then ends: close too.
    let code = if rejected.load(Ordering::SeqCst) {
        4403
    } else if unavailable.load(Ordering::SeqCst) {
        1011
    } else if too_big.load(Ordering::SeqCst) {
        1009
    } else {
        1000
    };
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: "".into(),
        })))
        .await;
}
