//! Live answers followed from another gateway, through Redis Streams. A gateway that gets a
//! `resumeChat` (or an idempotent retry) for an answer another gateway relays asks it, by a
//! signal, to mirror the answer's events into the Redis Stream `<prefix>:answer:<messageId>`:
//! from its retained log (a `ChatSnapshot` first if the log was trimmed), then every new event,
//! then the terminal event, each stored under the entry id `<seq>-0`. The resuming gateway
//! reads the entries after its subscriber's `seq`: the same events, the same numbers, no gap
//! and no duplicate. Answers nobody follows from elsewhere cost Redis nothing.
//!
//! When the mirror does not come (Redis away, the relaying gateway gone) or breaks off, the
//! reader falls back to following the stored row, as without Redis.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use tokio::time::Instant;

use super::events::ChatEvent;
use crate::app::App;
use crate::conversations::domain::MessageId;

/// Most entries kept per mirrored answer (Redis trims the oldest beyond, approximately).
const MAX_ENTRIES: usize = 20_000;
/// How long a mirrored stream outlives its last write while the answer is live.
const LIVE_EXPIRY: Duration = Duration::from_secs(600);
/// Events written to Redis per round trip at most.
const BATCH: usize = 256;
/// How often the reader asks Redis for new entries.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long the reader waits for the first entry before following the stored row instead.
const FIRST_ENTRY_WAIT: Duration = Duration::from_secs(3);
/// How often the reader checks the stored row meanwhile (a relaying gateway that died).
const ROW_CHECK_EVERY: Duration = Duration::from_secs(1);

fn stream_key(app: &App, id: MessageId) -> String {
    app.shared.key(&["answer", &id.to_string()])
}

/// Starts mirroring an answer relayed here, unless it is mirrored already or not live here.
pub fn start(app: &App, id: MessageId) {
    let Some(log) = app.streams.log(id) else {
        return;
    };
    if !app.streams.start_mirror(id) {
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        let key = stream_key(&app, id);
        let grace_ms = u64::try_from(app.config.resume_grace.as_millis()).unwrap_or(u64::MAX);
        let live_ms = LIVE_EXPIRY.as_millis() as u64;
        let mut events = log.subscribe(0);
        let mut ended = false;
        while !ended {
            let Some(Ok(first)) = events.next().await else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < BATCH
                && let Some(Some(Ok(event))) = events.next().now_or_never()
            {
                batch.push(event);
            }
            ended = batch.last().is_some_and(|event| event.is_terminal());
            let mut pipe = redis::pipe();
            for event in &batch {
                let Ok(json) = serde_json::to_string(&**event) else {
                    continue;
                };
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(MAX_ENTRIES)
                    .arg(format!("{}-0", event.seq_number()))
                    .arg("e")
                    .arg(json)
                    .ignore();
            }
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(if ended { grace_ms } else { live_ms })
                .ignore();
            let written = app
                .shared
                .run(move |mut connection| async move {
                    pipe.query_async::<redis::Value>(&mut connection).await
                })
                .await;
            if written.is_none() {
                // Readers notice the silence and follow the stored row instead.
                break;
            }
        }
        app.streams.end_mirror(id);
    });
}

/// Reads a mirrored answer from Redis for a subscriber that has the events up to `sent`.
pub struct RemoteFollow {
    pub app: App,
    pub id: MessageId,
    key: String,
    pub sent: i32,
    queue: VecDeque<Arc<ChatEvent>>,
    started: Instant,
    row_checked: Instant,
    /// Some entry was read: the mirror runs.
    mirrored: bool,
    ended: bool,
}

/// What the reader does next.
pub enum Next {
    Event(Arc<ChatEvent>),
    /// The answer ended and everything was sent.
    End,
    /// Redis cannot give what is missing: follow the stored row from `sent`.
    FallBack,
}

impl RemoteFollow {
    /// Asks the relaying gateway to mirror the answer; `None` when no signal could be sent.
    pub async fn ask(app: &App, id: MessageId, after: i32) -> Option<Self> {
        let signal = crate::shared::Signal::Mirror {
            message: id.to_string(),
        };
        if !app.shared.publish(signal).await {
            return None;
        }
        Some(Self {
            app: app.clone(),
            id,
            key: stream_key(app, id),
            sent: after,
            queue: VecDeque::new(),
            started: Instant::now(),
            row_checked: Instant::now(),
            mirrored: false,
            ended: false,
        })
    }

    pub async fn next(&mut self) -> Next {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Next::Event(event);
            }
            if self.ended {
                return Next::End;
            }
            if !self.read().await {
                return Next::FallBack;
            }
            if !self.queue.is_empty() {
                continue;
            }
            if !self.mirrored && self.started.elapsed() >= FIRST_ENTRY_WAIT {
                return Next::FallBack;
            }
            if self.row_checked.elapsed() >= ROW_CHECK_EVERY {
                self.row_checked = Instant::now();
                if self.row_ended().await {
                    // Stored: the terminal event follows in the mirror at once, unless the
                    // relaying gateway died; then the row has the rest.
                    tokio::time::sleep(POLL_EVERY * 4).await;
                    if !self.read().await || self.queue.is_empty() {
                        return Next::FallBack;
                    }
                }
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Queues the entries after `sent`; false when Redis fails or a gap shows (trimmed).
    async fn read(&mut self) -> bool {
        let key = self.key.clone();
        let from = format!("{}-0", self.sent + 1);
        let entries = self
            .app
            .shared
            .run(move |mut connection| async move {
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(BATCH)
                    .query_async::<redis::streams::StreamRangeReply>(&mut connection)
                    .await
            })
            .await;
        let Some(entries) = entries else {
            return false;
        };
        for entry in entries.ids {
            let Some(event) = entry
                .get::<String>("e")
                .and_then(|json: String| serde_json::from_str::<ChatEvent>(&json).ok())
            else {
                continue;
            };
            self.mirrored = true;
            let seq = event.seq_number();
            let snapshot = matches!(event, ChatEvent::ChatSnapshot(_));
            if seq <= self.sent {
                continue;
            }
            if seq != self.sent + 1 && !snapshot {
                return false;
            }
            self.sent = seq;
            self.ended = event.is_terminal();
            self.queue.push_back(Arc::new(event));
            if self.ended {
                break;
            }
        }
        true
    }

    async fn row_ended(&self) -> bool {
        let id = self.id;
        let row = self
            .app
            .db
            .run(crate::db::STATEMENT_TIMEOUT, async |conn| {
                crate::conversations::db::find_message(conn, id).await
            })
            .await;
        match row {
            Ok(Some(row)) => row.status != crate::conversations::domain::MessageStatus::Streaming,
            Ok(None) => true,
            Err(_) => false,
        }
    }
}
