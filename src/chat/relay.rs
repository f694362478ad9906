//! One answer's life: read Dify's stream to the end whatever the subscriber does, relay each
//! event, hand the partial answer to the writer, write the result once and only then send the
//! terminal event.
//!
//! The rules live in [`Answer`] (pure, tested against the captures); this module is the loop
//! around it. The loop never awaits the database: partial content and Dify's ids go to the
//! process's [`Writer`](super::writer::Writer), so a slow or frozen MySQL delays what readers of
//! the table see, never a delta. The relay runs in its own task and talks to the subscriber
//! through a channel, so a subscriber that disconnects or stops reading never stalls it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::answer::{Answer, Outcome};
use super::events::*;
use super::log::AnswerLog;
use super::{StreamHandle, dify_user};
use crate::app::{App, Dify};
use crate::chat::db::{self as chat_db, FinalAnswer};
use crate::conversations::db::{ConversationRecord, MessageRecord};
use crate::conversations::domain::{MessageId, MessageRole, MessageStatus};
use crate::conversations::graphql::{ChatError, Conversation, Message};
use crate::db::STATEMENT_TIMEOUT;
use crate::dify::DifyError;
use crate::dify::client::ChatRequest;
use crate::dify::events::StreamEvent;
use crate::metrics::Metrics;

/// How long to keep reading after a terminal event, for a late `message_end` (chatflow).
const TRAILING_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for Dify to end a stopped stream before ending it here.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the turn is about, prepared before anything is sent.
pub struct Turn {
    pub conversation: ConversationRecord,
    pub question: MessageRecord,
    pub answer: MessageRecord,
    pub request: ChatRequest,
}

/// Appends events to the answer's log, which its subscribers read, stamping `messageId` and
/// `seq`: the one place that numbers events. Subscribers that left are no concern of the relay;
/// the answer goes on.
pub struct Emitter {
    log: Arc<AnswerLog>,
    message_id: async_graphql::ID,
    seq: i32,
    metrics: Arc<Metrics>,
}

impl Emitter {
    pub fn new(log: Arc<AnswerLog>, id: MessageId, metrics: Arc<Metrics>) -> Self {
        Self {
            log,
            message_id: id.into(),
            seq: 0,
            metrics,
        }
    }

    pub fn send(&mut self, mut event: ChatEvent) {
        self.seq += 1;
        event.stamp(&self.message_id, self.seq);
        if matches!(event, ChatEvent::AnswerDelta(_)) {
            self.metrics.deltas_relayed.inc();
        }
        self.metrics.events_relayed.inc();
        self.log.append(event);
    }

    /// The `seq` of the last event sent.
    pub fn seq(&self) -> i32 {
        self.seq
    }
}

/// Where the stream is: reading; reading on briefly after a terminal event (a chatflow's late
/// `message_end`); or stopped, waiting a little for Dify to end the stream.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Streaming,
    Draining { until: Instant },
    Stopping { until: Instant },
}

impl Phase {
    fn until(self) -> Option<Instant> {
        match self {
            Self::Streaming => None,
            Self::Draining { until } | Self::Stopping { until } => Some(until),
        }
    }

    fn earliest(self, deadline: Instant) -> Instant {
        self.until().map_or(deadline, |until| until.min(deadline))
    }

    /// A terminal event arrived.
    fn drain(self) -> Self {
        let until = self.earliest(Instant::now() + TRAILING_GRACE);
        match self {
            Self::Stopping { .. } => Self::Stopping { until },
            _ => Self::Draining { until },
        }
    }

    /// A stop was requested.
    fn stop(self) -> Self {
        Self::Stopping {
            until: self.earliest(Instant::now() + STOP_GRACE),
        }
    }

    fn is_stopping(self) -> bool {
        matches!(self, Self::Stopping { .. })
    }
}

struct Relay {
    app: App,
    dify: Dify,
    message_id: MessageId,
    conversation: ConversationRecord,
    answer: Answer,
    phase: Phase,
    /// The content changed since it was last handed to the writer.
    dirty: bool,
    stop_sent: bool,
}

pub async fn run(app: App, dify: Dify, turn: Turn, log: Arc<AnswerLog>, handle: Arc<StreamHandle>) {
    let Turn {
        conversation,
        question,
        answer,
        request,
    } = turn;
    let mut emitter = Emitter::new(log, answer.id, app.metrics.clone());
    emitter.send(ChatEvent::ChatStarted(Box::new(ChatStarted {
        message_id: answer.id.into(),
        seq: 0,
        conversation: Conversation::from(&conversation),
        user_message: question.into(),
        assistant_message: answer.clone().into(),
    })));
    let mut relay = Relay {
        answer: Answer::new(dify.mode, app.config.max_answer_bytes),
        app,
        dify,
        message_id: answer.id,
        conversation,
        phase: Phase::Streaming,
        dirty: false,
        stop_sent: false,
    };
    let outcome = relay.stream(request, &handle, &mut emitter).await;
    // The terminal event's seq is stored with the answer, for resumes after the log is gone.
    let terminal = Box::pin(relay.finish(outcome, emitter.seq() + 1)).await;
    emitter.send(terminal);
}

impl Relay {
    async fn stream(
        &mut self,
        request: ChatRequest,
        handle: &StreamHandle,
        emitter: &mut Emitter,
    ) -> Outcome {
        let called = Instant::now();
        // Boxed: the one-off futures would otherwise add their size to every live relay's task.
        let stream = match Box::pin(self.open(request)).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "Dify refused the chat request");
                return Outcome::from_dify(&error);
            }
        };
        futures::pin_mut!(stream);
        let mut hand_off = tokio::time::interval(self.app.config.flush_interval);
        hand_off.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = tokio::time::sleep_until(Instant::now());
        tokio::pin!(deadline);
        let mut outcome: Option<Outcome> = None;
        let mut first_event = true;
        loop {
            tokio::select! {
                () = handle.stop.notified(), if !self.phase.is_stopping() => {
                    self.phase = self.phase.stop();
                    deadline.as_mut().reset(self.phase.until().unwrap_or_else(Instant::now));
                    self.send_stop();
                }
                () = &mut deadline, if self.phase.until().is_some() => break,
                _ = hand_off.tick() => self.hand_off(emitter.seq()),
                item = stream.next() => {
                    let read = Instant::now();
                    if std::mem::take(&mut first_event) {
                        self.app.metrics.dify_first_event_seconds.observe((read - called).as_secs_f64());
                    }
                    let event = match item {
                        None => break,
                        Some(Ok(event)) => event,
                        Some(Err(error)) => {
                            tracing::warn!(%error, "the Dify stream broke");
                            if outcome.is_none() {
                                // Dify may still be generating (a silent model, a cut
                                // connection): stop it, so nobody pays for an unseen answer.
                                self.stop_at_dify();
                            }
                            outcome = Some(merge(outcome, Outcome::from_dify(&error)));
                            break;
                        }
                    };
                    if let Some(terminal) = self.apply(event, emitter) {
                        outcome = Some(merge(outcome, terminal));
                        self.phase = self.phase.drain();
                        deadline.as_mut().reset(self.phase.until().unwrap_or_else(Instant::now));
                    }
                    self.app.metrics.relay_seconds.observe(read.elapsed().as_secs_f64());
                }
            }
        }
        Outcome::resolve(outcome, self.phase.is_stopping())
    }

    /// Applies one Dify event: relays what it gives, hands Dify's ids to the writer when they
    /// first appear. Returns the outcome when the event ends the answer.
    fn apply(&mut self, event: StreamEvent, emitter: &mut Emitter) -> Option<Outcome> {
        let step = self.answer.apply(event);
        if step.ids_found {
            let conversation = self
                .dify
                .mode
                .has_conversations()
                .then_some(self.conversation.id);
            self.app
                .writer
                .ids(self.message_id, &self.answer.ids, conversation);
            self.send_stop();
        }
        if self.answer.is_full() {
            // Ended here, not by Dify: stop it generating (and billing) what nobody will see.
            self.stop_at_dify();
        }
        if let Some(event) = step.relay {
            self.dirty |= matches!(
                event,
                ChatEvent::AnswerDelta(_) | ChatEvent::AnswerReplaced(_)
            );
            emitter.send(event);
        }
        step.terminal
    }

    /// Gives the writer the content so far (covering the events up to `seq`), when it changed.
    fn hand_off(&mut self, seq: i32) {
        if std::mem::take(&mut self.dirty) {
            self.app
                .writer
                .partial(self.message_id, self.answer.content.clone(), seq);
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
                let conversation = self.conversation.id;
                self.app
                    .db
                    .run(STATEMENT_TIMEOUT, async |conn| {
                        crate::conversations::db::clear_dify_conversation_id(conn, conversation)
                            .await
                    })
                    .await
                    .map_err(|_| DifyError::Unavailable("database unavailable".into()))?;
                request.conversation_id = None;
                self.dify.client.stream(self.dify.mode, request).await
            }
            other => other,
        }
    }

    /// Asks Dify to stop as soon as both a stop was requested and the task id is known.
    fn send_stop(&mut self) {
        if self.phase.is_stopping() {
            self.stop_at_dify();
        }
    }

    /// Asks Dify to stop the task, once (when its id is known).
    fn stop_at_dify(&mut self) {
        if self.stop_sent {
            return;
        }
        let Some(task_id) = self.answer.ids.task_id.clone() else {
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

    /// Writes the answer and returns the terminal event describing what was stored.
    async fn finish(mut self, outcome: Outcome, last_seq: i32) -> ChatEvent {
        self.answer.settle();
        self.app
            .writer
            .forget(self.message_id, self.conversation.id);
        let has_conversations = self.dify.mode.has_conversations();
        let ids = &self.answer.ids;
        let final_answer = Arc::new(FinalAnswer {
            id: self.message_id,
            conversation: self.conversation.id,
            content: std::mem::take(&mut self.answer.content),
            last_seq,
            status: outcome.status(),
            error: outcome.error().and_then(|e| serde_json::to_string(e).ok()),
            usage: self
                .answer
                .usage
                .as_ref()
                .and_then(|usage| serde_json::to_string(usage).ok()),
            retriever_resources: json_list(&self.answer.retriever_resources),
            agent_thoughts: json_list(&self.answer.thoughts),
            files: json_list(&self.answer.files),
            dify_message_id: ids.message_id.clone(),
            dify_task_id: ids.task_id.clone(),
            dify_workflow_run_id: ids.workflow_run_id.clone(),
            dify_conversation_id: ids.conversation_id.clone().filter(|_| has_conversations),
            tokens: self
                .answer
                .usage
                .as_ref()
                .map_or(0, |usage| u64::try_from(usage.total_tokens).unwrap_or(0)),
        });
        let stored = self.write_final(&final_answer).await;
        // The batch has let go of it: the content moves on without a copy.
        let final_answer = Arc::unwrap_or_clone(final_answer);
        let chars = final_answer.content.chars().count();
        let error = outcome.error().cloned();
        let message = match stored {
            Stored::Written(stored) => {
                if final_answer.tokens > 0 {
                    self.app.writer.tokens_to_settle();
                }
                let mut message = self.describe(final_answer.content, stored.status, error);
                message.feedback = stored.feedback;
                message.created_at = crate::db::types::utc(stored.created_at);
                message.updated_at = crate::db::types::utc(stored.updated_at);
                message
            }
            Stored::Deleted => {
                tracing::info!(message.id = %self.message_id, "the conversation was deleted while answering");
                self.describe(final_answer.content, final_answer.status, error)
            }
            Stored::NotSaved => {
                let error = ChatError {
                    code: "not_saved".into(),
                    message: "the answer could not be saved: the database is unavailable".into(),
                    status: None,
                };
                self.describe(final_answer.content, MessageStatus::Failed, Some(error))
            }
        };
        let status = message.status;
        let label = match (&message.error, status) {
            (Some(error), MessageStatus::Failed) => error.code.clone(),
            _ => outcome.label().to_owned(),
        };
        self.app.metrics.outcome(&label);
        tracing::info!(message.id = %self.message_id, ?status, outcome = label, chars, "answer finished");
        match (status, message.error.clone()) {
            (MessageStatus::Failed, Some(error)) => ChatEvent::ChatFailed(Box::new(ChatFailed {
                message_id: self.message_id.into(),
                seq: 0,
                message,
                error,
            })),
            _ => ChatEvent::ChatCompleted(Box::new(ChatCompleted {
                message_id: self.message_id.into(),
                seq: 0,
                message,
            })),
        }
    }

    /// The final write (batched with other answers' by `finals`), retried while the database
    /// is away, for as long as the sweeper would leave the answer alone: it is the one write
    /// that must not be lost.
    async fn write_final(&self, answer: &Arc<FinalAnswer>) -> Stored {
        let give_up = Instant::now() + self.app.config.stale_stream_after;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.app.finals.write(answer.clone()).await {
                Ok(Some(stored)) => return Stored::Written(stored),
                Ok(None) => return Stored::Deleted,
                Err(error) if Instant::now() + pause < give_up => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = pause.as_millis() as u64,
                        "saving the answer failed; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(error) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "saving the answer failed; giving up"
                    );
                    return Stored::NotSaved;
                }
            }
        }
    }

    /// The answer as the final write stores it (with `status` and `error` as given), from the
    /// typed values the accumulator holds.
    fn describe(
        &mut self,
        content: String,
        status: MessageStatus,
        error: Option<ChatError>,
    ) -> Message {
        let at = chrono::Utc::now();
        Message {
            id: self.message_id.into(),
            conversation_id: self.conversation.id.into(),
            role: MessageRole::Assistant,
            content,
            status,
            error,
            usage: self.answer.usage.take(),
            retriever_resources: std::mem::take(&mut self.answer.retriever_resources),
            agent_thoughts: std::mem::take(&mut self.answer.thoughts),
            files: std::mem::take(&mut self.answer.files),
            feedback: None,
            created_at: at,
            updated_at: at,
            client_message_id: None,
        }
    }
}

enum Stored {
    Written(chat_db::StoredAnswer),
    /// The conversation was deleted while the answer streamed.
    Deleted,
    /// The database stayed away.
    NotSaved,
}

fn merge(earlier: Option<Outcome>, later: Outcome) -> Outcome {
    match earlier {
        Some(earlier) => earlier.merge(later),
        None => later,
    }
}

/// A list as stored JSON; none when empty.
fn json_list<T: serde::Serialize>(items: &[T]) -> Option<String> {
    (!items.is_empty()).then(|| serde_json::to_string(items).unwrap_or_default())
}
