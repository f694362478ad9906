//! A typed client for the Dify Service API endpoints rechat needs.

use std::time::Duration;

use futures::{Stream, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use super::error::DifyError;
use super::events::{StreamEvent, decode};
use super::sse::{Decoder, Frame};

/// The kind of Dify app behind a key, from `GET /info`; it picks the endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppMode {
    Chat,
    AgentChat,
    AdvancedChat,
    /// Dify's beta "New Agent" (`agent`), served by `/chat-messages` like the others.
    Agent,
    Completion,
    Workflow,
}

impl AppMode {
    pub fn parse(mode: &str) -> Option<Self> {
        Some(match mode {
            "chat" => Self::Chat,
            "agent-chat" => Self::AgentChat,
            "advanced-chat" => Self::AdvancedChat,
            "agent" => Self::Agent,
            "completion" => Self::Completion,
            "workflow" => Self::Workflow,
            _ => return None,
        })
    }

    /// Whether Dify keeps a conversation (and returns a `conversation_id`) for this mode.
    pub fn has_conversations(self) -> bool {
        !matches!(self, Self::Completion | Self::Workflow)
    }
}

/// What `GET /info` says about the app.
#[derive(Debug, Clone, Deserialize)]
pub struct AppInfo {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub mode: String,
}

/// The input variable a workflow app receives the chat query in.
pub const WORKFLOW_QUERY_INPUT: &str = "query";

/// One chat turn to send to Dify.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub query: String,
    pub inputs: serde_json::Map<String, Value>,
    pub user: String,
    pub conversation_id: Option<String>,
    /// Dify's `files`: `{type, transfer_method, upload_file_id | url}` each.
    pub files: Vec<Value>,
}

/// What `POST /files/upload` answers (the fields rechat keeps).
#[derive(Debug, Clone, Deserialize)]
pub struct UploadedDifyFile {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub size: Option<i64>,
    #[serde(default)]
    pub extension: Option<String>,
    #[serde(default)]
    pub mime_type: Option<String>,
}

/// Timeout for an upload to Dify (the whole file).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct DifyClient {
    http: reqwest::Client,
    base: Url,
    key: SecretString,
}

/// Timeouts for every Dify call. `read` must be longer than Dify's 10 s ping interval.
pub fn http_client(connect: Duration, read: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .read_timeout(read)
        // After a burst of thousands of streams, keep a few warm connections, not thousands.
        .pool_max_idle_per_host(32)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("rechat/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a TLS backend is compiled in")
}

/// Timeout for the short non-streaming calls (info, stop, feedback, rename, delete).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

impl DifyClient {
    pub fn new(http: reqwest::Client, base: Url, key: SecretString) -> Self {
        Self {
            http,
            base: super::normalize_base_url(base),
            key,
        }
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base.as_str().trim_end_matches('/'), path)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(self.key.expose_secret())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, DifyError> {
        let response = request.send().await.map_err(|e| DifyError::network(&e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        Err(DifyError::from_response(status, &body))
    }

    /// A short JSON call; the body of the answer is not needed.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<(), DifyError> {
        self.send(self.request(method, path).timeout(CALL_TIMEOUT).json(&body))
            .await
            .map(drop)
    }

    /// `GET /info`: checks the key and tells the app's mode and name.
    pub async fn info(&self) -> Result<AppInfo, DifyError> {
        let response = self
            .send(
                self.request(reqwest::Method::GET, "info")
                    .timeout(CALL_TIMEOUT),
            )
            .await?;
        response
            .json::<AppInfo>()
            .await
            .map_err(|_| DifyError::Unavailable("Dify's /info answer was not understood".into()))
    }

    /// `POST /files/upload`: streams a file to Dify as `user`'s (never whole in memory).
    pub async fn upload(
        &self,
        file: tokio::fs::File,
        len: u64,
        name: &str,
        mime_type: Option<&str>,
        user: &str,
    ) -> Result<UploadedDifyFile, DifyError> {
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let mut part =
            reqwest::multipart::Part::stream_with_length(body, len).file_name(name.to_owned());
        // A type the client sent that is not a valid MIME type is left out, not fatal.
        if let Some(mime_type) = mime_type.filter(|m| m.parse::<mime::Mime>().is_ok()) {
            part = part
                .mime_str(mime_type)
                .map_err(|_| DifyError::Unavailable("invalid MIME type".into()))?;
        }
        let form = reqwest::multipart::Form::new()
            .text("user", user.to_owned())
            .part("file", part);
        let response = self
            .send(
                self.request(reqwest::Method::POST, "files/upload")
                    .timeout(UPLOAD_TIMEOUT)
                    .multipart(form),
            )
            .await?;
        response.json::<UploadedDifyFile>().await.map_err(|_| {
            DifyError::Unavailable("Dify's /files/upload answer was not understood".into())
        })
    }

    /// `GET /parameters`: the app's form, features and upload settings, as Dify sends them.
    pub async fn parameters(&self) -> Result<Value, DifyError> {
        self.get_json("parameters", &[]).await
    }

    /// `GET /messages/{id}/suggested`: Dify's follow-up questions for an answer; `[]` when the
    /// app has them turned off.
    pub async fn suggested(&self, message_id: &str, user: &str) -> Result<Vec<String>, DifyError> {
        let path = format!("messages/{message_id}/suggested");
        match self.get_json(&path, &[("user", user)]).await {
            Ok(answer) => Ok(answer
                .get("data")
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|q| q.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()),
            // "Suggested Questions Is Disabled."
            Err(DifyError::Api {
                status: 400,
                ref code,
                ..
            }) if code == "bad_request" => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    async fn get_json(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, DifyError> {
        let request = self.request(reqwest::Method::GET, path).query(query);
        let response = self.send(request.timeout(CALL_TIMEOUT)).await?;
        response.json::<Value>().await.map_err(|_| {
            DifyError::Unavailable(format!("Dify's /{path} answer was not understood"))
        })
    }

    /// Starts a streaming run on the endpoint of `mode` and returns its events.
    pub async fn stream(
        &self,
        mode: AppMode,
        request: ChatRequest,
    ) -> Result<impl Stream<Item = Result<StreamEvent, DifyError>> + Send + use<>, DifyError> {
        let ChatRequest {
            query,
            mut inputs,
            user,
            conversation_id,
            files,
        } = request;
        let (path, mut body) = match mode {
            AppMode::Workflow => {
                inputs
                    .entry(WORKFLOW_QUERY_INPUT)
                    .or_insert(Value::String(query));
                (
                    "workflows/run",
                    json!({ "inputs": inputs, "response_mode": "streaming", "user": user }),
                )
            }
            AppMode::Completion => (
                "completion-messages",
                json!({ "inputs": inputs, "query": query, "response_mode": "streaming", "user": user }),
            ),
            _ => (
                "chat-messages",
                json!({
                    "inputs": inputs,
                    "query": query,
                    "response_mode": "streaming",
                    "user": user,
                    "conversation_id": conversation_id.unwrap_or_default(),
                }),
            ),
        };
        if !files.is_empty() {
            body["files"] = Value::Array(files);
        }
        let response = self
            .send(
                self.request(reqwest::Method::POST, path)
                    .header("accept", "text/event-stream")
                    .json(&body),
            )
            .await?;
        Ok(events(response.bytes_stream()))
    }

    /// Asks Dify to stop a running task; Dify answers success even when nothing was running.
    pub async fn stop(&self, mode: AppMode, task_id: &str, user: &str) -> Result<(), DifyError> {
        let path = match mode {
            AppMode::Workflow => format!("workflows/tasks/{task_id}/stop"),
            AppMode::Completion => format!("completion-messages/{task_id}/stop"),
            _ => format!("chat-messages/{task_id}/stop"),
        };
        self.call(reqwest::Method::POST, &path, json!({ "user": user }))
            .await
    }

    /// `rating` is `like`, `dislike` or `None` to revoke.
    pub async fn feedback(
        &self,
        message_id: &str,
        rating: Option<&str>,
        content: Option<&str>,
        user: &str,
    ) -> Result<(), DifyError> {
        let body = json!({ "rating": rating, "user": user, "content": content });
        self.call(
            reqwest::Method::POST,
            &format!("messages/{message_id}/feedbacks"),
            body,
        )
        .await
    }

    pub async fn rename_conversation(
        &self,
        conversation_id: &str,
        name: &str,
        user: &str,
    ) -> Result<(), DifyError> {
        let body = json!({ "name": name, "auto_generate": false, "user": user });
        self.call(
            reqwest::Method::POST,
            &format!("conversations/{conversation_id}/name"),
            body,
        )
        .await
    }

    pub async fn delete_conversation(
        &self,
        conversation_id: &str,
        user: &str,
    ) -> Result<(), DifyError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("conversations/{conversation_id}"),
            json!({ "user": user }),
        )
        .await
    }
}

/// Turns a response body into events: SSE frames decoded, pings and undecodable frames skipped.
/// A read error ends the stream with `Err`; a clean end of the body simply ends it.
pub fn events<S, B>(body: S) -> impl Stream<Item = Result<StreamEvent, DifyError>> + Send
where
    S: Stream<Item = Result<B, reqwest::Error>> + Send + 'static,
    B: AsRef<[u8]>,
{
    let state = (
        Box::pin(body),
        Decoder::new(),
        Vec::<Frame>::new().into_iter(),
        false,
    );
    futures::stream::unfold(
        state,
        |(mut body, mut decoder, mut pending, mut done)| async move {
            loop {
                for frame in pending.by_ref() {
                    let Frame::Data { data, .. } = frame else {
                        continue;
                    };
                    match decode(&data) {
                        Ok(event) => return Some((Ok(event), (body, decoder, pending, done))),
                        Err(why) => tracing::warn!(
                            dify.frame_error = why,
                            "skipping an undecodable Dify frame"
                        ),
                    }
                }
                if done {
                    return None;
                }
                let mut frames = Vec::new();
                match body.next().await {
                    Some(Ok(chunk)) => decoder.push(chunk.as_ref(), &mut frames),
                    Some(Err(error)) => {
                        return Some((
                            Err(DifyError::network(&error)),
                            (body, decoder, pending, true),
                        ));
                    }
                    None => {
                        if decoder.finish(&mut frames) {
                            tracing::warn!("Dify closed the stream inside a frame");
                        }
                        done = true;
                    }
                }
                pending = frames.into_iter();
            }
        },
    )
}
