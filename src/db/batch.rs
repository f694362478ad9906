//! Group commit for interactive writes: callers hand their work to one task and wait, and the
//! task runs everything handed over while its previous batch ran as one batch. Nothing waits
//! for a timer: alone, a write runs at once; under load, batches grow with the load and
//! statements per second follow batches, not callers.

use tokio::sync::{mpsc, oneshot};

/// Work handed to a [`Batcher`], and where its outcome goes.
pub struct Job<T, R> {
    pub work: T,
    pub reply: oneshot::Sender<R>,
}

impl<T, R> Job<T, R> {
    /// Whether the caller stopped waiting (its request was cancelled or timed out).
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// How large a batch may grow.
#[derive(Clone, Copy)]
pub struct Limits {
    /// Jobs waiting; a caller beyond this waits to hand its job over.
    pub queue: usize,
    pub jobs: usize,
    /// At most this many bytes (by the batcher's measure of a job), unless one job alone is
    /// larger.
    pub bytes: usize,
}

pub struct Batcher<T, R> {
    queue: mpsc::Sender<Job<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Spawns the task that runs batches with `run` (which replies to every job) until the
    /// batcher is dropped. `bytes` measures a job for [`Limits::bytes`].
    pub fn spawn<F, Fut>(limits: Limits, bytes: fn(&T) -> usize, run: F) -> Self
    where
        F: Fn(Vec<Job<T, R>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (queue, mut queued) = mpsc::channel::<Job<T, R>>(limits.queue);
        tokio::spawn(async move {
            // A job that did not fit the previous batch starts the next.
            let mut carried = None;
            loop {
                let first = match carried.take() {
                    Some(job) => job,
                    None => match queued.recv().await {
                        Some(job) => job,
                        None => return,
                    },
                };
                let mut size = bytes(&first.work);
                let mut batch = vec![first];
                while batch.len() < limits.jobs {
                    let Ok(next) = queued.try_recv() else { break };
                    let next_size = bytes(&next.work);
                    if size + next_size > limits.bytes {
                        carried = Some(next);
                        break;
                    }
                    size += next_size;
                    batch.push(next);
                }
                run(batch).await;
            }
        });
        Self { queue }
    }

    /// Hands `work` over and waits for its outcome; `None` when the batcher is gone.
    pub async fn run(&self, work: T) -> Option<R> {
        let (reply, outcome) = oneshot::channel();
        self.queue.send(Job { work, reply }).await.ok()?;
        outcome.await.ok()
    }
}

/// Whether a batch failed because MySQL refused a statement (a key, a value: one job's fault,
/// found by running the jobs one at a time) rather than because MySQL could not be reached.
pub fn refusal(error: anyhow::Error) -> Result<diesel::result::Error, anyhow::Error> {
    match error.downcast::<diesel::result::Error>() {
        Ok(error) if !super::is_unavailable(&error) => Ok(error),
        Ok(error) => Err(error.into()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_handed_over_during_a_batch_make_the_next_batch_within_its_limits() {
        let (started, mut starts) = mpsc::unbounded_channel::<Vec<usize>>();
        let (release, _) = tokio::sync::broadcast::channel::<()>(8);
        let gate = release.clone();
        let limits = Limits {
            queue: 64,
            jobs: 3,
            bytes: 10,
        };
        let batcher = std::sync::Arc::new(Batcher::spawn(
            limits,
            |n: &usize| *n,
            move |batch| {
                let (started, mut gate) = (started.clone(), gate.subscribe());
                async move {
                    let _ = started.send(batch.iter().map(|job| job.work).collect());
                    let _ = gate.recv().await;
                    for job in batch {
                        let _ = job.reply.send(job.work * 10);
                    }
                }
            },
        ));
        let run = |n: usize| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.run(n).await })
        };
        // Alone, a job runs at once.
        let first = run(1);
        assert_eq!(starts.recv().await.unwrap(), [1]);
        // Handed over while it runs: batched by count (3), then by bytes (10; 8 alone is
        // larger than what is left and starts the batch after).
        let mut waiting = Vec::new();
        for n in [1, 1, 1, 1, 5, 8] {
            waiting.push(run(n));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Some(10));
        assert_eq!(starts.recv().await.unwrap(), [1, 1, 1]);
        release.send(()).unwrap();
        assert_eq!(starts.recv().await.unwrap(), [1, 5]);
        release.send(()).unwrap();
        assert_eq!(starts.recv().await.unwrap(), [8]);
        release.send(()).unwrap();
        let outcomes: Vec<_> = futures::future::join_all(waiting).await;
        let outcomes: Vec<_> = outcomes.into_iter().map(|o| o.unwrap()).collect();
        assert_eq!(
            outcomes,
            [Some(10), Some(10), Some(10), Some(10), Some(50), Some(80)]
        );
    }
}
