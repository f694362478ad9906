//! Final writes of answers, batched: a relay hands its answer's end here and waits (the
//! terminal event follows the confirmed write), and every answer that ended meanwhile is
//! written with it in three statements (`db::finish`). When thousands of streams end within
//! seconds, the database sees a few statements per batch instead of three per answer. A batch
//! that MySQL refuses is written again one answer at a time, so one answer's error is its own;
//! an outage fails the batch, and each relay retries its answer (`relay::write_final`).

use std::sync::Arc;

use super::db::{self as chat_db, FinalAnswer, StoredAnswer};
use crate::db::batch::{Batcher, Job, Limits, refusal};
use crate::db::{Db, STATEMENT_TIMEOUT};
use crate::metrics::Metrics;

/// At most 256 answers, or 4 MiB, per batch (MariaDB's default `max_allowed_packet` is
/// 16 MiB); a larger answer is written alone.
const LIMITS: Limits = Limits {
    queue: 8192,
    jobs: 256,
    bytes: 4 << 20,
};

/// What became of an answer's final write: what the database decided, or `None` when the
/// answer is gone (its conversation was deleted while it streamed).
pub type Written = anyhow::Result<Option<StoredAnswer>>;

pub struct Finals(Batcher<Arc<FinalAnswer>, Written>);

impl Finals {
    /// Final writes through `db` (the writer pool), until `Finals` is dropped.
    pub fn spawn(db: Db, metrics: Arc<Metrics>) -> Self {
        Self(Batcher::spawn(
            LIMITS,
            |answer: &Arc<FinalAnswer>| answer.bytes(),
            move |batch| {
                let (db, metrics) = (db.clone(), metrics.clone());
                async move { write(&db, &metrics, batch).await }
            },
        ))
    }

    /// Writes `answer` with whatever else ends meanwhile.
    pub async fn write(&self, answer: Arc<FinalAnswer>) -> Written {
        self.0
            .run(answer)
            .await
            .unwrap_or_else(|| Err(anyhow::anyhow!("the final writer stopped")))
    }
}

async fn write(db: &Db, metrics: &Metrics, batch: Vec<Job<Arc<FinalAnswer>, Written>>) {
    metrics.final_write_batch.observe(batch.len() as f64);
    let outcome = match finish(db, &batch).await {
        Err(error) if batch.len() > 1 => match refusal(error) {
            Ok(_) => None,
            Err(error) => Some(Err(error)),
        },
        outcome => Some(outcome),
    };
    let reply = |job: Job<Arc<FinalAnswer>, Written>, written: Written| {
        // The relay takes its answer back without a copy once the batch lets go of it.
        let Job { work, reply } = job;
        drop(work);
        let _ = reply.send(written);
    };
    match outcome {
        // Refused: one answer at a time, so that the one at fault fails alone.
        None => {
            for job in batch {
                let id = job.work.id;
                let written = finish(db, std::slice::from_ref(&job))
                    .await
                    .map(|mut stored| stored.remove(&id));
                reply(job, written);
            }
        }
        Some(Ok(mut stored)) => {
            for job in batch {
                let written = stored.remove(&job.work.id);
                reply(job, Ok(written));
            }
        }
        Some(Err(error)) => {
            let error = format!("{error:#}");
            for job in batch {
                reply(job, Err(anyhow::anyhow!("{error}")));
            }
        }
    }
}

async fn finish(
    db: &Db,
    batch: &[Job<Arc<FinalAnswer>, Written>],
) -> anyhow::Result<std::collections::HashMap<crate::conversations::domain::MessageId, StoredAnswer>>
{
    let answers: Vec<&FinalAnswer> = batch.iter().map(|job| &*job.work).collect();
    let bytes = answers.iter().map(|answer| answer.bytes()).sum();
    db.run_moving(STATEMENT_TIMEOUT, bytes, async |conn| {
        chat_db::finish(conn, &answers).await
    })
    .await
}
