//! Starting turns. A turn is saved before Dify is called, and at a thousand new chats a second
//! that save is most of the database's work: so a new conversation's first turn takes one query
//! of its own (the account, its quota and an earlier turn with the same `clientMessageId`,
//! `db::check_turn`) and is then handed to the one saver of the process, which writes every
//! first turn handed over meanwhile in one transaction (a multi-row insert per table). The chat
//! holds no pooled connection while it waits, and statements per second follow batches, not
//! chats. A batch that MySQL refuses is saved again one turn at a time, so one turn's error (its
//! `clientMessageId` taken meanwhile, its account deleted meanwhile) is that turn's alone.
//!
//! A later turn of an existing conversation locks that conversation (one turn at a time), so it
//! keeps its own transaction (`db::begin_next_turn`).

use std::sync::Arc;

use super::db::{self as chat_db, BeginError, Chosen, SavedTurn, Starter};
use crate::apps::AppId;
use crate::conversations::domain::{ConversationId, MessageId};
use crate::db::batch::{Batcher, Job, Limits, refusal};
use crate::db::{Db, STATEMENT_TIMEOUT};
use crate::error::AppError;
use crate::metrics::Metrics;

/// At most 256 turns, or about 4 MiB of queries, per transaction (MariaDB's default
/// `max_allowed_packet` is 16 MiB).
const LIMITS: Limits = Limits {
    queue: 4096,
    jobs: 256,
    bytes: 4 << 20,
};

/// Checks and saves turns; see the module's documentation.
pub struct Turns {
    db: Db,
    saver: Batcher<SavedTurn, Result<SavedTurn, BeginError>>,
}

impl Turns {
    /// Turns saved through `db` (the interactive pool). The saver runs until `Turns` is dropped.
    pub fn spawn(db: Db, metrics: Arc<Metrics>) -> Self {
        let saver_db = db.clone();
        let saver = Batcher::spawn(
            LIMITS,
            |turn: &SavedTurn| turn.1.content.len(),
            move |batch| {
                let (db, metrics) = (saver_db.clone(), metrics.clone());
                async move { save(&db, &metrics, batch).await }
            },
        );
        Self { db, saver }
    }

    /// Checks and saves a turn of `starter`: in `existing`, or in a new conversation. `choose`
    /// picks the turn's app once the conversation's is known (`None` for a new conversation) and
    /// may refuse the turn.
    pub async fn begin(
        &self,
        starter: Starter,
        existing: Option<ConversationId>,
        query: &str,
        client_message_id: Option<&str>,
        choose: impl FnOnce(Option<Option<AppId>>) -> Result<Chosen, AppError> + Send,
    ) -> Result<SavedTurn, BeginError> {
        let mut conn = self.db.get().await?;
        if let Some(conversation) = existing {
            return chat_db::begin_next_turn(
                &mut conn,
                starter,
                conversation,
                query,
                client_message_id,
                choose,
            )
            .await;
        }
        chat_db::check_turn(&mut conn, starter, None, query, client_message_id).await?;
        drop(conn);
        let chosen = choose(None).map_err(BeginError::Refused)?;
        let turn = chat_db::first_turn(starter, query, client_message_id, chosen);
        self.saver
            .run(turn)
            .await
            .unwrap_or(Err(BeginError::Unavailable))
    }
}

/// Why a batch was not saved.
enum Failure {
    /// MySQL refused it: a unique key (a `clientMessageId` taken meanwhile), a foreign key (an
    /// account deleted meanwhile).
    Refused(diesel::result::Error),
    /// No connection, or MySQL did not answer in time.
    Unavailable,
}

impl From<Failure> for BeginError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Refused(error) => error.into(),
            Failure::Unavailable => Self::Unavailable,
        }
    }
}

/// Saves a batch in one transaction, or, when MySQL refuses it, one turn at a time; tells each
/// chat its outcome. Turns whose chat went away while queued (the client left, or its start
/// timed out) are not saved; an answer saved for a chat that went away during the save is
/// marked INTERRUPTED at once, since no relay will stream it.
async fn save(
    db: &Db,
    metrics: &Metrics,
    batch: Vec<Job<SavedTurn, Result<SavedTurn, BeginError>>>,
) {
    let batch: Vec<_> = batch.into_iter().filter(|job| !job.abandoned()).collect();
    if batch.is_empty() {
        return;
    }
    metrics.turn_save_batch.observe(batch.len() as f64);
    let outcomes = match insert(db, &batch).await {
        Err(Failure::Refused(_)) if batch.len() > 1 => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for job in &batch {
                outcomes.push(insert(db, std::slice::from_ref(job)).await);
            }
            outcomes
        }
        Ok(()) => batch.iter().map(|_| Ok(())).collect(),
        Err(Failure::Unavailable) => batch.iter().map(|_| Err(Failure::Unavailable)).collect(),
        refused => vec![refused],
    };
    let mut abandoned: Vec<MessageId> = Vec::new();
    for (job, outcome) in batch.into_iter().zip(outcomes) {
        let answer = job.work.2.id;
        let saved = outcome.is_ok();
        let outcome = outcome.map(|()| job.work).map_err(BeginError::from);
        if job.reply.send(outcome).is_err() && saved {
            abandoned.push(answer);
        }
    }
    if !abandoned.is_empty() {
        let marked = db
            .run(STATEMENT_TIMEOUT, async |conn| {
                chat_db::interrupt_abandoned(conn, &abandoned).await
            })
            .await;
        if let Err(error) = marked {
            // The sweeper marks them once they are stale.
            tracing::warn!(%error, answers = abandoned.len(), "marking abandoned answers");
        }
    }
}

/// `batch` in one transaction.
async fn insert<R>(db: &Db, batch: &[Job<SavedTurn, R>]) -> Result<(), Failure> {
    let turns: Vec<&SavedTurn> = batch.iter().map(|job| &job.work).collect();
    let bytes = turns.iter().map(|turn| turn.1.content.len()).sum();
    db.run_moving(STATEMENT_TIMEOUT, bytes, async |conn| {
        chat_db::insert_first_turns(conn, &turns).await
    })
    .await
    .map_err(|error| match refusal(error) {
        Ok(error) => Failure::Refused(error),
        Err(_) => Failure::Unavailable,
    })
}
