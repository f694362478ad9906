//! The retained event log of an answer: every event as it was sent, so that any number of
//! subscribers read the same events with the same `seq` — the `chat` that started the answer,
//! and whoever resumes it (`resumeChat`, an idempotent retry). The relay appends and never waits;
//! each subscriber keeps its own place and reads at its own pace.
//!
//! The log keeps at most `RESUME_BUFFER_BYTES` of events (always the newest one). Older events
//! are folded into the answer as it stood after them, and a subscriber whose place was trimmed
//! away (it resumed late, or read more slowly than the model wrote) gets that as one
//! `ChatSnapshot` and goes on from the oldest event kept: nothing missing, nothing twice, and the
//! memory of a live answer bounded however many subscribers it has or however slowly they read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::watch;

use super::events::{ChatEvent, ChatSnapshot};
use crate::conversations::graphql::Message;
use crate::users::domain::UserId;

/// What a subscription to an answer yields: its events, shared between subscribers.
pub type ChatStream = BoxStream<'static, Result<Arc<ChatEvent>, async_graphql::Error>>;

pub struct AnswerLog {
    owner: UserId,
    limit: usize,
    state: Mutex<State>,
    /// Bumped on every append, to wake the subscribers waiting for more.
    appended: watch::Sender<()>,
}

struct State {
    events: VecDeque<Retained>,
    /// The `seq` of the oldest event kept (of the next event while none is kept).
    first_seq: i32,
    bytes: usize,
    /// The answer as it stood after the last event trimmed away (`first_seq - 1`), once the
    /// log was trimmed.
    base: Option<Message>,
    /// The terminal event is in: nothing follows it.
    ended: bool,
}

struct Retained {
    event: Arc<ChatEvent>,
    weight: usize,
}

impl AnswerLog {
    pub fn new(owner: UserId, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            owner,
            limit,
            state: Mutex::new(State {
                events: VecDeque::new(),
                first_seq: 1,
                bytes: 0,
                base: None,
                ended: false,
            }),
            appended: watch::Sender::new(()),
        })
    }

    pub fn owner(&self) -> UserId {
        self.owner
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends the next event (stamped with the next `seq`), trimming the oldest beyond the
    /// limit, and wakes the subscribers.
    pub fn append(&self, event: ChatEvent) {
        {
            let mut state = self.state();
            debug_assert!(!state.ended, "nothing follows the terminal event");
            debug_assert_eq!(
                event.seq_number(),
                state.first_seq + state.events.len() as i32
            );
            state.ended = event.is_terminal();
            let weight = event.weight();
            state.bytes += weight;
            state.events.push_back(Retained {
                event: Arc::new(event),
                weight,
            });
            while state.bytes > self.limit && state.events.len() > 1 {
                let oldest = state.events.pop_front().expect("more than one event");
                state.bytes -= oldest.weight;
                state.first_seq += 1;
                fold(&mut state.base, &oldest.event);
            }
        }
        self.appended.send_replace(());
    }

    /// The answer's events with `seq > after`, then the ones still to come, up to the terminal
    /// event.
    pub fn subscribe(self: &Arc<Self>, after: i32) -> ChatStream {
        let reader = Reader {
            log: self.clone(),
            next_seq: after.max(0) + 1,
            woken: self.appended.subscribe(),
        };
        futures::stream::unfold(reader, |mut reader| async move {
            let event = reader.next().await?;
            Some((Ok(event), reader))
        })
        .boxed()
    }

    /// What a subscriber at `next_seq` reads now, and where it is after; `None` when it must wait,
    /// and `Some(None)` once it has read the terminal event.
    fn read(&self, next_seq: i32) -> Option<Option<(Arc<ChatEvent>, i32)>> {
        let state = self.state();
        if next_seq < state.first_seq {
            let base = state.base.as_ref().expect("a trimmed log has a base");
            let seq = state.first_seq - 1;
            let snapshot = ChatEvent::ChatSnapshot(Box::new(ChatSnapshot {
                message_id: base.id.clone(),
                seq,
                message: base.clone(),
            }));
            return Some(Some((Arc::new(snapshot), state.first_seq)));
        }
        let index = (next_seq - state.first_seq) as usize;
        match state.events.get(index) {
            Some(retained) => Some(Some((retained.event.clone(), next_seq + 1))),
            None if state.ended => Some(None),
            None => None,
        }
    }

    #[cfg(test)]
    fn retained(&self) -> (i32, usize) {
        let state = self.state();
        (state.first_seq, state.events.len())
    }
}

struct Reader {
    log: Arc<AnswerLog>,
    next_seq: i32,
    woken: watch::Receiver<()>,
}

impl Reader {
    async fn next(&mut self) -> Option<Arc<ChatEvent>> {
        loop {
            // Marked seen before reading: an append after the read wakes the wait below.
            self.woken.borrow_and_update();
            match self.log.read(self.next_seq) {
                Some(Some((event, next_seq))) => {
                    self.next_seq = next_seq;
                    return Some(event);
                }
                Some(None) => return None,
                // The log's sender lives as long as the log, which this reader holds.
                None => self.woken.changed().await.ok()?,
            }
        }
    }
}

/// Folds an event trimmed from the log into the answer as it stood before it.
fn fold(base: &mut Option<Message>, event: &ChatEvent) {
    if let ChatEvent::ChatStarted(started) = event {
        *base = Some(started.assistant_message.clone());
        return;
    }
    let Some(message) = base else {
        return;
    };
    match event {
        ChatEvent::AnswerDelta(e) => message.content.push_str(&e.delta),
        ChatEvent::AnswerReplaced(e) => message.content.clone_from(&e.answer),
        ChatEvent::AgentThoughtUpdated(e) => {
            match message
                .agent_thoughts
                .iter_mut()
                .find(|t| t.id == e.thought.id)
            {
                Some(known) => known.clone_from(&e.thought),
                None => message.agent_thoughts.push(e.thought.clone()),
            }
        }
        ChatEvent::MessageFileAdded(e) => message.files.push(e.file.clone()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::events::{AnswerDelta, ChatCompleted, ChatStarted};
    use crate::conversations::db::{ConversationRecord, MessageRecord};
    use crate::conversations::domain::{ConversationId, MessageRole, MessageStatus};
    use crate::conversations::graphql::Conversation;

    fn started(answer: &MessageRecord) -> ChatEvent {
        let at = crate::db::types::now();
        let conversation = ConversationRecord {
            id: answer.conversation_id,
            user_id: UserId::new(),
            title: "t".into(),
            is_archived: false,
            is_pinned: false,
            dify_conversation_id: None,
            message_count: 2,
            created_at: at,
            updated_at: at,
            app_id: None,
        };
        let question = MessageRecord::new(
            answer.conversation_id,
            MessageRole::User,
            "q".into(),
            MessageStatus::Completed,
        );
        ChatEvent::ChatStarted(Box::new(ChatStarted {
            message_id: answer.id.into(),
            seq: 1,
            conversation: Conversation::from(&conversation),
            user_message: question.into(),
            assistant_message: answer.clone().into(),
        }))
    }

    fn delta(seq: i32, text: &str) -> ChatEvent {
        ChatEvent::AnswerDelta(AnswerDelta {
            message_id: async_graphql::ID::default(),
            seq,
            delta: text.into(),
        })
    }

    fn answer() -> MessageRecord {
        MessageRecord::new(
            ConversationId::new(),
            MessageRole::Assistant,
            String::new(),
            MessageStatus::Streaming,
        )
    }

    /// Everything a subscriber reads, as (type, seq, text).
    async fn read_all(stream: ChatStream) -> Vec<(&'static str, i32, String)> {
        stream
            .map(|event| {
                let event = event.unwrap();
                let text = match &*event {
                    ChatEvent::AnswerDelta(e) => e.delta.clone(),
                    ChatEvent::ChatSnapshot(e) => e.message.content.clone(),
                    _ => String::new(),
                };
                (event.type_name(), event.seq_number(), text)
            })
            .collect()
            .await
    }

    fn complete(log: &AnswerLog, answer: &MessageRecord, seq: i32) {
        log.append(ChatEvent::ChatCompleted(Box::new(ChatCompleted {
            message_id: answer.id.into(),
            seq,
            message: answer.clone().into(),
        })));
    }

    #[tokio::test]
    async fn subscribers_read_every_event_from_where_they_are_and_wait_for_more() {
        let answer = answer();
        let log = AnswerLog::new(UserId::new(), 1 << 20);
        log.append(started(&answer));
        let from_start = log.subscribe(0);
        log.append(delta(2, "a"));
        log.append(delta(3, "b"));
        let from_two = log.subscribe(2);
        let waiting = tokio::spawn(read_all(log.subscribe(3)));
        tokio::task::yield_now().await;
        log.append(delta(4, "c"));
        complete(&log, &answer, 5);
        let all = read_all(from_start).await;
        let seqs: Vec<i32> = all.iter().map(|e| e.1).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(all[4].0, "ChatCompleted");
        let later: Vec<i32> = read_all(from_two).await.iter().map(|e| e.1).collect();
        assert_eq!(later, [3, 4, 5]);
        let woken: Vec<i32> = waiting.await.unwrap().iter().map(|e| e.1).collect();
        assert_eq!(
            woken,
            [4, 5],
            "a waiting subscriber is woken by each append"
        );
        assert!(
            read_all(log.subscribe(5)).await.is_empty(),
            "nothing after the end"
        );
    }

    #[tokio::test]
    async fn a_trimmed_log_gives_late_subscribers_a_snapshot_then_the_rest() {
        let answer = answer();
        // Room for about four deltas of 1000 bytes (each weighs its text and 256 more).
        let log = AnswerLog::new(UserId::new(), 5200);
        log.append(started(&answer));
        let slow = log.subscribe(0);
        let chunk = |i: i32| format!("{i:04}").repeat(250);
        for seq in 2..=11 {
            log.append(delta(seq, &chunk(seq)));
        }
        complete(&log, &answer, 12);
        let (first_seq, kept) = log.retained();
        assert!(first_seq > 2 && kept < 10, "trimmed: {first_seq} {kept}");
        let expected: String = (2..=11).map(chunk).collect();
        for stream in [slow, log.subscribe(0), log.subscribe(2)] {
            let events = read_all(stream).await;
            assert_eq!(events[0].0, "ChatSnapshot");
            assert_eq!(
                events[0].1,
                first_seq - 1,
                "it covers up to the oldest kept"
            );
            let seqs: Vec<i32> = events.iter().skip(1).map(|e| e.1).collect();
            let want: Vec<i32> = (first_seq..=12).collect();
            assert_eq!(seqs, want, "then every kept event once");
            let text: String = events.iter().map(|e| e.2.as_str()).collect();
            assert_eq!(text, expected, "nothing missing or repeated");
        }
        // A subscriber already past the trimmed part needs no snapshot.
        let events = read_all(log.subscribe(first_seq - 1)).await;
        assert_eq!(events[0].1, first_seq);
        assert_eq!(events[0].0, "AnswerDelta");
    }
}
