//! A fake Dify Service API: replays the fixtures in `tests/fixtures/dify/` over real HTTP,
//! split at awkward byte boundaries, checks the key and conversation ids as Dify does, fails as
//! Dify fails, implements stop and feedback, and records every request it gets.
//! `examples/fake_dify.rs` runs the same fake as a server to try rechat by hand.

// Handlers return axum responses as errors, as handlers do.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

pub const DIFY_KEY: &str = "app-fakeDifyKey0123456789";

pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/dify/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// What the next streaming call answers.
#[derive(Clone, Debug)]
pub enum Script {
    /// Replays a fixture split into chunks of these sizes (cycled), pausing between chunks.
    Replay {
        fixture: &'static str,
        chunks: Vec<usize>,
        pause: Duration,
    },
    /// Answers with Dify's error envelope before any stream.
    HttpError { status: u16, fixture: &'static str },
    /// Replays a fixture, then breaks the connection (an I/O error, not a clean end).
    Broken { fixture: &'static str },
    /// `deltas` message frames `pause` apart, then message_end; ends early after a stop.
    Long { deltas: usize, pause: Duration },
    /// Headers, one ping, then silence.
    Silent,
    /// `deltas` message frames (with Dify's ids), then silence: a model that hangs mid-answer.
    Stall { deltas: usize },
    /// `deltas` unpaced message frames of about `bytes` each (`word<i>xxx… `), then message_end.
    Flood { deltas: usize, bytes: usize },
}

impl Script {
    pub fn replay(fixture: &'static str) -> Self {
        Self::Replay {
            fixture,
            chunks: AWKWARD_CHUNKS.to_vec(),
            pause: Duration::from_millis(1),
        }
    }
}

/// Chunk sizes that cut frames inside UTF-8 characters, inside `\n\n` and between frames.
pub const AWKWARD_CHUNKS: &[usize] = &[1, 2, 3, 5, 7, 11, 13, 64, 1, 128, 257, 509, 2, 1021];

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct FakeState {
    mode: Mutex<String>,
    scripts: Mutex<VecDeque<Script>>,
    /// Answers every streaming call when the queue is empty (instead of the mode's fixture).
    default_script: Mutex<Option<Script>>,
    requests: Mutex<Vec<Recorded>>,
    /// Conversation ids this fake issued, and to which user.
    conversations: Mutex<HashMap<String, String>>,
    stopped_tasks: Mutex<HashSet<String>>,
    /// `/parameters` of the main key (`DIFY_KEY`).
    parameters: Mutex<Value>,
    /// More apps, by key: their mode and `/parameters`.
    apps: Mutex<HashMap<String, (String, Value)>>,
}

/// What `/parameters` answers unless a test sets it: a chat app with an opening statement,
/// starter questions, follow-ups on, no input form and image uploads.
pub fn default_parameters() -> Value {
    json!({
        "opening_statement": "Hello! I answer questions about your leave.",
        "suggested_questions": ["How many days of leave do I have?"],
        "suggested_questions_after_answer": { "enabled": true },
        "speech_to_text": { "enabled": false },
        "text_to_speech": { "enabled": false, "voice": "", "language": "", "autoPlay": "disabled" },
        "retriever_resource": { "enabled": true },
        "annotation_reply": { "enabled": false },
        "more_like_this": { "enabled": false },
        "sensitive_word_avoidance": { "enabled": false },
        "user_input_form": [],
        "file_upload": {
            "enabled": true,
            "allowed_file_types": ["image"],
            "allowed_file_extensions": [],
            "allowed_file_upload_methods": ["local_file", "remote_url"],
            "number_limits": 3,
            "image": { "enabled": true, "number_limits": 3, "transfer_methods": ["local_file", "remote_url"] }
        },
        "system_parameters": { "file_size_limit": 15, "image_file_size_limit": 10, "audio_file_size_limit": 50, "video_file_size_limit": 100, "workflow_file_upload_limit": 10 }
    })
}

#[derive(Clone)]
pub struct FakeDify {
    pub url: String,
    state: Arc<FakeState>,
}

fn dify_error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(json!({ "code": code, "message": message, "status": status.as_u16() })),
    )
        .into_response()
}

impl FakeDify {
    pub async fn start(mode: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Dify");
        Self::serve(listener, mode).await
    }

    /// Serves on a listener the caller bound (the runnable example picks the port).
    pub async fn serve(listener: tokio::net::TcpListener, mode: &str) -> Self {
        let state = Arc::new(FakeState {
            mode: Mutex::new(mode.into()),
            parameters: Mutex::new(default_parameters()),
            ..Default::default()
        });
        let router = Router::new()
            .route("/v1/info", get(info))
            .route("/v1/parameters", get(parameters))
            .route("/v1/files/upload", post(upload))
            .route("/v1/messages/{id}/suggested", get(suggested))
            .route("/v1/chat-messages", post(chat_messages))
            .route("/v1/completion-messages", post(chat_messages))
            .route("/v1/workflows/run", post(chat_messages))
            .route("/v1/chat-messages/{task}/stop", post(stop))
            .route("/v1/completion-messages/{task}/stop", post(stop))
            .route("/v1/workflows/tasks/{task}/stop", post(stop))
            .route("/v1/messages/{id}/feedbacks", post(success))
            .route("/v1/conversations/{id}/name", post(rename))
            .route("/v1/conversations/{id}", delete(delete_conversation))
            .with_state(state.clone());
        let addr: SocketAddr = listener.local_addr().expect("fake Dify address");
        // Like Dify's own servers, send each small SSE write at once.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            url: format!("http://{addr}/v1"),
            state,
        }
    }

    /// What `/parameters` answers for `DIFY_KEY`.
    #[allow(dead_code)]
    pub fn set_parameters(&self, parameters: Value) {
        *self.state.parameters.lock().unwrap() = parameters;
    }

    /// Another app, reached with `key`.
    #[allow(dead_code)]
    pub fn add_app(&self, key: &str, mode: &str, parameters: Value) {
        self.state
            .apps
            .lock()
            .unwrap()
            .insert(key.to_owned(), (mode.to_owned(), parameters));
    }

    pub fn set_mode(&self, mode: &str) {
        *self.state.mode.lock().unwrap() = mode.into();
    }

    /// Queues what the next streaming call answers (defaults replay the mode's fixture).
    pub fn push(&self, script: Script) {
        self.state.scripts.lock().unwrap().push_back(script);
    }

    /// What every streaming call answers from now on, unless a script is queued.
    #[allow(dead_code)] // used by examples/fake_dify.rs
    pub fn set_default(&self, script: Script) {
        *self.state.default_script.lock().unwrap() = Some(script);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn requests_to(&self, path_part: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.contains(path_part))
            .collect()
    }

    /// Waits (up to 2 s) until `n` requests went to a path containing `path_part`: a turn's
    /// `ChatStarted` comes before its relay calls Dify. Returns how many there are then.
    #[allow(dead_code)]
    pub async fn wait_for_requests(&self, path_part: &str, n: usize) -> usize {
        for _ in 0..100 {
            if self.requests_to(path_part).len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.requests_to(path_part).len()
    }

    /// Forgets a conversation, as if it were deleted in Dify's console.
    pub fn forget_conversations(&self) {
        self.state.conversations.lock().unwrap().clear();
    }
}

impl FakeState {
    fn record(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: Value) {
        self.requests.lock().unwrap().push(Recorded {
            method: method.to_string(),
            path: uri.path().to_owned(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
        });
    }

    /// The mode and `/parameters` of the app the request's key opens, or Dify's 401.
    fn check_key(&self, headers: &HeaderMap) -> Result<(String, Value), Response> {
        let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
            return Err(dify_error(
                401,
                "unauthorized",
                "Authorization header must be provided and start with 'Bearer'",
            ));
        };
        let key = value.strip_prefix("Bearer ").unwrap_or_default();
        if key == DIFY_KEY {
            let mode = self.mode.lock().unwrap().clone();
            return Ok((mode, self.parameters.lock().unwrap().clone()));
        }
        self.apps
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| dify_error(401, "unauthorized", "Access token is invalid"))
    }
}

async fn info(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    state.record(&method, &uri, &headers, Value::Null);
    if let Err(response) = state.check_key(&headers) {
        return response;
    }
    let (mode, _) = match state.check_key(&headers) {
        Ok(app) => app,
        Err(response) => return response,
    };
    let main = headers
        .get("authorization")
        .is_some_and(|v| v.to_str().ok() == Some(&format!("Bearer {DIFY_KEY}")));
    let name = if main {
        "Fake HR Assistant".to_owned()
    } else {
        format!("Fake {mode} app")
    };
    Json(json!({ "name": name, "description": "A fake Dify app", "tags": [], "mode": mode, "author_name": "test" }))
        .into_response()
}

async fn parameters(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    state.record(&method, &uri, &headers, Value::Null);
    match state.check_key(&headers) {
        Ok((_, parameters)) => Json(parameters).into_response(),
        Err(response) => response,
    }
}

/// Largest file the fake takes, like Dify's `UPLOAD_FILE_SIZE_LIMIT` (15 MB).
const FAKE_UPLOAD_LIMIT: usize = 15 * 1024 * 1024;

/// `POST /files/upload`: counts the file without keeping it, and fails the ways Dify fails:
/// no file (400), too large (413), an extension it refuses (`.bin`: 415).
async fn upload(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    mut multipart: axum::extract::Multipart,
) -> Response {
    if let Err(response) = state.check_key(&headers) {
        state.record(&method, &uri, &headers, Value::Null);
        return response;
    }
    let (mut user, mut file) = (None, None);
    while let Ok(Some(mut field)) = multipart.next_field().await {
        match field.name() {
            Some("user") => user = field.text().await.ok(),
            Some("file") => {
                let name = field.file_name().unwrap_or_default().to_owned();
                let mime = field.content_type().map(str::to_owned);
                let mut size = 0;
                while let Ok(Some(chunk)) = field.chunk().await {
                    size += chunk.len();
                }
                file = Some((name, mime, size));
            }
            _ => {}
        }
    }
    state.record(&method, &uri, &headers, json!({ "user": user, "file": file.as_ref().map(|(n, m, s)| json!({ "name": n, "mime_type": m, "size": s })) }));
    let Some((name, mime, size)) = file else {
        return dify_error(400, "no_file_uploaded", "Please upload your file.");
    };
    if user.as_deref().is_none_or(str::is_empty) {
        return dify_error(400, "invalid_param", "Arg user must be provided.");
    }
    if size > FAKE_UPLOAD_LIMIT {
        return dify_error(413, "file_too_large", "File size exceeded.");
    }
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    if extension == "bin" {
        return dify_error(415, "unsupported_file_type", "File type not allowed.");
    }
    (
        StatusCode::CREATED,
        Json(json!({
            "id": uuid::Uuid::new_v4().to_string(), "name": name, "size": size, "extension": extension,
            "mime_type": mime, "created_by": uuid::Uuid::new_v4().to_string(), "created_at": 1_775_990_240,
            "preview_url": null, "source_url": "", "original_url": null, "user_id": null,
            "tenant_id": uuid::Uuid::new_v4().to_string(), "conversation_id": null, "file_key": null, "reference": null
        })),
    )
        .into_response()
}

/// `GET /messages/{id}/suggested`: three follow-ups, or Dify's refusal when they are off.
async fn suggested(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    state.record(&method, &uri, &headers, Value::Null);
    let (_, parameters) = match state.check_key(&headers) {
        Ok(app) => app,
        Err(response) => return response,
    };
    if !uri.query().unwrap_or_default().contains("user=rechat-") {
        return dify_error(400, "invalid_param", "Arg user must be provided.");
    }
    if parameters["suggested_questions_after_answer"]["enabled"] != true {
        return dify_error(400, "bad_request", "Suggested Questions Is Disabled.");
    }
    Json(json!({ "result": "success", "data": ["Can I carry days over?", "Who approves leave?", "What about sick days?"] }))
        .into_response()
}

async fn success(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.record(&method, &uri, &headers, body);
    if let Err(response) = state.check_key(&headers) {
        return response;
    }
    Json(json!({ "result": "success" })).into_response()
}

async fn stop(
    State(state): State<Arc<FakeState>>,
    Path(task): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.record(&method, &uri, &headers, body);
    if let Err(response) = state.check_key(&headers) {
        return response;
    }
    state.stopped_tasks.lock().unwrap().insert(task);
    Json(json!({ "result": "success" })).into_response()
}

fn known_conversation(state: &FakeState, id: &str, body: &Value) -> Result<(), Response> {
    let user = body["user"].as_str().unwrap_or_default();
    match state.conversations.lock().unwrap().get(id) {
        Some(owner) if owner == user => Ok(()),
        _ => Err(dify_error(404, "not_found", "Conversation Not Exists.")),
    }
}

async fn rename(
    State(state): State<Arc<FakeState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.record(&method, &uri, &headers, body.clone());
    if let Err(response) = state
        .check_key(&headers)
        .and_then(|_| known_conversation(&state, &id, &body))
    {
        return response;
    }
    Json(json!({ "id": id, "name": body["name"], "status": "normal" })).into_response()
}

async fn delete_conversation(
    State(state): State<Arc<FakeState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.record(&method, &uri, &headers, body.clone());
    if let Err(response) = state
        .check_key(&headers)
        .and_then(|_| known_conversation(&state, &id, &body))
    {
        return response;
    }
    state.conversations.lock().unwrap().remove(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// The conversation id a fixture was captured with, to be replaced by the one this fake issues.
fn fixture_conversation_id(text: &str) -> Option<String> {
    let at = text.find("\"conversation_id\"")? + "\"conversation_id\"".len();
    let rest = text[at..].trim_start_matches([':', ' ']);
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned()).filter(|id| id.len() == 36)
}

async fn chat_messages(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.record(&method, &uri, &headers, body.clone());
    let (mode, parameters) = match state.check_key(&headers) {
        Ok(app) => app,
        Err(response) => return response,
    };
    // Dify refuses a turn whose required inputs are missing, before any stream.
    for item in parameters["user_input_form"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some((_, field)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let variable = field["variable"].as_str().unwrap_or_default();
        let given = &body["inputs"][variable];
        if field["required"] == true && (given.is_null() || given == "") {
            return dify_error(
                400,
                "invalid_param",
                &format!("{variable} is required in input form"),
            );
        }
    }
    let endpoint_mode_ok = match uri.path() {
        "/v1/workflows/run" => mode == "workflow",
        "/v1/completion-messages" => mode == "completion",
        _ => !matches!(mode.as_str(), "workflow" | "completion"),
    };
    if !endpoint_mode_ok {
        return dify_error(
            400,
            "not_chat_app",
            "Please check if your app mode matches the right API route.",
        );
    }
    let Some(user) = body["user"]
        .as_str()
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
    else {
        return dify_error(400, "invalid_param", "Arg user must be provided.");
    };
    if body["response_mode"] != "streaming" {
        return dify_error(
            400,
            "invalid_param",
            "Agent Chat App does not support blocking mode",
        );
    }
    let conversation_id = match body["conversation_id"].as_str().unwrap_or_default() {
        "" => uuid::Uuid::new_v4().to_string(),
        given => {
            if uuid::Uuid::parse_str(given).is_err() {
                return dify_error(400, "invalid_param", "conversation_id must be a valid UUID");
            }
            if let Err(response) = known_conversation(&state, given, &body) {
                return response;
            }
            given.to_owned()
        }
    };
    let default_fixture = match mode.as_str() {
        "agent-chat" => "agent-chat-tool-call.sse",
        "agent" => "agent-new-closing-message.sse",
        "advanced-chat" => "chatflow.sse",
        "workflow" => "workflow-run.sse",
        _ => "chat-basic.sse",
    };
    let queued = state.scripts.lock().unwrap().pop_front();
    let script = queued
        .or_else(|| state.default_script.lock().unwrap().clone())
        .unwrap_or_else(|| Script::replay(default_fixture));
    let has_conversations = !matches!(mode.as_str(), "workflow" | "completion");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let sse = |body: Body| {
        Response::builder()
            .header("content-type", "text/event-stream; charset=utf-8")
            .body(body)
            .unwrap()
    };
    let issue = |state: &FakeState| {
        if has_conversations {
            state
                .conversations
                .lock()
                .unwrap()
                .insert(conversation_id.clone(), user.clone());
        }
    };
    match script {
        Script::HttpError {
            status,
            fixture: name,
        } => {
            let body = fixture(name);
            return (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                body,
            )
                .into_response();
        }
        Script::Replay {
            fixture: name,
            chunks,
            pause,
        } => {
            issue(&state);
            let text = personalise(fixture(name), &conversation_id);
            tokio::spawn(replay(tx, text.into_bytes(), chunks, pause, false));
        }
        Script::Broken { fixture: name } => {
            issue(&state);
            let text = personalise(fixture(name), &conversation_id);
            tokio::spawn(replay(
                tx,
                text.into_bytes(),
                AWKWARD_CHUNKS.to_vec(),
                Duration::from_millis(1),
                true,
            ));
        }
        Script::Long { deltas, pause } => {
            issue(&state);
            tokio::spawn(long_answer(
                tx,
                state.clone(),
                conversation_id.clone(),
                deltas,
                pause,
                false,
                0,
            ));
        }
        Script::Flood { deltas, bytes } => {
            issue(&state);
            tokio::spawn(long_answer(
                tx,
                state.clone(),
                conversation_id.clone(),
                deltas,
                Duration::ZERO,
                false,
                bytes,
            ));
        }
        Script::Stall { deltas } => {
            issue(&state);
            tokio::spawn(long_answer(
                tx,
                state.clone(),
                conversation_id.clone(),
                deltas,
                Duration::ZERO,
                true,
                0,
            ));
        }
        Script::Silent => {
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"event: ping\n\n"))).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        }
    }
    sse(Body::from_stream(futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
    )))
}

fn personalise(text: String, conversation_id: &str) -> String {
    match fixture_conversation_id(&text) {
        Some(original) => text.replace(&original, conversation_id),
        None => text,
    }
}

async fn replay(
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    bytes: Vec<u8>,
    chunks: Vec<usize>,
    pause: Duration,
    break_at_end: bool,
) {
    let mut at = 0;
    for size in chunks.iter().cycle() {
        if at >= bytes.len() {
            break;
        }
        let end = (at + size).min(bytes.len());
        if tx
            .send(Ok(Bytes::copy_from_slice(&bytes[at..end])))
            .await
            .is_err()
        {
            return;
        }
        at = end;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    if break_at_end {
        let _ = tx
            .send(Err(std::io::Error::other("connection reset")))
            .await;
    }
}

async fn long_answer(
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    state: Arc<FakeState>,
    conversation_id: String,
    deltas: usize,
    pause: Duration,
    stall: bool,
    pad: usize,
) {
    let pad = "x".repeat(pad);
    let task_id = uuid::Uuid::new_v4().to_string();
    let message_id = uuid::Uuid::new_v4().to_string();
    let frame = |event: Value| Bytes::from(format!("data: {event}\n\n"));
    let ids = json!({ "conversation_id": conversation_id, "message_id": message_id, "task_id": task_id, "created_at": 1775990112 });
    let with = |mut extra: Value| {
        for (k, v) in ids.as_object().unwrap() {
            extra[k] = v.clone();
        }
        extra
    };
    for i in 0..deltas {
        if state.stopped_tasks.lock().unwrap().contains(&task_id) {
            break;
        }
        let delta = with(
            json!({ "event": "message", "id": message_id, "answer": format!("word{i}{pad} ") }),
        );
        // A closed receiver means the gateway went away; Dify keeps generating regardless.
        let _ = tx.send(Ok(frame(delta))).await;
        tokio::time::sleep(pause).await;
    }
    if stall {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return;
    }
    let end = with(
        json!({ "event": "message_end", "id": message_id, "metadata": { "usage": { "prompt_tokens": 5, "completion_tokens": deltas, "total_tokens": 5 + deltas, "total_price": "0.0001", "currency": "USD", "latency": 1.5 } }, "files": null }),
    );
    let _ = tx.send(Ok(frame(end))).await;
}
