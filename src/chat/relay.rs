//! One answer's life: read Dify's stream to the end whatever the subscriber does, relay each
//! event, flush the partial answer at a bounded rate, write the result once.
//!
//! The relay runs in its own task and talks to the subscriber through an unbounded channel, so
//! a subscriber that disconnects or stops reading never stalls or cancels it.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::Json;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{Instant, sleep_until};

use super::events::*;
use super::{StreamHandle, dify_user};
use crate::app::{App, Dify};
use crate::chat::db::{self as chat_db, FinalAnswer};
use crate::conversations::db::{ConversationRecord, MessageRecord};
use crate::conversations::domain::{MessageId, MessageStatus};
use crate::conversations::graphql::{AgentThought, ChatError, Conversation, Message, MessageFile};
use crate::dify::client::ChatRequest;
use crate::dify::events::{Event, StreamEvent};
use crate::dify::{AppMode, DifyError};

/// How long to keep reading after a terminal event, for a late `message_end` (chatflow).
const TRAILING_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for Dify to end a stopped stream before ending it here.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A live stream writes at least this often, even while Dify is silent (a slow tool).
pub const HEARTBEAT: Duration = Duration::from_secs(20);

/// What the turn is about, prepared before anything is sent.
pub struct Turn {
    pub conversation: ConversationRecord,
    pub question: MessageRecord,
    pub answer: MessageRecord,
    pub request: ChatRequest,
}

enum Outcome {
    Completed,
    Stopped,
    Failed(ChatError),
}

fn failed(error: &DifyError) -> Outcome {
    Outcome::Failed(ChatError {
        code: error.code().to_owned(),
        message: error.message(),
        status: error.status().map(i32::from),
    })
}

struct Relay {
    app: App,
    dify: Dify,
    tx: UnboundedSender<ChatEvent>,
    message_id: MessageId,
    id: async_graphql::ID,
    seq: i32,
    conversation: ConversationRecord,
    content: String,
    /// The content changed since it was last written.
    dirty: bool,
    last_write: Instant,
    thoughts: Vec<AgentThought>,
    files: Vec<MessageFile>,
    usage: Option<Value>,
    retriever_resources: Option<Value>,
    workflow_outputs: Option<Value>,
    workflow_tokens: Option<i64>,
    task_id: Option<String>,
    ids_recorded: bool,
    stopping: bool,
    stop_sent: bool,
}

pub async fn run(
    app: App,
    dify: Dify,
    turn: Turn,
    tx: UnboundedSender<ChatEvent>,
    handle: Arc<StreamHandle>,
) {
    let Turn {
        conversation,
        question,
        answer,
        request,
    } = turn;
    let mut relay = Relay {
        app,
        dify,
        tx,
        message_id: answer.id,
        id: answer.id.into(),
        seq: 0,
        conversation,
        content: String::new(),
        dirty: false,
        last_write: Instant::now(),
        thoughts: Vec::new(),
        files: Vec::new(),
        usage: None,
        retriever_resources: None,
        workflow_outputs: None,
        workflow_tokens: None,
        task_id: None,
        ids_recorded: false,
        stopping: false,
        stop_sent: false,
    };
    let seq = relay.next_seq();
    relay.emit(ChatEvent::ChatStarted(Box::new(ChatStarted {
        message_id: relay.id.clone(),
        seq,
        conversation: Conversation::from(&relay.conversation),
        user_message: question.into(),
        assistant_message: answer.into(),
    })));
    let outcome = relay.consume(request, &handle).await;
    relay.finish(outcome).await;
}

impl Relay {
    fn next_seq(&mut self) -> i32 {
        self.seq += 1;
        self.seq
    }

    /// Sends to the subscriber if it is still there; the answer goes on either way.
    fn emit(&self, event: ChatEvent) {
        let _ = self.tx.send(event);
    }

    async fn consume(&mut self, request: ChatRequest, handle: &StreamHandle) -> Outcome {
        let stream = match self.open(request).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "Dify refused the chat request");
                return failed(&error);
            }
        };
        futures::pin_mut!(stream);
        let mut flush = tokio::time::interval(self.app.config.flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outcome: Option<Outcome> = None;
        let mut deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                () = handle.stop.notified(), if !self.stopping => {
                    self.stopping = true;
                    self.send_stop();
                    let stop_by = Instant::now() + STOP_GRACE;
                    deadline = Some(deadline.map_or(stop_by, |d| d.min(stop_by)));
                }
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => break,
                _ = flush.tick() => self.flush().await,
                item = stream.next() => match item {
                    None => break,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "the Dify stream broke");
                        outcome.get_or_insert(failed(&error));
                        break;
                    }
                    Some(Ok(event)) => {
                        if let Some(terminal) = self.handle(event).await {
                            // An `error` event carries Dify's code; it beats an earlier failed workflow.
                            let replace = match (&outcome, &terminal) {
                                (None, _) => true,
                                (Some(Outcome::Failed(e)), Outcome::Failed(_)) => e.code == "workflow_failed",
                                _ => false,
                            };
                            if replace {
                                outcome = Some(terminal);
                            }
                            deadline.get_or_insert(Instant::now() + TRAILING_GRACE);
                        }
                    }
                },
            }
        }
        match outcome {
            Some(Outcome::Failed(error)) => Outcome::Failed(error),
            _ if self.stopping => Outcome::Stopped,
            Some(outcome) => outcome,
            None => Outcome::Failed(ChatError {
                code: "stream_interrupted".into(),
                message: "Dify ended the stream before the answer was complete".into(),
                status: None,
            }),
        }
    }

    /// Starts Dify's stream. When Dify no longer knows the stored conversation (deleted in its
    /// console, or its data reset), the turn continues in a new Dify conversation rather than
    /// failing every turn from now on; Dify's earlier context is lost either way.
    async fn open(
        &mut self,
        mut request: ChatRequest,
    ) -> Result<impl futures::Stream<Item = Result<StreamEvent, DifyError>> + use<>, DifyError>
    {
        match self
            .dify
            .client
            .stream(self.dify.mode, request.clone())
            .await
        {
            Err(DifyError::Api { status: 404, .. }) if request.conversation_id.is_some() => {
                tracing::warn!(
                    dify.conversation_id = request.conversation_id,
                    "Dify no longer knows this conversation; continuing in a new one"
                );
                let mut conn = self
                    .app
                    .db
                    .get()
                    .await
                    .map_err(|_| DifyError::Unavailable("database unavailable".into()))?;
                crate::conversations::db::clear_dify_conversation_id(
                    &mut conn,
                    self.conversation.id,
                )
                .await
                .map_err(|_| DifyError::Unavailable("database unavailable".into()))?;
                drop(conn);
                request.conversation_id = None;
                self.dify.client.stream(self.dify.mode, request).await
            }
            other => other,
        }
    }

    /// Asks Dify to stop, once, as soon as the task id is known.
    fn send_stop(&mut self) {
        let Some(task_id) = self
            .task_id
            .clone()
            .filter(|_| self.stopping && !self.stop_sent)
        else {
            return;
        };
        self.stop_sent = true;
        let (client, mode, user) = (
            self.dify.client.clone(),
            self.dify.mode,
            dify_user(self.conversation.user_id),
        );
        tokio::spawn(async move {
            if let Err(error) = client.stop(mode, &task_id, &user).await {
                tracing::warn!(%error, dify.task_id = task_id, "Dify stop failed");
            }
        });
    }

    async fn record_ids(&mut self, event: &StreamEvent) {
        if self.ids_recorded {
            return;
        }
        let ids = &event.ids;
        if ids.task_id.is_none() && ids.message_id.is_none() && ids.workflow_run_id.is_none() {
            return;
        }
        self.ids_recorded = true;
        self.task_id.clone_from(&ids.task_id);
        self.send_stop();
        let result = async {
            let mut conn = self.app.db.get().await?;
            if let Some(dify_conversation) = ids
                .conversation_id
                .as_deref()
                .filter(|_| self.dify.mode.has_conversations())
            {
                crate::conversations::db::set_dify_conversation_id(
                    &mut conn,
                    self.conversation.id,
                    dify_conversation,
                )
                .await?;
            }
            chat_db::record_dify_ids(
                &mut conn,
                self.message_id,
                ids.message_id.as_deref(),
                ids.task_id.as_deref(),
                ids.workflow_run_id.as_deref(),
            )
            .await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(error) = result {
            tracing::error!(error = format!("{error:#}"), "storing Dify's ids failed");
        }
        self.last_write = Instant::now();
    }

    /// Relays one event; returns the outcome when the event ends the answer.
    async fn handle(&mut self, event: StreamEvent) -> Option<Outcome> {
        self.record_ids(&event).await;
        let id = self.id.clone();
        let StreamEvent {
            name,
            event,
            ids,
            raw,
        } = event;
        // Dify's "New Agent" ends with one `message` repeating the whole answer: not a delta.
        let event = match event {
            Event::AnswerDelta(full) if self.dify.mode == AppMode::Agent && name == "message" => {
                Event::AnswerReplaced(full)
            }
            event => event,
        };
        let relayed = match event {
            Event::AnswerDelta(delta) if delta.is_empty() => return None,
            Event::AnswerDelta(delta) => {
                self.content.push_str(&delta);
                self.dirty = true;
                ChatEvent::AnswerDelta(AnswerDelta {
                    message_id: id,
                    seq: self.next_seq(),
                    delta,
                })
            }
            Event::AnswerReplaced(answer) => {
                self.content.clone_from(&answer);
                self.dirty = true;
                ChatEvent::AnswerReplaced(AnswerReplaced {
                    message_id: id,
                    seq: self.next_seq(),
                    answer,
                })
            }
            Event::AgentThought(t) => {
                let thought = AgentThought {
                    id: t.id.into(),
                    position: t.position,
                    thought: t.thought,
                    tool: t.tool,
                    tool_input: t.tool_input,
                    observation: t.observation,
                    files: t.files,
                };
                match self
                    .thoughts
                    .iter_mut()
                    .find(|known| known.id == thought.id)
                {
                    Some(known) => *known = thought.clone(),
                    None => self.thoughts.push(thought.clone()),
                }
                ChatEvent::AgentThoughtUpdated(AgentThoughtUpdated {
                    message_id: id,
                    seq: self.next_seq(),
                    thought,
                })
            }
            Event::MessageFile(f) => {
                let file = MessageFile {
                    id: f.id.into(),
                    kind: f.kind,
                    url: f.url,
                    belongs_to: f.belongs_to,
                };
                self.files.push(file.clone());
                ChatEvent::MessageFileAdded(MessageFileAdded {
                    message_id: id,
                    seq: self.next_seq(),
                    file,
                })
            }
            Event::MessageEnd {
                usage,
                retriever_resources,
                files,
            } => {
                self.usage = usage.or(self.usage.take());
                self.retriever_resources = retriever_resources;
                self.add_end_files(files);
                let seq = self.next_seq();
                self.emit(ChatEvent::DifyEvent(DifyEvent {
                    message_id: id,
                    seq,
                    event: name,
                    data: Json(raw),
                }));
                return Some(Outcome::Completed);
            }
            Event::Workflow { event, data } => {
                let terminal = (event == "workflow_paused").then_some(Outcome::Completed);
                let progress = self.progress(event, ids.workflow_run_id, data);
                self.emit(progress);
                return terminal;
            }
            Event::WorkflowFinished {
                status,
                error,
                outputs,
                total_tokens,
                data,
            } => {
                self.workflow_outputs = outputs;
                self.workflow_tokens = total_tokens;
                let progress = self.progress(name, ids.workflow_run_id, data);
                self.emit(progress);
                return Some(match status.as_str() {
                    "failed" => Outcome::Failed(ChatError {
                        code: "workflow_failed".into(),
                        message: error.unwrap_or_else(|| "the workflow failed".into()),
                        status: None,
                    }),
                    "stopped" => Outcome::Stopped,
                    _ => Outcome::Completed,
                });
            }
            Event::Error {
                code,
                status,
                message,
            } => {
                return Some(Outcome::Failed(ChatError {
                    code,
                    message,
                    status: status.map(i32::from),
                }));
            }
            Event::Other { event } => ChatEvent::DifyEvent(DifyEvent {
                message_id: id,
                seq: self.next_seq(),
                event,
                data: Json(raw),
            }),
        };
        self.emit(relayed);
        None
    }

    fn progress(
        &mut self,
        event: String,
        workflow_run_id: Option<String>,
        data: Value,
    ) -> ChatEvent {
        let field = |key: &str| data.get(key).and_then(Value::as_str).map(str::to_owned);
        let workflow_run_id = workflow_run_id.or_else(|| field("workflow_run_id"));
        ChatEvent::WorkflowProgress(WorkflowProgress {
            message_id: self.id.clone(),
            seq: self.next_seq(),
            event,
            workflow_run_id,
            node_id: field("node_id"),
            node_type: field("node_type"),
            title: field("title"),
            status: field("status"),
            elapsed_time: data.get("elapsed_time").and_then(Value::as_f64),
            data: Json(data),
        })
    }

    /// `message_end.files`: Dify's file objects, added unless a `message_file` already named them.
    fn add_end_files(&mut self, files: Option<Value>) {
        let Some(Value::Array(files)) = files else {
            return;
        };
        for file in files {
            let text = |key: &str| {
                file.get(key)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            let Some(id) = text("related_id")
                .or_else(|| text("upload_file_id"))
                .or_else(|| text("id"))
            else {
                continue;
            };
            if self.files.iter().any(|known| known.id.as_str() == id) {
                continue;
            }
            self.files.push(MessageFile {
                id: id.into(),
                kind: text("type").unwrap_or_else(|| "file".into()),
                url: text("url").or_else(|| text("remote_url")),
                belongs_to: text("belongs_to").or_else(|| Some("assistant".into())),
            });
        }
    }

    /// Writes the partial answer if it changed, or a heartbeat if nothing was written lately.
    async fn flush(&mut self) {
        if !self.dirty && self.last_write.elapsed() < HEARTBEAT {
            return;
        }
        let result = async {
            let mut conn = self.app.db.get().await?;
            chat_db::flush(&mut conn, self.message_id, &self.content).await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.dirty = false;
                self.last_write = Instant::now();
            }
            // The final write retries; a lost flush only delays what a reader sees.
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "flushing the partial answer failed"
            ),
        }
    }

    async fn finish(mut self, outcome: Outcome) {
        if self.dify.mode == AppMode::Workflow
            && self.content.is_empty()
            && let Some(outputs) = &self.workflow_outputs
        {
            self.content = outputs_text(outputs);
        }
        if self.usage.is_none() {
            self.usage = self
                .workflow_tokens
                .map(|total| serde_json::json!({ "total_tokens": total }));
        }
        let (status, error) = match &outcome {
            Outcome::Completed => (MessageStatus::Completed, None),
            Outcome::Stopped => (MessageStatus::Stopped, None),
            Outcome::Failed(error) => (MessageStatus::Failed, Some(error.clone())),
        };
        let json = |v: &Value| Some(v.to_string());
        let answer = FinalAnswer {
            content: &self.content,
            status,
            error: error.as_ref().and_then(|e| serde_json::to_string(e).ok()),
            usage: self.usage.as_ref().and_then(json),
            retriever_resources: self.retriever_resources.as_ref().and_then(json),
            agent_thoughts: json_list(&self.thoughts),
            files: json_list(&self.files),
        };
        let stored = self.write_final(answer).await;
        tracing::info!(message.id = %self.message_id, status = ?stored.status, chars = self.content.chars().count(), "answer finished");
        let seq = self.next_seq();
        let message_id = self.id.clone();
        self.emit(match (stored.status, stored.error.clone()) {
            (MessageStatus::Failed, Some(error)) => ChatEvent::ChatFailed(ChatFailed {
                message_id,
                seq,
                message: stored,
                error,
            }),
            _ => ChatEvent::ChatCompleted(ChatCompleted {
                message_id,
                seq,
                message: stored,
            }),
        });
    }

    /// The final write, retried a few times: it is the one that must not be lost.
    async fn write_final(&self, answer: FinalAnswer<'_>) -> Message {
        for attempt in 1..=5u32 {
            let result = async {
                let mut conn = self.app.db.get().await?;
                Ok::<_, anyhow::Error>(
                    chat_db::finish(
                        &mut conn,
                        self.message_id,
                        self.conversation.id,
                        answer.clone(),
                    )
                    .await?,
                )
            }
            .await;
            match result {
                Ok(Some(record)) => return record.into(),
                Ok(None) => {
                    tracing::info!(message.id = %self.message_id, "the conversation was deleted while answering");
                    break;
                }
                Err(error) => {
                    tracing::error!(
                        attempt,
                        error = format!("{error:#}"),
                        "saving the answer failed"
                    );
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
        // Not stored (deleted, or MySQL is down): describe the answer as it is.
        let mut record = MessageRecord::new(
            self.conversation.id,
            crate::conversations::domain::MessageRole::Assistant,
            answer.content.to_owned(),
            answer.status,
        );
        record.id = self.message_id;
        record.error = answer.error.clone();
        record.usage = answer.usage.clone();
        record.retriever_resources = answer.retriever_resources.clone();
        record.agent_thoughts = answer.agent_thoughts.clone();
        record.files = answer.files.clone();
        record.into()
    }
}

/// A list as stored JSON; none when empty.
fn json_list<T: serde::Serialize>(items: &[T]) -> Option<String> {
    (!items.is_empty()).then(|| serde_json::to_string(items).unwrap_or_default())
}

/// A workflow's answer when it streamed no text: its single text output, or all outputs as JSON.
fn outputs_text(outputs: &Value) -> String {
    match outputs {
        Value::Object(map) if map.len() == 1 => match map.values().next() {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        },
        Value::Object(map) if map.is_empty() => String::new(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}
