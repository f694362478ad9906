//! HTTP routes: `/graphql` (POST JSON, GET queries and GraphiQL, WebSocket), `/graphql/ws`,
//! `/schema.graphql`, `/healthz`, `/readyz`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_graphql::Data;
use async_graphql::http::{WebSocketProtocols, WsMessage};
use async_graphql::parser::types::{DocumentOperations, OperationType};
use async_graphql_axum::GraphQLResponse;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{FutureExt, SinkExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use serde_json::json;
use tokio::sync::broadcast;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Instrument;

use crate::app::App;
use crate::auth::token::Session;
use crate::error::{AppError, SERVICE_UNAVAILABLE};
use crate::graphql::context::{ClientAddr, Viewer};
use crate::graphql::{self, AppSchema};

/// Largest accepted request body; a chat query is far smaller.
pub const BODY_LIMIT: usize = 256 * 1024;
/// Bytes read from a WebSocket at a time; a frame may be larger (up to `BODY_LIMIT`).
const WS_READ_BUFFER: usize = 4096;
/// Bytes of frames gathered before a write; a batch is flushed as a whole anyway.
const WS_WRITE_BUFFER: usize = 16 * 1024;
/// Most events sent in one write.
const WS_BATCH: usize = 64;
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone)]
struct HttpState {
    app: App,
    schema: AppSchema,
}

pub fn router(app: App) -> Router {
    let cors_origins = app.config.cors_origins.clone();
    let body_timeout = app.config.body_timeout;
    let state = HttpState {
        schema: graphql::schema(app.clone()),
        app,
    };
    let mut router = Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/ws", get(graphql_ws_only))
        .route("/graphiql/{file}", get(crate::graphiql::asset))
        .route("/schema.graphql", get(schema_sdl))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_timeout,
        ))
        .with_state(state);
    if !cors_origins.is_empty() {
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(cors_origins))
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                // `Accept` too: the multipart subscription fallback's value is not CORS-safelisted.
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT])
                .expose_headers([REQUEST_ID])
                .max_age(Duration::from_secs(3600)),
        );
    }
    router
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// A client connection's share of `MAX_CONNECTIONS`, held by its requests (and by a WebSocket
/// upgraded from it) until the last of them ends.
#[derive(Clone)]
struct ConnectionPermit(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// Serves the router until `shutdown` completes, at most `MAX_CONNECTIONS` client connections
/// at a time (more wait in the listen backlog). A connection that does not send a request's
/// headers in time (slowly dribbled headers, or an idle keep-alive) is closed, and a request
/// whose body stalls is answered 408 (`Config::header_read_timeout`, `body_timeout`). Sockets get TCP_NODELAY: an
/// answer streams as many small WebSocket frames, and Nagle's algorithm would hold each back
/// until the previous one is acknowledged (about 40 ms with delayed ACKs).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let router = router(app.clone());
    let connections = Arc::new(tokio::sync::Semaphore::new(app.config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(app.config.ws_keepalive);
    tokio::pin!(shutdown);
    let mut full_logged = false;
    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !std::mem::replace(&mut full_logged, true) {
                    tracing::warn!(
                        max = app.config.max_connections,
                        "MAX_CONNECTIONS reached; new connections wait"
                    );
                }
                tokio::select! {
                    permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        full_logged = false;
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: let some connections end.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "setting TCP_NODELAY failed");
        }
        let (router, builder) = (router.clone(), builder.clone());
        let permit = ConnectionPermit(Arc::new(permit));
        let service =
            hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.extensions_mut().insert(permit.clone());
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Requests in flight finish; WebSockets are upgraded and detached, and end with the process.
    graceful.shutdown().await;
    Ok(())
}

/// A GraphQL-shaped error answer for problems found before execution.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "errors": [{ "message": message, "extensions": { "code": code } }] })),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The client's address: the TCP peer, or with `TRUST_FORWARDED_FOR` the last address the
/// reverse proxy appended to `X-Forwarded-For`.
fn client_addr(app: &App, headers: &HeaderMap, extensions: &http::Extensions) -> ClientAddr {
    let forwarded = || {
        let last = headers.get_all("x-forwarded-for").iter().next_back()?;
        last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
    };
    let peer = || {
        extensions
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip())
    };
    ClientAddr(
        app.config
            .trust_forwarded_for
            .then(forwarded)
            .flatten()
            .or_else(peer),
    )
}

async fn execute(
    state: &HttpState,
    headers: &HeaderMap,
    client: ClientAddr,
    request: async_graphql::Request,
) -> Response {
    let viewer = match Viewer::from_credentials(&state.app, bearer(headers)).await {
        Ok(viewer) => viewer,
        Err(error) => {
            let status = match error {
                AppError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let code = error.code();
            // The one mapping of errors, which also logs an internal error's cause.
            let error = async_graphql::Error::from(error);
            return error_response(status, code, &error.message);
        }
    };
    let request = request.data(viewer).data(client);
    let multipart = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(async_graphql::http::is_accept_multipart_mixed);
    if multipart {
        // Apollo-style subscriptions over HTTP: each event is one part of a multipart/mixed
        // answer, with an empty heartbeat part every 30 s.
        let parts = async_graphql::http::create_multipart_mixed_stream(
            state.schema.execute_stream(request),
            Duration::from_secs(30),
        );
        return Response::builder()
            .header(header::CONTENT_TYPE, "multipart/mixed; boundary=graphql")
            .body(axum::body::Body::from_stream(
                parts.map(Ok::<_, std::convert::Infallible>),
            ))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let response = state.schema.execute(request).await;
    // A database outage is the server's condition, not the request's: say so in the status too.
    let unavailable = response.errors.iter().any(|error| {
        error.extensions.as_ref().and_then(|e| e.get("code"))
            == Some(&async_graphql::Value::from(SERVICE_UNAVAILABLE))
    });
    let mut http = GraphQLResponse::from(response).into_response();
    if unavailable {
        *http.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    // GraphQL over HTTP: `application/graphql-response+json` only to clients that ask for it;
    // `application/json` to the others (a MUST for `Accept: application/json`).
    let wants_graphql_response = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/graphql-response+json"));
    if !wants_graphql_response {
        http.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    http
}

async fn graphql_post(
    State(state): State<HttpState>,
    headers: HeaderMap,
    extensions: http::Extensions,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_refused(rejection),
    };
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "BAD_USER_INPUT",
            "send GraphQL requests as Content-Type: application/json",
        );
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return error_response(
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
            "batched requests are not supported",
        );
    }
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BAD_USER_INPUT",
                &format!("the body is not a GraphQL request: {e}"),
            );
        }
    };
    let client = client_addr(&state.app, &headers, &extensions);
    execute(&state, &headers, client, request).await
}

/// A body that could not be read: too large (413), or stalled past `body_timeout` (408).
fn body_refused(rejection: BytesRejection) -> Response {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
    while let Some(error) = source {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return error_response(
                StatusCode::REQUEST_TIMEOUT,
                "BAD_USER_INPUT",
                "the request body did not arrive in time",
            );
        }
        source = error.source();
    }
    let status = rejection.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("the request body exceeds {} KiB", BODY_LIMIT / 1024)
    } else {
        "the request body could not be read".to_owned()
    };
    error_response(status, "BAD_USER_INPUT", &message)
}

fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The operation a request would run, when its document parses.
fn operation_type(request: &async_graphql::Request) -> Option<OperationType> {
    let document = async_graphql::parser::parse_query(&request.query).ok()?;
    match (&document.operations, request.operation_name.as_deref()) {
        (DocumentOperations::Single(op), _) => Some(op.node.ty),
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name).map(|op| op.node.ty),
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => {
            ops.values().next().map(|op| op.node.ty)
        }
        _ => None,
    }
}

async fn graphql_get(State(state): State<HttpState>, request: Request) -> Response {
    if is_websocket(request.headers()) {
        return websocket(state, request).await;
    }
    let query = request.uri().query().unwrap_or("");
    if !query.split('&').any(|pair| pair.starts_with("query=")) {
        return crate::graphiql::page().await.into_response();
    }
    let graphql_request = match async_graphql::http::parse_query_string(query) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "BAD_USER_INPUT", &e.to_string()),
    };
    if matches!(
        operation_type(&graphql_request),
        Some(OperationType::Mutation | OperationType::Subscription)
    ) {
        return (
            [(header::ALLOW, "POST")],
            error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "BAD_USER_INPUT",
                "only queries may be sent with GET; send mutations with POST",
            ),
        )
            .into_response();
    }
    let client = client_addr(&state.app, request.headers(), request.extensions());
    execute(&state, request.headers(), client, graphql_request).await
}

async fn graphql_ws_only(State(state): State<HttpState>, request: Request) -> Response {
    websocket(state, request).await
}

async fn websocket(state: HttpState, request: Request) -> Response {
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

/// Runs one GraphQL WebSocket connection. Beyond what async-graphql does, it closes a connection
/// that has not sent `connection_init` in time (4408) and answers a bad token with 4403, as the
/// graphql-transport-ws protocol specifies.
/// What a WebSocket keeps from the request that opened it.
struct WsConnection {
    state: HttpState,
    header_credentials: Option<String>,
    client: ClientAddr,
    /// Counts the socket against `MAX_CONNECTIONS` while it is open.
    _permit: Option<ConnectionPermit>,
}

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
    let mut batch = Vec::with_capacity(WS_BATCH);
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

async fn schema_sdl(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.schema.sdl(),
    )
}

/// Prometheus metrics in the text exposition format.
async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.app.metrics.render(),
    )
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let check = async {
        use diesel_async::RunQueryDsl;
        let mut conn = state
            .app
            .db
            .get()
            .await
            .map_err(|_| "MySQL connection failed")?;
        // A real table, so a missing or unmigrated database is not ready either.
        diesel::sql_query("SELECT id FROM settings LIMIT 1")
            .execute(&mut conn)
            .await
            .map_err(|_| "the rechat database does not answer")?;
        Ok::<_, &str>(())
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "reason": reason })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "reason": "MySQL did not answer within 3 s" })),
        )
            .into_response(),
    }
}
