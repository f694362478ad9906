//! The answer being generated, as a pure value: apply Dify's events one at a time, get back the
//! event to relay and, when the event ends the answer, its outcome. No I/O and no clock, so the
//! relay's rules are unit-tested against every captured stream.

use async_graphql::{ID, Json};
use serde_json::Value;

use super::events::*;
use crate::conversations::domain::MessageStatus;
use crate::conversations::graphql::{
    AgentThought, ChatError, MessageFile, RetrieverResource, Usage,
};
use crate::dify::events::{Event, Ids, StreamEvent};
use crate::dify::{AppMode, DifyError};

/// How an answer ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    Stopped,
    Failed(Failure),
}

/// A failure and where it came from; the source decides which of two failures is reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub source: FailureSource,
    pub error: ChatError,
}

/// Ordered by precedence: a later failure replaces an earlier one only from a higher source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureSource {
    /// A chatflow's `workflow_finished{failed}`: Dify usually follows it with an `error` event
    /// that says more.
    Workflow,
    /// Dify's `error` event, a refused request or a broken stream.
    Dify,
    /// rechat ended the answer itself (it grew past `MAX_ANSWER_BYTES`): nothing Dify sends
    /// afterwards changes that.
    Gateway,
}

impl Outcome {
    pub fn failed(source: FailureSource, error: ChatError) -> Self {
        Self::Failed(Failure { source, error })
    }

    pub fn from_dify(error: &DifyError) -> Self {
        Self::failed(
            FailureSource::Dify,
            ChatError {
                code: error.code().to_owned(),
                message: error.message(),
                status: error.status().map(i32::from),
            },
        )
    }

    /// The outcome once `later` arrived after `self`: the first terminal event decides,
    /// except that a failure from a higher source replaces a lower one.
    pub fn merge(self, later: Self) -> Self {
        match (&self, &later) {
            (Self::Failed(a), Self::Failed(b)) if b.source > a.source => later,
            _ => self,
        }
    }

    /// The final outcome: a failure stands; otherwise a requested stop wins; a stream that ended
    /// without any terminal event was cut.
    pub fn resolve(outcome: Option<Self>, stop_requested: bool) -> Self {
        match outcome {
            Some(failed @ Self::Failed(_)) => failed,
            _ if stop_requested => Self::Stopped,
            Some(outcome) => outcome,
            None => Self::failed(
                FailureSource::Dify,
                ChatError {
                    code: "stream_interrupted".into(),
                    message: "Dify ended the stream before the answer was complete".into(),
                    status: None,
                },
            ),
        }
    }

    pub fn status(&self) -> MessageStatus {
        match self {
            Self::Completed => MessageStatus::Completed,
            Self::Stopped => MessageStatus::Stopped,
            Self::Failed(_) => MessageStatus::Failed,
        }
    }

    pub fn error(&self) -> Option<&ChatError> {
        match self {
            Self::Failed(failure) => Some(&failure.error),
            _ => None,
        }
    }

    /// A short label for logs and metrics: `completed`, `stopped` or the error code.
    pub fn label(&self) -> &str {
        match self {
            Self::Completed => "completed",
            Self::Stopped => "stopped",
            Self::Failed(failure) => &failure.error.code,
        }
    }
}

/// What applying one Dify event gives the relay.
#[derive(Default)]
pub struct Step {
    /// The event to send to the subscriber, without its `messageId` and `seq` (the emitter's job).
    pub relay: Option<ChatEvent>,
    /// The event ends the answer.
    pub terminal: Option<Outcome>,
    /// Dify's ids became known with this event (the first frame carrying any).
    pub ids_found: bool,
}

/// Everything the answer has accumulated.
#[derive(Debug)]
pub struct Answer {
    mode: AppMode,
    pub content: String,
    pub thoughts: Vec<AgentThought>,
    pub files: Vec<MessageFile>,
    pub usage: Option<Usage>,
    pub retriever_resources: Vec<RetrieverResource>,
    workflow_outputs: Option<Value>,
    workflow_tokens: Option<i64>,
    /// Dify's ids, from the first frame that carries any.
    pub ids: Ids,
    /// The longest content kept (`MAX_ANSWER_BYTES`).
    max_bytes: usize,
    /// The content reached `max_bytes`: the answer ended, and later text is dropped.
    full: bool,
}

/// A placeholder the emitter overwrites.
fn unstamped() -> ID {
    ID(String::new())
}

impl Answer {
    pub fn new(mode: AppMode, max_bytes: usize) -> Self {
        Self {
            mode,
            content: String::new(),
            thoughts: Vec::new(),
            files: Vec::new(),
            usage: None,
            retriever_resources: Vec::new(),
            workflow_outputs: None,
            workflow_tokens: None,
            ids: Ids::default(),
            max_bytes,
            full: false,
        }
    }

    /// The answer reached `MAX_ANSWER_BYTES` and ended: Dify should stop generating.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Cuts `text` (to be appended after `kept` bytes) to what still fits, at a character
    /// boundary; marks the answer full when something was cut. Returns the outcome then.
    fn fit(&mut self, kept: usize, text: &mut String) -> Option<Outcome> {
        let room = self.max_bytes.saturating_sub(kept);
        if text.len() <= room {
            return None;
        }
        text.truncate(text.floor_char_boundary(room));
        self.full = true;
        Some(Outcome::failed(
            FailureSource::Gateway,
            ChatError {
                code: "answer_too_large".into(),
                message: format!(
                    "the answer grew past {} bytes (MAX_ANSWER_BYTES): it was stopped, and keeps \
                     what fits",
                    self.max_bytes
                ),
                status: None,
            },
        ))
    }

    pub fn apply(&mut self, event: StreamEvent) -> Step {
        let ids_found = self.ids == Ids::default() && event.ids != Ids::default();
        if ids_found {
            self.ids = event.ids.clone();
        }
        let mut step = self.apply_event(event);
        step.ids_found = ids_found;
        step
    }

    fn apply_event(&mut self, event: StreamEvent) -> Step {
        let relay = |event| Step {
            relay: Some(event),
            ..Step::default()
        };
        let StreamEvent { name, event, ids } = event;
        // Dify's "New Agent" ends with one `message` repeating the whole answer: not a delta.
        let event = match event {
            Event::AnswerDelta(full) if self.mode == AppMode::Agent && name == "message" => {
                Event::AnswerReplaced(full)
            }
            event => event,
        };
        match event {
            Event::AnswerDelta(_) | Event::AnswerReplaced(_) if self.full => Step::default(),
            Event::AnswerDelta(delta) if delta.is_empty() => Step::default(),
            Event::AnswerDelta(mut delta) => {
                let terminal = self.fit(self.content.len(), &mut delta);
                self.content.push_str(&delta);
                Step {
                    relay: (!delta.is_empty()).then(|| {
                        ChatEvent::AnswerDelta(AnswerDelta {
                            message_id: unstamped(),
                            seq: 0,
                            delta,
                        })
                    }),
                    terminal,
                    ids_found: false,
                }
            }
            Event::AnswerReplaced(mut answer) => {
                let terminal = self.fit(0, &mut answer);
                self.content.clone_from(&answer);
                Step {
                    relay: Some(ChatEvent::AnswerReplaced(AnswerReplaced {
                        message_id: unstamped(),
                        seq: 0,
                        answer,
                    })),
                    terminal,
                    ids_found: false,
                }
            }
            Event::AgentThought(t) => {
                let thought = AgentThought::from(t);
                match self.thoughts.iter_mut().find(|k| k.id == thought.id) {
                    Some(known) => known.clone_from(&thought),
                    None => self.thoughts.push(thought.clone()),
                }
                relay(ChatEvent::AgentThoughtUpdated(Box::new(
                    AgentThoughtUpdated {
                        message_id: unstamped(),
                        seq: 0,
                        thought,
                    },
                )))
            }
            Event::MessageFile(f) => {
                let file = MessageFile::from(f);
                self.files.push(file.clone());
                relay(ChatEvent::MessageFileAdded(MessageFileAdded {
                    message_id: unstamped(),
                    seq: 0,
                    file,
                }))
            }
            Event::MessageEnd {
                usage,
                retriever_resources,
                files,
                raw,
            } => {
                if let Some(usage) = usage {
                    self.usage = Some(usage.into());
                }
                self.retriever_resources =
                    retriever_resources.into_iter().map(Into::into).collect();
                for file in files {
                    // Unless a `message_file` event already named it.
                    if !self.files.iter().any(|known| *known.id == file.id) {
                        self.files.push(file.into());
                    }
                }
                Step {
                    relay: Some(dify_event(name, raw)),
                    terminal: Some(Outcome::Completed),
                    ids_found: false,
                }
            }
            Event::Workflow { event, data } => Step {
                terminal: (event == "workflow_paused").then_some(Outcome::Completed),
                relay: Some(progress(event, ids.workflow_run_id, data)),
                ids_found: false,
            },
            Event::WorkflowFinished {
                status,
                error,
                outputs,
                total_tokens,
                data,
            } => {
                self.workflow_outputs = outputs;
                self.workflow_tokens = total_tokens;
                let terminal = match status.as_str() {
                    "failed" => Outcome::failed(
                        FailureSource::Workflow,
                        ChatError {
                            code: "workflow_failed".into(),
                            message: error.unwrap_or_else(|| "the workflow failed".into()),
                            status: None,
                        },
                    ),
                    "stopped" => Outcome::Stopped,
                    _ => Outcome::Completed,
                };
                Step {
                    relay: Some(progress(name, ids.workflow_run_id, data)),
                    terminal: Some(terminal),
                    ids_found: false,
                }
            }
            Event::Error {
                code,
                status,
                message,
            } => Step {
                terminal: Some(Outcome::failed(
                    FailureSource::Dify,
                    ChatError {
                        code,
                        message,
                        status: status.map(i32::from),
                    },
                )),
                ..Step::default()
            },
            Event::Other { event, raw } => relay(dify_event(event, raw)),
        }
    }

    /// Settles what is derived at the end: a workflow's answer from its outputs when it
    /// streamed no text, and its token count when Dify sent no `message_end` usage.
    pub fn settle(&mut self) {
        if self.mode == AppMode::Workflow
            && self.content.is_empty()
            && let Some(outputs) = &self.workflow_outputs
        {
            self.content = outputs_text(outputs);
        }
        if self.usage.is_none() {
            self.usage = self.workflow_tokens.map(|total_tokens| Usage {
                total_tokens,
                ..Usage::default()
            });
        }
    }
}

fn dify_event(event: String, raw: Value) -> ChatEvent {
    ChatEvent::DifyEvent(DifyEvent {
        message_id: unstamped(),
        seq: 0,
        event,
        data: Json(raw),
    })
}

fn progress(event: String, workflow_run_id: Option<String>, data: Value) -> ChatEvent {
    let field = |key: &str| data.get(key).and_then(Value::as_str).map(str::to_owned);
    ChatEvent::WorkflowProgress(Box::new(WorkflowProgress {
        message_id: unstamped(),
        seq: 0,
        workflow_run_id: workflow_run_id.or_else(|| field("workflow_run_id")),
        node_id: field("node_id"),
        node_type: field("node_type"),
        title: field("title"),
        status: field("status"),
        elapsed_time: data.get("elapsed_time").and_then(Value::as_f64),
        event,
        data: Json(data),
    }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dify::events::decode;
    use crate::dify::sse::{Decoder, Frame};

    /// Replays a capture through the accumulator: the relayed events' type names, the first
    /// terminal outcome merged with later ones, and the answer.
    fn replay(mode: AppMode, transcript: &str) -> (Vec<&'static str>, Option<Outcome>, Answer) {
        let mut decoder = Decoder::new();
        let mut frames = Vec::new();
        decoder.push(transcript.as_bytes(), &mut frames);
        decoder.finish(&mut frames);
        let mut answer = Answer::new(mode, usize::MAX);
        let mut relayed = Vec::new();
        let mut outcome: Option<Outcome> = None;
        for frame in frames {
            let Frame::Data { data, .. } = frame else {
                continue;
            };
            let Ok(event) = decode(&data) else {
                continue;
            };
            let step = answer.apply(event);
            if let Some(event) = step.relay {
                relayed.push(event.type_name());
            }
            if let Some(terminal) = step.terminal {
                outcome = Some(match outcome {
                    Some(earlier) => earlier.merge(terminal),
                    None => terminal,
                });
            }
        }
        answer.settle();
        (relayed, outcome, answer)
    }

    fn code(outcome: &Option<Outcome>) -> Option<&str> {
        outcome
            .as_ref()
            .and_then(Outcome::error)
            .map(|e| e.code.as_str())
    }

    #[test]
    fn a_chat_answer_is_the_concatenated_deltas_with_usage() {
        let (relayed, outcome, answer) = replay(
            AppMode::Chat,
            include_str!("../../tests/fixtures/dify/chat-basic.sse"),
        );
        assert_eq!(outcome, Some(Outcome::Completed));
        assert_eq!(relayed.last(), Some(&"DifyEvent"));
        assert!(
            relayed[..relayed.len() - 1]
                .iter()
                .all(|t| *t == "AnswerDelta")
        );
        assert!(!answer.content.is_empty());
        assert!(answer.usage.as_ref().is_some_and(
            |u| u.total_tokens == 1711 && u.total_price.as_deref() == Some("0.0002958")
        ));
        assert!(answer.ids.task_id.is_some() && answer.ids.conversation_id.is_some());
    }

    #[test]
    fn legacy_serialisation_gives_the_same_answer() {
        let (_, _, modern) = replay(
            AppMode::Chat,
            include_str!("../../tests/fixtures/dify/chat-basic.sse"),
        );
        let (_, outcome, legacy) = replay(
            AppMode::Chat,
            include_str!("../../tests/fixtures/dify/chat-legacy.sse"),
        );
        assert_eq!(outcome, Some(Outcome::Completed));
        assert!(!legacy.content.is_empty());
        assert_eq!(legacy.content.is_empty(), modern.content.is_empty());
    }

    #[test]
    fn message_replace_replaces_the_content() {
        let (relayed, _, answer) = replay(
            AppMode::Chat,
            include_str!("../../tests/fixtures/dify/chat-message-replace.sse"),
        );
        assert!(relayed.contains(&"AnswerReplaced"));
        let transcript = include_str!("../../tests/fixtures/dify/chat-message-replace.sse");
        let replaced = transcript
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| decode(d).ok())
            .find_map(|e| match e.event {
                Event::AnswerReplaced(text) => Some(text),
                _ => None,
            })
            .unwrap();
        assert!(answer.content.starts_with(&replaced));
    }

    #[test]
    fn agent_thoughts_are_updated_in_place_and_files_kept() {
        let (relayed, outcome, answer) = replay(
            AppMode::AgentChat,
            include_str!("../../tests/fixtures/dify/agent-chat-tool-call.sse"),
        );
        assert_eq!(outcome, Some(Outcome::Completed));
        assert!(relayed.contains(&"AgentThoughtUpdated"));
        let ids: std::collections::HashSet<_> = answer.thoughts.iter().map(|t| &t.id).collect();
        assert_eq!(ids.len(), answer.thoughts.len(), "one entry per thought id");
        assert!(answer.thoughts.iter().any(|t| t.tool.is_some()));
    }

    #[test]
    fn the_new_agents_closing_message_replaces_the_answer() {
        let transcript = include_str!("../../tests/fixtures/dify/agent-new-closing-message.sse");
        let (relayed, outcome, answer) = replay(AppMode::Agent, transcript);
        assert_eq!(outcome, Some(Outcome::Completed));
        assert!(relayed.contains(&"AnswerReplaced"));
        let (_, _, as_chat) = replay(AppMode::AgentChat, transcript);
        assert!(
            answer.content.len() < as_chat.content.len(),
            "not appended twice"
        );
    }

    #[test]
    fn a_chatflow_relays_progress_and_completes() {
        let (relayed, outcome, answer) = replay(
            AppMode::AdvancedChat,
            include_str!("../../tests/fixtures/dify/chatflow.sse"),
        );
        assert_eq!(outcome, Some(Outcome::Completed));
        assert!(relayed.contains(&"WorkflowProgress"));
        assert!(!answer.content.is_empty());
    }

    #[test]
    fn a_workflow_answer_comes_from_text_chunks_or_outputs() {
        let (_, outcome, answer) = replay(
            AppMode::Workflow,
            include_str!("../../tests/fixtures/dify/workflow-run.sse"),
        );
        assert_eq!(outcome, Some(Outcome::Completed));
        assert!(!answer.content.is_empty());
        assert!(
            answer.usage.is_some(),
            "total_tokens from workflow_finished"
        );
    }

    #[test]
    fn failures_keep_the_most_telling_error() {
        let (_, outcome, _) = replay(
            AppMode::Workflow,
            include_str!("../../tests/fixtures/dify/workflow-failed.sse"),
        );
        assert_eq!(code(&outcome), Some("workflow_failed"));
        // A chatflow's closing `error` event says more than its failed workflow.
        let (_, outcome, _) = replay(
            AppMode::AdvancedChat,
            include_str!("../../tests/fixtures/dify/chatflow-node-failed.sse"),
        );
        let code = code(&outcome).unwrap();
        assert_ne!(code, "workflow_failed", "{outcome:?}");
        let (_, outcome, answer) = replay(
            AppMode::Chat,
            include_str!("../../tests/fixtures/dify/chat-error-midstream.sse"),
        );
        assert!(matches!(outcome, Some(Outcome::Failed(_))));
        assert!(!answer.content.is_empty(), "the partial answer is kept");
    }

    #[test]
    fn a_cut_stream_has_no_outcome_and_resolves_as_interrupted() {
        let (_, outcome, answer) = replay(
            AppMode::Chat,
            include_str!("../../tests/fixtures/dify/chat-cut.sse"),
        );
        assert_eq!(outcome, None);
        assert!(!answer.content.is_empty());
        let resolved = Outcome::resolve(outcome, false);
        assert_eq!(resolved.label(), "stream_interrupted");
    }

    #[test]
    fn precedence_is_a_rule_on_the_type() {
        let workflow = Outcome::failed(
            FailureSource::Workflow,
            ChatError {
                code: "workflow_failed".into(),
                message: String::new(),
                status: None,
            },
        );
        let dify = Outcome::failed(
            FailureSource::Dify,
            ChatError {
                code: "invoke_error".into(),
                message: String::new(),
                status: None,
            },
        );
        assert_eq!(workflow.clone().merge(dify.clone()).label(), "invoke_error");
        assert_eq!(dify.clone().merge(workflow.clone()).label(), "invoke_error");
        assert_eq!(Outcome::Completed.merge(dify.clone()), Outcome::Completed);
        assert_eq!(
            Outcome::resolve(Some(Outcome::Completed), true),
            Outcome::Stopped
        );
        assert_eq!(Outcome::resolve(Some(dify.clone()), true), dify);
    }

    #[test]
    fn an_answer_past_the_limit_ends_with_what_fits() {
        let frame = |text: &str| {
            decode(
                &serde_json::json!({ "event": "message", "answer": text, "task_id": "t" })
                    .to_string(),
            )
            .unwrap()
        };
        let mut answer = Answer::new(AppMode::Chat, 10);
        assert!(answer.apply(frame("1234567")).terminal.is_none());
        // "é" is two bytes: the cut never splits a character.
        let step = answer.apply(frame("89é€"));
        assert_eq!(answer.content, "123456789");
        assert!(matches!(step.relay, Some(ChatEvent::AnswerDelta(ref d)) if d.delta == "89"));
        assert_eq!(code(&step.terminal), Some("answer_too_large"));
        assert!(answer.is_full());
        let later = answer.apply(frame("more"));
        assert!(later.relay.is_none() && later.terminal.is_none(), "dropped");
        assert_eq!(answer.content, "123456789");
        let dify_error = Outcome::failed(
            FailureSource::Dify,
            ChatError {
                code: "internal".into(),
                message: "x".into(),
                status: None,
            },
        );
        let merged = step.terminal.unwrap().merge(dify_error);
        assert_eq!(
            merged.label(),
            "answer_too_large",
            "the gateway's reason stands"
        );
    }
}
