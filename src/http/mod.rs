//! HTTP routes: `/graphql` (POST JSON, GET queries and GraphiQL, WebSocket), `/graphql/ws`,
//! `/schema.graphql`, `/healthz`, `/readyz`, `/metrics`, `/graphiql/*`.

mod serve;
mod upload;
mod ws;

pub use serve::{listen, serve};

use std::time::Duration;

use async_graphql::parser::types::{DocumentOperations, OperationType};
use async_graphql_axum::GraphQLResponse;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::App;
use crate::error::{AppError, SERVICE_UNAVAILABLE};
use crate::graphql::context::{ClientAddr, Viewer};
use crate::graphql::{self, AppSchema};

/// Largest accepted request body; a chat query is far smaller.
pub const BODY_LIMIT: usize = 256 * 1024;
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone)]
pub(crate) struct HttpState {
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

async fn graphql_post(State(state): State<HttpState>, request: Request) -> Response {
    let mime = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase());
    match mime.as_deref() {
        Some("application/json") => {}
        Some("multipart/form-data") => return upload::graphql_multipart(&state, request).await,
        _ => {
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "BAD_USER_INPUT",
                "send GraphQL requests as Content-Type: application/json (multipart/form-data for uploads)",
            );
        }
    }
    let (parts, body) = request.into_parts();
    let body = match Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await {
        Ok(body) => body,
        Err(rejection) => return body_refused(rejection),
    };
    let (headers, extensions) = (parts.headers, parts.extensions);
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
        return ws::websocket(state, request).await;
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
    ws::websocket(state, request).await
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
