//! `resumeChat`: re-attach to an answer from a given `seq`. An answer streaming here is read
//! from its event log: the events as first sent. An answer that ended resumes as a
//! `ChatSnapshot` of the answer as stored and its terminal event, read from its row and
//! numbered from its `last_seq` (the final write precedes the terminal event, so the row always
//! has it; keeping ended answers in memory instead would cost their size for every answer
//! ended within the grace period, for one indexed read saved). An
//! answer streaming in another gateway process is read from that gateway's mirror in Redis
//! when they share one (`mirror`: the events as first sent); otherwise, or when the mirror does
//! not come, it is followed through its row: a `ChatSnapshot` each time its stored content
//! moves on, then the terminal event once it ends (or its log, if it turns out to stream here
//! after all).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;

use super::events::{ChatCompleted, ChatEvent, ChatFailed, ChatSnapshot};
use super::log::ChatStream;
use super::mirror::{Next, RemoteFollow};
use crate::app::App;
use crate::conversations::db::{self as conversations_db, MessageRecord};
use crate::conversations::domain::{MessageId, MessageRole, MessageStatus};
use crate::conversations::graphql::Message;
use crate::db::STATEMENT_TIMEOUT;
use crate::error::{AppError, AppResult};
use crate::users::domain::UserId;

/// How often the stored row of an answer streaming elsewhere is read again.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The events of `owner`'s answer `id` with `seq > after`; `NOT_FOUND` for anyone else's.
pub async fn resume(app: &App, owner: UserId, id: MessageId, after: i32) -> AppResult<ChatStream> {
    if let Some(log) = app.streams.log(id) {
        if log.owner() != owner {
            return Err(AppError::NotFound("message"));
        }
        app.metrics.resumed("live");
        return Ok(log.subscribe(after));
    }
    let read = async {
        let mut conn = app.db.get().await?;
        Ok::<_, AppError>(conversations_db::find_message_owned(&mut conn, id, owner).await?)
    };
    let record = tokio::time::timeout(app.config.operation_timeout, read)
        .await
        .map_err(|_| AppError::Unavailable)??
        .map(|(record, _)| record)
        .filter(|record| record.role == MessageRole::Assistant)
        .ok_or(AppError::NotFound("message"))?;
    let after = after.max(0);
    // Streaming in another gateway: its events through Redis, when both share it.
    let elsewhere = record.status == MessageStatus::Streaming
        && record
            .gateway_id
            .is_some_and(|gateway| gateway != app.gateway);
    if elsewhere
        && app.shared.is_configured()
        && let Some(remote) = RemoteFollow::ask(app, id, after).await
    {
        app.metrics.resumed("mirror");
        return Ok(futures::stream::unfold(Some(Source::Mirror(remote)), next).boxed());
    }
    app.metrics.resumed("stored");
    let mut follow = Follow::new(app, id, after);
    follow.read(record);
    Ok(futures::stream::unfold(Some(Source::Stored(follow)), next).boxed())
}

/// Where a resumed subscription reads from.
enum Source {
    Stored(Follow),
    Log(ChatStream),
    Mirror(RemoteFollow),
}

/// Follows an answer through its stored row.
struct Follow {
    app: App,
    id: MessageId,
    /// The `seq` of the last event sent (or skipped, being at or below `after`).
    sent: i32,
    queue: VecDeque<Arc<ChatEvent>>,
    ended: bool,
}

type Item = Result<Arc<ChatEvent>, async_graphql::Error>;

async fn next(source: Option<Source>) -> Option<(Item, Option<Source>)> {
    let mut follow = match source? {
        Source::Log(mut events) => {
            let event = events.next().await?;
            return Some((event, Some(Source::Log(events))));
        }
        Source::Mirror(mut remote) => match remote.next().await {
            Next::Event(event) => return Some((Ok(event), Some(Source::Mirror(remote)))),
            Next::End => return None,
            Next::FallBack => Follow::new(&remote.app, remote.id, remote.sent),
        },
        Source::Stored(follow) => follow,
    };
    loop {
        if let Some(event) = follow.queue.pop_front() {
            return Some((Ok(event), Some(Source::Stored(follow))));
        }
        if follow.ended {
            return None;
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
        if let Some(log) = follow.app.streams.log(follow.id) {
            let mut events = log.subscribe(follow.sent);
            let event = events.next().await?;
            return Some((event, Some(Source::Log(events))));
        }
        let id = follow.id;
        let read = follow
            .app
            .db
            .run(STATEMENT_TIMEOUT, async |conn| {
                conversations_db::find_message(conn, id).await
            })
            .await;
        match read {
            Ok(Some(record)) => follow.read(record),
            // The conversation was deleted meanwhile: nothing more will come.
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "following a stored answer failed"
                );
            }
        }
    }
}

impl Follow {
    fn new(app: &App, id: MessageId, sent: i32) -> Self {
        Self {
            app: app.clone(),
            id,
            sent,
            queue: VecDeque::new(),
            ended: false,
        }
    }

    /// Queues what the stored row adds to what was sent.
    fn read(&mut self, record: MessageRecord) {
        if record.status == MessageStatus::Streaming {
            let covered = record.last_seq.unwrap_or(0);
            if covered > self.sent {
                self.queue
                    .push_back(Arc::new(snapshot(record.into(), covered)));
                self.sent = covered;
            }
            return;
        }
        self.ended = true;
        self.queue.extend(ended_events(record, self.sent));
    }
}

/// What a subscriber that has the events up to `after` misses of an ended answer, from its row:
/// a snapshot of everything before the terminal event (unless it has all of that), then the
/// terminal event.
fn ended_events(record: MessageRecord, after: i32) -> Vec<Arc<ChatEvent>> {
    // Rows stored before resumable streams have no `last_seq`: their terminal event counts as 1.
    let seq = record.last_seq.unwrap_or(1).max(1);
    let message = Message::from(record);
    let mut events = Vec::new();
    if after < seq - 1 {
        events.push(Arc::new(snapshot(message.clone(), seq - 1)));
    }
    if after < seq {
        events.push(Arc::new(terminal(message, seq)));
    }
    events
}

fn snapshot(message: Message, seq: i32) -> ChatEvent {
    ChatEvent::ChatSnapshot(Box::new(ChatSnapshot {
        message_id: message.id.clone(),
        seq,
        message,
    }))
}

/// The terminal event of an ended answer, as the relay sent it: `ChatFailed` for an answer
/// stored with an error (FAILED, or INTERRUPTED by a gateway that went away), else
/// `ChatCompleted`.
fn terminal(message: Message, seq: i32) -> ChatEvent {
    let failed = matches!(
        message.status,
        MessageStatus::Failed | MessageStatus::Interrupted
    );
    match message.error.clone() {
        Some(error) if failed => ChatEvent::ChatFailed(Box::new(ChatFailed {
            message_id: message.id.clone(),
            seq,
            message,
            error,
        })),
        _ => ChatEvent::ChatCompleted(Box::new(ChatCompleted {
            message_id: message.id.clone(),
            seq,
            message,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversations::domain::ConversationId;

    fn ended(status: MessageStatus, last_seq: Option<i32>, error: Option<&str>) -> MessageRecord {
        let mut record = MessageRecord::new(
            ConversationId::new(),
            MessageRole::Assistant,
            "all of it".into(),
            status,
        );
        record.last_seq = last_seq;
        record.error = error.map(str::to_owned);
        record
    }

    fn shape(events: &[Arc<ChatEvent>]) -> Vec<(&'static str, i32)> {
        events
            .iter()
            .map(|e| (e.type_name(), e.seq_number()))
            .collect()
    }

    #[test]
    fn an_ended_answer_resumes_as_a_snapshot_and_its_terminal_event() {
        let completed = || ended(MessageStatus::Completed, Some(9), None);
        assert_eq!(
            shape(&ended_events(completed(), 0)),
            [("ChatSnapshot", 8), ("ChatCompleted", 9)]
        );
        assert_eq!(
            shape(&ended_events(completed(), 8)),
            [("ChatCompleted", 9)],
            "nothing but the terminal event was missed"
        );
        assert!(
            ended_events(completed(), 9).is_empty(),
            "nothing was missed"
        );
        let failed = ended(
            MessageStatus::Interrupted,
            Some(4),
            Some(r#"{"code":"interrupted","message":"gone","status":null}"#),
        );
        assert_eq!(
            shape(&ended_events(failed, 2)),
            [("ChatSnapshot", 3), ("ChatFailed", 4)]
        );
        assert_eq!(
            shape(&ended_events(ended(MessageStatus::Stopped, None, None), 0)),
            [("ChatCompleted", 1)],
            "a row from before resumable streams"
        );
    }
}
