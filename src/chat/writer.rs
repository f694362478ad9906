//! Write-behind persistence of live answers. Relays hand their partial content and Dify's ids to
//! the one writer of the process and never wait for it; every tick the writer turns all that was
//! handed since the last tick into a few statements (one `UPDATE … CASE` per table and chunk),
//! so statements per second follow ticks, not streams. It also heartbeats every live answer of
//! the process, one statement per chunk, so the sweeper leaves them alone. A batch that fails
//! (MySQL away or frozen) stays pending, newer content winning, and is retried next tick: an
//! outage delays what readers see of a live answer, never a delta. Final writes are not here:
//! the relay writes them itself and confirms them before the terminal event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use diesel::mysql::Mysql;
use diesel::sql_types::{Binary, Integer, Nullable, Text};
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};
use tokio::time::Instant;

use crate::conversations::domain::{ConversationId, MessageId};
use crate::db::types::now;
use crate::db::{Db, STATEMENT_TIMEOUT};
use crate::dify::events::Ids;
use crate::metrics::Metrics;

/// How often tokens are settled even when this process stored no answer (another gateway's,
/// left by a crash).
const SETTLE_SWEEP: Duration = Duration::from_secs(60);

/// A live answer writes at least this often, even while Dify is silent (a slow tool).
pub const HEARTBEAT: Duration = Duration::from_secs(20);
/// Rows per statement, and roughly the bytes of content per statement (MariaDB's default
/// `max_allowed_packet` is 16 MiB).
const CHUNK_ROWS: usize = 500;
const CHUNK_BYTES: usize = 4 << 20;

/// Dify's ids for one answer, and the Dify conversation to keep on its conversation.
#[derive(Debug, Clone, Default, PartialEq)]
struct DifyIds {
    message_id: Option<String>,
    task_id: Option<String>,
    workflow_run_id: Option<String>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Each answer's content so far, and the `seq` of the last event it covers.
    content: HashMap<MessageId, (String, i32)>,
    ids: HashMap<MessageId, DifyIds>,
    conversations: HashMap<ConversationId, String>,
    /// When the oldest change in here was handed over.
    since: Option<Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.content.is_empty() && self.ids.is_empty() && self.conversations.is_empty()
    }

    fn content_bytes(&self) -> usize {
        self.content
            .values()
            .map(|(content, _)| content.len())
            .sum()
    }

    fn rows(&self) -> usize {
        self.content.len() + self.ids.len() + self.conversations.len()
    }

    /// Puts a failed batch back under what was handed over since: newer content wins.
    fn restore(&mut self, failed: Pending) {
        for (id, content) in failed.content {
            self.content.entry(id).or_insert(content);
        }
        for (id, ids) in failed.ids {
            self.ids.entry(id).or_insert(ids);
        }
        for (id, dify) in failed.conversations {
            self.conversations.entry(id).or_insert(dify);
        }
        self.since = match (self.since, failed.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

#[derive(Clone)]
pub struct Writer(Arc<Inner>);

struct Inner {
    db: Db,
    metrics: Arc<Metrics>,
    pending: Mutex<Pending>,
    /// This process stored an answer whose tokens are not settled yet.
    unsettled: AtomicBool,
    last_settle: Mutex<Instant>,
}

impl Writer {
    pub fn new(db: Db, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner {
            db,
            metrics,
            pending: Mutex::default(),
            unsettled: AtomicBool::new(true),
            last_settle: Mutex::new(Instant::now()),
        }))
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands over the answer's content so far, covering its events up to `seq`; replaces any
    /// earlier content not yet written.
    pub fn partial(&self, id: MessageId, content: String, seq: i32) {
        let mut pending = self.pending();
        pending.since.get_or_insert_with(Instant::now);
        pending.content.insert(id, (content, seq));
    }

    /// Hands over Dify's ids for an answer and, for modes with conversations, the Dify
    /// conversation to keep on `conversation` (only if it has none yet).
    pub fn ids(&self, id: MessageId, ids: &Ids, conversation: Option<ConversationId>) {
        let mut pending = self.pending();
        pending.since.get_or_insert_with(Instant::now);
        pending.ids.insert(
            id,
            DifyIds {
                message_id: ids.message_id.clone(),
                task_id: ids.task_id.clone(),
                workflow_run_id: ids.workflow_run_id.clone(),
            },
        );
        if let (Some(conversation), Some(dify)) = (conversation, &ids.conversation_id) {
            pending.conversations.insert(conversation, dify.clone());
        }
    }

    /// Drops what is pending for an answer whose final write carries everything, its
    /// conversation's Dify id included: written later, that id could undo a newer change (a
    /// turn that found its Dify conversation gone and cleared it).
    pub fn forget(&self, id: MessageId, conversation: ConversationId) {
        let mut pending = self.pending();
        pending.content.remove(&id);
        pending.ids.remove(&id);
        pending.conversations.remove(&conversation);
    }

    /// An answer with tokens was stored: the next tick settles them.
    pub fn tokens_to_settle(&self) {
        self.0.unsettled.store(true, Ordering::Relaxed);
    }

    /// Adds the tokens of stored answers to their owners' monthly totals (see `users::quota`),
    /// after this process stored one, and once a minute for what any gateway left behind.
    pub async fn settle(&self) -> anyhow::Result<()> {
        let due = self.0.unsettled.swap(false, Ordering::Relaxed)
            || self
                .0
                .last_settle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
                >= SETTLE_SWEEP;
        if !due {
            return Ok(());
        }
        *self.0.last_settle.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let result = self
            .0
            .db
            .run(STATEMENT_TIMEOUT, async |conn| {
                crate::users::quota::settle(conn).await
            })
            .await;
        match result {
            // A full batch: more are waiting.
            Ok(n) if n as i64 >= crate::users::quota::SETTLE_BATCH => {
                self.tokens_to_settle();
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(error) => {
                self.tokens_to_settle();
                Err(error)
            }
        }
    }

    /// Writes everything pending now. On failure it stays pending for the next call.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let batch = std::mem::take(&mut *self.pending());
        if batch.is_empty() {
            return Ok(());
        }
        let metrics = &self.0.metrics;
        let result = self
            .0
            .db
            .run_moving(STATEMENT_TIMEOUT, batch.content_bytes(), async |conn| {
                write(conn, &batch).await
            })
            .await;
        match result {
            Ok(statements) => {
                metrics.writer_statements.inc_by(statements);
                metrics.writer_batch_rows.observe(batch.rows() as f64);
                if let Some(since) = batch.since {
                    metrics
                        .writer_lag_seconds
                        .observe(since.elapsed().as_secs_f64());
                }
                Ok(())
            }
            Err(error) => {
                metrics.writer_failures.inc();
                self.pending().restore(batch);
                Err(error)
            }
        }
    }

    /// Moves `updated_at` of the given live answers, so that the sweeper knows them alive.
    pub async fn heartbeat(&self, live: &[MessageId]) -> anyhow::Result<()> {
        for chunk in live.chunks(CHUNK_ROWS) {
            self.0
                .db
                .run(STATEMENT_TIMEOUT, async |conn| heartbeat(conn, chunk).await)
                .await?;
            self.0.metrics.writer_statements.inc();
        }
        Ok(())
    }

    /// Flushes every `tick` and heartbeats the answers `live()` names every `HEARTBEAT`, for as
    /// long as the process runs.
    pub fn spawn(
        self,
        tick: Duration,
        live: impl Fn() -> Vec<MessageId> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_heartbeat = Instant::now();
            let mut failing = false;
            loop {
                every.tick().await;
                let mut result = self.flush().await;
                if result.is_ok() {
                    result = self.settle().await;
                }
                if result.is_ok() && last_heartbeat.elapsed() >= HEARTBEAT {
                    result = self.heartbeat(&live()).await;
                    if result.is_ok() {
                        last_heartbeat = Instant::now();
                    }
                }
                match result {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("the answer writer caught up");
                    }
                    Ok(()) => {}
                    // Logged once per outage, not once per tick.
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "writing live answers failed; keeping them for the next tick"
                        );
                    }
                    Err(_) => {}
                }
            }
        })
    }
}

/// Splits rows into chunks of at most `CHUNK_ROWS` rows and about `CHUNK_BYTES`.
fn chunks<T>(rows: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for row in rows {
        let row_size = size(&row);
        match out.last_mut() {
            Some(current) if current.len() < CHUNK_ROWS && bytes + row_size <= CHUNK_BYTES => {
                bytes += row_size;
                current.push(row);
            }
            _ => {
                bytes = row_size;
                out.push(vec![row]);
            }
        }
    }
    out
}

/// `?, ?, …` for `n` placeholders.
pub(super) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Writes a batch; returns how many statements it took.
async fn write(conn: &mut AsyncMysqlConnection, batch: &Pending) -> diesel::QueryResult<u64> {
    let mut statements = 0;
    let at = now();
    for chunk in chunks(&batch.content, |(_, (content, _))| content.len()) {
        let case = || " WHEN ? THEN ?".repeat(chunk.len());
        let sql = format!(
            "UPDATE messages SET content = CASE id {0} END, last_seq = CASE id {0} END, \
             updated_at = ? WHERE status = 'STREAMING' AND id IN ({1})",
            case(),
            placeholders(chunk.len())
        );
        let mut query = diesel::sql_query(sql).into_boxed::<Mysql>();
        for (id, (content, _)) in &chunk {
            query = query
                .bind::<Binary, _>(**id)
                .bind::<Text, _>(content.as_str());
        }
        for (id, (_, seq)) in &chunk {
            query = query.bind::<Binary, _>(**id).bind::<Integer, _>(*seq);
        }
        query = query.bind::<diesel::sql_types::Datetime, _>(at);
        for (id, _) in &chunk {
            query = query.bind::<Binary, _>(**id);
        }
        query.execute(conn).await?;
        statements += 1;
    }
    for chunk in chunks(&batch.ids, |_| 0) {
        let case = || " WHEN ? THEN ?".repeat(chunk.len());
        let sql = format!(
            "UPDATE messages SET dify_message_id = CASE id {0} END, \
             dify_task_id = CASE id {0} END, dify_workflow_run_id = CASE id {0} END \
             WHERE id IN ({1})",
            case(),
            placeholders(chunk.len())
        );
        let mut query = diesel::sql_query(sql).into_boxed::<Mysql>();
        let columns: [fn(&DifyIds) -> Option<&str>; 3] = [
            |ids| ids.message_id.as_deref(),
            |ids| ids.task_id.as_deref(),
            |ids| ids.workflow_run_id.as_deref(),
        ];
        for column in columns {
            for (id, ids) in &chunk {
                query = query
                    .bind::<Binary, _>(**id)
                    .bind::<Nullable<Text>, _>(column(ids));
            }
        }
        for (id, _) in &chunk {
            query = query.bind::<Binary, _>(**id);
        }
        query.execute(conn).await?;
        statements += 1;
    }
    for chunk in chunks(&batch.conversations, |_| 0) {
        let sql = format!(
            "UPDATE conversations SET dify_conversation_id = CASE id {} END \
             WHERE dify_conversation_id IS NULL AND id IN ({})",
            " WHEN ? THEN ?".repeat(chunk.len()),
            placeholders(chunk.len())
        );
        let mut query = diesel::sql_query(sql).into_boxed::<Mysql>();
        for (id, dify) in &chunk {
            query = query.bind::<Binary, _>(**id).bind::<Text, _>(dify.as_str());
        }
        for (id, _) in &chunk {
            query = query.bind::<Binary, _>(**id);
        }
        query.execute(conn).await?;
        statements += 1;
    }
    Ok(statements)
}

async fn heartbeat(conn: &mut AsyncMysqlConnection, ids: &[MessageId]) -> diesel::QueryResult<()> {
    let sql = format!(
        "UPDATE messages SET updated_at = ? WHERE status = 'STREAMING' AND id IN ({})",
        placeholders(ids.len())
    );
    let mut query = diesel::sql_query(sql)
        .into_boxed::<Mysql>()
        .bind::<diesel::sql_types::Datetime, _>(now());
    for id in ids {
        query = query.bind::<Binary, _>(*id);
    }
    query.execute(conn).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_rows_and_bytes() {
        let small: HashMap<u32, String> = (0..1200).map(|i| (i, "x".into())).collect();
        let sizes: Vec<usize> = chunks(&small, |(_, c)| c.len())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![500, 500, 200]);
        let big: HashMap<u32, String> = (0..3).map(|i| (i, "y".repeat(3 << 20))).collect();
        assert_eq!(
            chunks(&big, |(_, c)| c.len()).len(),
            3,
            "one 3 MiB answer per statement"
        );
        assert!(chunks(Vec::<String>::new(), String::len).is_empty());
    }

    #[test]
    fn a_failed_batch_never_overwrites_newer_content() {
        let id = MessageId::new();
        let mut pending = Pending::default();
        pending.content.insert(id, ("newer".into(), 3));
        let mut failed = Pending::default();
        failed.content.insert(id, ("older".into(), 2));
        let other = MessageId::new();
        failed.content.insert(other, ("kept".into(), 5));
        pending.restore(failed);
        assert_eq!(pending.content[&id], ("newer".into(), 3));
        assert_eq!(pending.content[&other], ("kept".into(), 5));
    }
}
