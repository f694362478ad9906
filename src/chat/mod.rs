//! Chat: the `chat` subscription relaying Dify's stream, stopping answers, feedback, and the
//! sweep that marks answers of dead gateway processes INTERRUPTED.

pub mod answer;
pub mod db;
pub mod events;
pub mod finals;
pub mod graphql;
pub mod log;
pub mod mirror;
pub mod relay;
pub mod resume;
pub mod turns;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use self::log::AnswerLog;
use crate::app::{App, Dify};
use crate::conversations::db::MessageRecord;
use crate::conversations::domain::{MessageId, MessageStatus};
use crate::shared::Shared;
use crate::users::domain::UserId;

/// The Dify `user` for an account: derived from its id, never chosen by the client.
pub fn dify_user(user: UserId) -> String {
    format!("rechat-{user}")
}

/// A running answer in this process.
pub struct StreamHandle {
    pub owner: UserId,
    pub stop: Notify,
    /// Becomes `true` when the answer is stored.
    pub done: watch::Sender<bool>,
    client_message_id: Option<String>,
}

/// The answers this process is streaming, so a stop reaches them at once, how many each user
/// has, and their event logs for subscribers that resume (once an answer ended, its stored row
/// answers them). Stops from other processes arrive as Redis signals, or go through Dify (with
/// the stored task id) and the `stop_requested` column.
#[derive(Default, Clone)]
pub struct Streams(Arc<Mutex<Registry>>);

#[derive(Default)]
struct Registry {
    handles: HashMap<MessageId, Arc<StreamHandle>>,
    per_owner: HashMap<UserId, u32>,
    logs: HashMap<MessageId, Arc<AnswerLog>>,
    /// Live answers by their turn's `clientMessageId`, with the turn's query.
    clients: HashMap<(UserId, String), (MessageId, String)>,
    /// Answers being mirrored to Redis for subscribers on other gateways.
    mirrors: std::collections::HashSet<MessageId>,
}

/// A live answer's turn as the registry knows it.
pub struct Registration {
    pub id: MessageId,
    pub log: Arc<AnswerLog>,
    /// The turn's `clientMessageId` and query.
    pub client: Option<(String, String)>,
}

/// A user's place among the answers streaming here, taken before a turn is saved and given
/// back when dropped (when the answer is stored, or when the turn could not start).
pub struct Slot {
    streams: Streams,
    owner: UserId,
    /// Its place among the owner's answers of every gateway, in Redis: the set and the member.
    shared: Option<(Shared, String, String)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut registry = self.streams.lock();
        if let Some(count) = registry.per_owner.get_mut(&self.owner) {
            *count -= 1;
            if *count == 0 {
                registry.per_owner.remove(&self.owner);
            }
        }
        if let Some((shared, key, member)) = self.shared.take() {
            tokio::spawn(async move {
                shared
                    .run(move |mut connection| async move {
                        redis::cmd("ZREM")
                            .arg(key)
                            .arg(member)
                            .query_async::<i64>(&mut connection)
                            .await
                    })
                    .await;
            });
        }
    }
}

/// Takes a place among a user's answers on every gateway: members are `<gateway>/<slot>`, and
/// those of gateways whose presence key (renewed with their lease) expired are dropped first.
/// The caller's own presence is renewed here too: it is alive. Non-zero when taken, 0 when
/// `max` are live.
static RESERVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
        redis.call('SET', ARGV[3] .. ARGV[4], 1, 'PX', ARGV[5])
        local live = 0
        for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
            local gateway = string.match(member, '^([^/]+)/')
            if gateway and redis.call('EXISTS', ARGV[3] .. gateway) == 1 then
                live = live + 1
            else
                redis.call('ZREM', KEYS[1], member)
            end
        end
        if live >= tonumber(ARGV[1]) then return 0 end
        redis.call('ZADD', KEYS[1], 0, ARGV[2])
        redis.call('EXPIRE', KEYS[1], 86400)
        return live + 1
        ",
    )
});

impl App {
    /// A place for one more answer of `owner`, unless `max` are streaming already: on every
    /// gateway when they share Redis, else on this one.
    pub async fn reserve_answer(&self, owner: UserId, max: u32) -> Option<Slot> {
        let mut slot = self.streams.reserve(owner, max)?;
        let key = self.shared.key(&["active", &owner.to_string()]);
        let member = format!("{}/{}", self.gateway, uuid::Uuid::new_v4().simple());
        let gateways = self.shared.key(&["gateway", ""]);
        let gateway = self.gateway.to_string();
        let lease_ms = u64::try_from(self.config.gateway_lease.as_millis()).unwrap_or(u64::MAX);
        let taken = {
            let (key, member) = (key.clone(), member.clone());
            self.shared
                .run(move |mut connection| async move {
                    RESERVE
                        .key(key)
                        .arg(max)
                        .arg(member)
                        .arg(gateways)
                        .arg(gateway)
                        .arg(lease_ms)
                        .invoke_async::<i64>(&mut connection)
                        .await
                })
                .await
        };
        match taken {
            Some(0) => None,
            Some(_) => {
                slot.shared = Some((self.shared.clone(), key, member));
                Some(slot)
            }
            None => Some(slot),
        }
    }

    /// Answers of `owner` streaming now: on every gateway when they share Redis (counting only
    /// live gateways' at the next reservation), else on this one.
    pub async fn active_answers(&self, owner: UserId) -> u32 {
        let key = self.shared.key(&["active", &owner.to_string()]);
        let shared = self
            .shared
            .run(move |mut connection| async move {
                redis::cmd("ZCARD")
                    .arg(key)
                    .query_async::<u32>(&mut connection)
                    .await
            })
            .await;
        shared.unwrap_or_else(|| self.streams.active(owner))
    }
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more answer of `owner`, unless `max` are streaming already.
    pub fn reserve(&self, owner: UserId, max: u32) -> Option<Slot> {
        let mut registry = self.lock();
        let count = registry.per_owner.entry(owner).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            streams: self.clone(),
            owner,
            shared: None,
        })
    }

    /// Answers of `owner` streaming here (started or about to start).
    pub fn active(&self, owner: UserId) -> u32 {
        self.lock().per_owner.get(&owner).copied().unwrap_or(0)
    }

    pub fn register(&self, turn: Registration, slot: &Slot) -> Arc<StreamHandle> {
        let handle = Arc::new(StreamHandle {
            owner: slot.owner,
            stop: Notify::new(),
            done: watch::Sender::new(false),
            client_message_id: turn.client.as_ref().map(|(key, _)| key.clone()),
        });
        let mut registry = self.lock();
        registry.handles.insert(turn.id, handle.clone());
        registry.logs.insert(turn.id, turn.log);
        if let Some((key, query)) = turn.client {
            registry.clients.insert((slot.owner, key), (turn.id, query));
        }
        handle
    }

    /// The answer ended and is stored. Subscribers reading its log keep the log until they
    /// reach the end; later ones read the stored row.
    pub fn remove(&self, id: MessageId) {
        let mut registry = self.lock();
        if let Some(handle) = registry.handles.remove(&id) {
            handle.done.send_replace(true);
            if let Some(key) = handle.client_message_id.clone() {
                registry.clients.remove(&(handle.owner, key));
            }
        }
        registry.logs.remove(&id);
    }

    /// The event log of an answer streaming here.
    pub fn log(&self, id: MessageId) -> Option<Arc<AnswerLog>> {
        self.lock().logs.get(&id).cloned()
    }

    /// Marks an answer as mirrored; false when it already is.
    pub fn start_mirror(&self, id: MessageId) -> bool {
        self.lock().mirrors.insert(id)
    }

    pub fn end_mirror(&self, id: MessageId) {
        self.lock().mirrors.remove(&id);
    }

    /// The live answer of `owner`'s turn sent with `client_message_id`, and whether that turn
    /// asked `query`.
    pub fn by_client(
        &self,
        owner: UserId,
        client_message_id: &str,
        query: &str,
    ) -> Option<(MessageId, bool)> {
        self.lock()
            .clients
            .get(&(owner, client_message_id.to_owned()))
            .map(|(id, asked)| (*id, asked == query))
    }

    pub fn get(&self, id: MessageId) -> Option<Arc<StreamHandle>> {
        self.lock().handles.get(&id).cloned()
    }

    /// Stops every answer of `owner` streaming here; returns how many.
    pub fn stop_owner(&self, owner: UserId) -> usize {
        let registry = self.lock();
        let mut stopped = 0;
        for handle in registry.handles.values().filter(|h| h.owner == owner) {
            handle.stop.notify_one();
            stopped += 1;
        }
        stopped
    }

    /// The answers streaming now.
    pub fn ids(&self) -> Vec<MessageId> {
        self.lock().handles.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How often answers are swept for going stale (see [`spawn_sweeper`]).
const STALE_SWEEP: Duration = Duration::from_secs(30);

/// How long `stopChat` waits for a local answer to be stored as STOPPED.
const STOP_WAIT: Duration = Duration::from_secs(8);

/// Stops an answer being generated, wherever it streams. The database flag makes the answer end
/// STOPPED whichever process streams it. A relay in this process is woken (it asks Dify to stop
/// with the task id it read) and awaited until the answer is stored; otherwise Dify is asked
/// here with the stored task id. Failures are logged: a stop is best effort, and the answer is
/// stored either way.
pub async fn stop_message(app: &App, dify: Option<&Dify>, user: UserId, message: &MessageRecord) {
    if message.status != MessageStatus::Streaming {
        return;
    }
    let task_id = async {
        let mut conn = app.db.get().await?;
        db::request_stop(&mut conn, message.id).await?;
        let current = crate::conversations::db::find_message(&mut conn, message.id).await?;
        Ok::<_, anyhow::Error>(current.and_then(|m| m.dify_task_id))
    }
    .await
    .unwrap_or_else(|error| {
        tracing::error!(
            error = format!("{error:#}"),
            "recording the stop request failed"
        );
        message.dify_task_id.clone()
    });
    if let Some(handle) = app.streams.get(message.id) {
        handle.stop.notify_one();
        let mut done = handle.done.subscribe();
        let _ = tokio::time::timeout(STOP_WAIT, done.wait_for(|done| *done)).await;
        return;
    }
    // Another gateway relays it: with Redis, it hears at once and stops it (telling Dify).
    let signal = crate::shared::Signal::Stop {
        message: message.id.to_string(),
    };
    if app.shared.publish(signal).await && stored_within(app, message.id, REMOTE_STOP_WAIT).await {
        return;
    }
    if let (Some(dify), Some(task_id)) = (dify, task_id)
        && let Err(error) = dify
            .client
            .stop(dify.mode, &task_id, &dify_user(user))
            .await
    {
        tracing::warn!(%error, dify.task_id = task_id, "Dify stop failed");
    }
}

/// How long `stopChat` waits for another gateway to store an answer it was told to stop, before
/// asking Dify itself.
const REMOTE_STOP_WAIT: Duration = Duration::from_secs(2);

/// Whether the answer is stored (no longer STREAMING) within `wait`, read every 100 ms.
async fn stored_within(app: &App, id: MessageId, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = app
            .db
            .run(crate::db::STATEMENT_TIMEOUT, async |conn| {
                crate::conversations::db::find_message(conn, id).await
            })
            .await;
        if let Ok(Some(message)) = status
            && message.status != MessageStatus::Streaming
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Marks answers of dead gateway processes INTERRUPTED, for as long as the process runs: those
/// of gateways whose lease expired, as often as leases are renewed; and every 30 s those that
/// name no live gateway and stopped being written (rows from before leases, a lease forgotten).
///
/// A lease also lapses when the database was away for longer than a lease, for every gateway
/// at once: so this process never judges its own lease (it is alive), and judges others' only
/// once it has reached the database, promptly, for a whole lease, which gives every live
/// gateway the time to renew first.
pub fn spawn_sweeper(app: App) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let lease = app.config.gateway_lease;
        let every = crate::gateways::renew_every(lease);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_stale_sweep: Option<tokio::time::Instant> = None;
        let mut reachable_since: Option<tokio::time::Instant> = None;
        loop {
            ticks.tick().await;
            let started = tokio::time::Instant::now();
            let stale_after = app.config.stale_stream_after;
            let stale_due = last_stale_sweep.is_none_or(|at| at.elapsed() >= STALE_SWEEP);
            let judge_leases = reachable_since.is_some_and(|since| since.elapsed() >= lease);
            // Leases lapse only in an outage longer than three quarters of a lease, which holds
            // a sweep that meets it for more than half a lease: a slower sweep counts as one.
            let slow = lease / 2;
            let result = app
                .writer_db
                .run(crate::db::STATEMENT_TIMEOUT, async |conn| {
                    let mut marked = 0;
                    let mut expired = if judge_leases {
                        crate::gateways::expired(conn, lease).await?
                    } else {
                        Vec::new()
                    };
                    if started.elapsed() > slow {
                        // The read waited: the database was away or slow just now, and the
                        // leases it found lapsed may be renewed a moment from now.
                        expired.clear();
                    }
                    for gateway in expired.into_iter().filter(|g| *g != app.gateway) {
                        marked += db::interrupt_gateway(conn, gateway).await?;
                        crate::gateways::release(conn, gateway).await?;
                    }
                    if stale_due {
                        marked += db::sweep_interrupted(conn, stale_after).await?;
                    }
                    Ok(marked)
                })
                .await;
            if result.is_err() || started.elapsed() > slow {
                reachable_since = None;
            } else {
                reachable_since.get_or_insert(started);
            }
            if stale_due && result.is_ok() {
                last_stale_sweep = Some(tokio::time::Instant::now());
            }
            match result {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    messages = n,
                    "answers of a stopped gateway marked INTERRUPTED"
                ),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "sweeping interrupted answers failed"
                ),
            }
        }
    })
}
