//! The `ChatEvent` types a `chat` subscription sends.

use async_graphql::{ID, Interface, Json, SimpleObject};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conversations::graphql::{AgentThought, ChatError, Conversation, Message, MessageFile};

/// One event of an answer. Every event names the assistant message it belongs to and a
/// sequence number that starts at 1 and grows by 1 per event of that message; a resumed
/// subscription (`resumeChat`) gets the same events with the same numbers.
#[derive(Interface, Serialize, Deserialize)]
#[serde(tag = "__typename")]
#[graphql(
    field(
        name = "message_id",
        ty = "&ID",
        desc = "The assistant message this event belongs to."
    ),
    field(
        name = "seq",
        ty = "&i32",
        desc = "1 for ChatStarted, then one more per event."
    )
)]
// The large variants are boxed: every queued event takes the size of the largest variant.
pub enum ChatEvent {
    ChatStarted(Box<ChatStarted>),
    AnswerDelta(AnswerDelta),
    AnswerReplaced(AnswerReplaced),
    AgentThoughtUpdated(Box<AgentThoughtUpdated>),
    MessageFileAdded(MessageFileAdded),
    WorkflowProgress(Box<WorkflowProgress>),
    DifyEvent(DifyEvent),
    ChatSnapshot(Box<ChatSnapshot>),
    ChatCompleted(Box<ChatCompleted>),
    ChatFailed(Box<ChatFailed>),
}

/// Evaluates `$body` with `$e` bound to the inner event of whichever variant `$event` is.
macro_rules! each_variant {
    ($event:expr, $e:ident => $body:expr) => {
        match $event {
            ChatEvent::ChatStarted($e) => $body,
            ChatEvent::AnswerDelta($e) => $body,
            ChatEvent::AnswerReplaced($e) => $body,
            ChatEvent::AgentThoughtUpdated($e) => $body,
            ChatEvent::MessageFileAdded($e) => $body,
            ChatEvent::WorkflowProgress($e) => $body,
            ChatEvent::DifyEvent($e) => $body,
            ChatEvent::ChatSnapshot($e) => $body,
            ChatEvent::ChatCompleted($e) => $body,
            ChatEvent::ChatFailed($e) => $body,
        }
    };
}

impl ChatEvent {
    /// Sets the event's `messageId` and `seq`: done in one place, by the relay's emitter.
    pub fn stamp(&mut self, message_id: &ID, seq: i32) {
        each_variant!(self, e => {
            e.message_id.clone_from(message_id);
            e.seq = seq;
        })
    }

    pub fn seq_number(&self) -> i32 {
        each_variant!(self, e => e.seq)
    }

    /// The last event of an answer.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::ChatCompleted(_) | Self::ChatFailed(_))
    }

    /// Roughly the bytes this event takes while it waits for its subscriber: its text plus a
    /// fixed allowance for the rest.
    pub fn weight(&self) -> usize {
        const FIXED: usize = 256;
        FIXED
            + match self {
                Self::AnswerDelta(e) => e.delta.len(),
                Self::AnswerReplaced(e) => e.answer.len(),
                Self::AgentThoughtUpdated(e) => {
                    let t = &e.thought;
                    t.thought.len()
                        + t.tool_input.as_ref().map_or(0, String::len)
                        + t.observation.as_ref().map_or(0, String::len)
                }
                Self::ChatSnapshot(e) => e.message.content.len(),
                Self::ChatCompleted(e) => e.message.content.len(),
                Self::ChatFailed(e) => e.message.content.len(),
                Self::ChatStarted(_)
                | Self::MessageFileAdded(_)
                | Self::WorkflowProgress(_)
                | Self::DifyEvent(_) => 1024,
            }
    }

    /// The GraphQL type name, for tests.
    #[cfg(test)]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ChatStarted(_) => "ChatStarted",
            Self::AnswerDelta(_) => "AnswerDelta",
            Self::AnswerReplaced(_) => "AnswerReplaced",
            Self::AgentThoughtUpdated(_) => "AgentThoughtUpdated",
            Self::MessageFileAdded(_) => "MessageFileAdded",
            Self::WorkflowProgress(_) => "WorkflowProgress",
            Self::DifyEvent(_) => "DifyEvent",
            Self::ChatSnapshot(_) => "ChatSnapshot",
            Self::ChatCompleted(_) => "ChatCompleted",
            Self::ChatFailed(_) => "ChatFailed",
        }
    }
}

/// Always first: the turn is saved and the answer is about to stream.
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct ChatStarted {
    /// The assistant message being generated.
    pub message_id: ID,
    /// Always 1.
    pub seq: i32,
    /// The conversation (new on a first turn).
    pub conversation: Conversation,
    /// The user's query, saved.
    pub user_message: Message,
    /// The answer, saved empty with status STREAMING.
    pub assistant_message: Message,
}

/// A piece of the answer (Dify `message`, `agent_message`, `text_chunk`): append it.
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct AnswerDelta {
    /// The assistant message being generated.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// Text to append to the answer.
    pub delta: String,
}

/// The whole answer so far replaces what was streamed (Dify `message_replace`, moderation).
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct AnswerReplaced {
    /// The assistant message being generated.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// The answer so far.
    pub answer: String,
}

/// An agent step started or filled in (Dify `agent_thought`; the same id is re-sent).
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct AgentThoughtUpdated {
    /// The assistant message being generated.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// The step as it is now; replace any earlier version with the same id.
    pub thought: AgentThought,
}

/// A file was attached to the answer (Dify `message_file`).
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct MessageFileAdded {
    /// The assistant message being generated.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// The file.
    pub file: MessageFile,
}

/// Workflow progress (Dify `workflow_*`, `node_*`, `iteration_*`, `loop_*`, `agent_log` …).
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct WorkflowProgress {
    /// The assistant message being generated.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// Dify's event name, e.g. `node_finished`.
    pub event: String,
    /// The workflow run.
    pub workflow_run_id: Option<String>,
    /// The node, for node events.
    pub node_id: Option<String>,
    /// The node's type, e.g. `llm`.
    pub node_type: Option<String>,
    /// The node's title.
    pub title: Option<String>,
    /// `running`, `succeeded`, `failed`, `stopped` …
    pub status: Option<String>,
    /// Seconds the node or run took.
    pub elapsed_time: Option<f64>,
    /// Dify's `data` payload, untouched.
    pub data: Json<Value>,
}

/// Any other Dify event (e.g. `message_end`, `tts_message`, human input, future events).
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct DifyEvent {
    /// The assistant message being generated.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// Dify's event name.
    pub event: String,
    /// The whole Dify frame, untouched.
    pub data: Json<Value>,
}

/// The answer as it stands, covering every event up to `seq`: sent to a subscriber that resumes
/// (or reads) from a point whose events are no longer retained. Replace what you have of the
/// answer with `message`; the next event has `seq` + 1.
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct ChatSnapshot {
    /// The assistant message.
    pub message_id: ID,
    /// The `seq` of the last event this snapshot covers.
    pub seq: i32,
    /// The answer as it stands: content, agent thoughts and files so far, and its status.
    pub message: Message,
}

/// Last: the answer is saved with status COMPLETED or STOPPED.
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct ChatCompleted {
    /// The assistant message.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// The answer as saved.
    pub message: Message,
}

/// Last: Dify failed; the answer is saved with status FAILED and what had arrived.
#[derive(SimpleObject, Serialize, Deserialize)]
pub struct ChatFailed {
    /// The assistant message.
    pub message_id: ID,
    /// The event's sequence number.
    pub seq: i32,
    /// The answer as saved.
    pub message: Message,
    /// Why it failed.
    pub error: ChatError,
}
