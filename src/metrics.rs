//! Prometheus metrics, served as text on `GET /metrics`. One registry per `App` (no global
//! state), so tests running several apps in one process each see their own numbers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `completed`, `stopped`, or the failure's error code.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResumeLabels {
    /// `live` (from the answer's log here), `mirror` (through Redis, from another gateway) or
    /// `stored` (its row).
    pub from: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Answers being relayed by this process.
    pub active_streams: Gauge,
    /// Events relayed to subscribers (all kinds), and answer deltas among them.
    pub events_relayed: Counter,
    pub deltas_relayed: Counter,
    /// Seconds from reading a Dify frame to handing its event to the subscriber's channel.
    pub relay_seconds: Histogram,
    /// Seconds from sending the request to Dify to its first event.
    pub dify_first_event_seconds: Histogram,
    /// Rows written per write-behind batch, statements it took, and how old the oldest change
    /// in the batch was (the writer's lag).
    pub writer_batch_rows: Histogram,
    pub writer_statements: Counter,
    pub writer_failures: Counter,
    pub writer_lag_seconds: Histogram,
    /// Seconds spent waiting for a pooled MySQL connection.
    pub pool_wait_seconds: Histogram,
    /// Seconds from a `chat` request to its turn being saved (before Dify is called), and the
    /// new conversations' first turns saved per batch.
    pub turn_start_seconds: Histogram,
    pub turn_save_batch: Histogram,
    /// Answers whose final writes went to the database together.
    pub final_write_batch: Histogram,
    /// Answers ended, by outcome.
    pub outcomes: Family<OutcomeLabels, Counter>,
    /// Subscriptions that resumed an answer (`resumeChat`, idempotent retries), by source.
    pub resumes: Family<ResumeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        // 10 µs … about 84 s.
        let seconds = || Histogram::new(exponential_buckets(0.000_01, 2.0, 24));
        let mut metrics = Self {
            active_streams: Gauge::default(),
            events_relayed: Counter::default(),
            deltas_relayed: Counter::default(),
            relay_seconds: seconds(),
            dify_first_event_seconds: seconds(),
            writer_batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            writer_statements: Counter::default(),
            writer_failures: Counter::default(),
            writer_lag_seconds: seconds(),
            pool_wait_seconds: seconds(),
            turn_start_seconds: seconds(),
            turn_save_batch: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            final_write_batch: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            outcomes: Family::default(),
            resumes: Family::default(),
            registry: Registry::with_prefix("rechat"),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "active_streams",
            "Answers being relayed by this process",
            metrics.active_streams.clone(),
        );
        registry.register(
            "events_relayed",
            "Events sent to chat subscribers",
            metrics.events_relayed.clone(),
        );
        registry.register(
            "deltas_relayed",
            "AnswerDelta events sent to chat subscribers",
            metrics.deltas_relayed.clone(),
        );
        registry.register(
            "relay_seconds",
            "Time from reading a Dify frame to handing its event to the subscriber",
            metrics.relay_seconds.clone(),
        );
        registry.register(
            "dify_first_event_seconds",
            "Time from calling Dify to its first stream event",
            metrics.dify_first_event_seconds.clone(),
        );
        registry.register(
            "writer_batch_rows",
            "Rows written per write-behind batch",
            metrics.writer_batch_rows.clone(),
        );
        registry.register(
            "writer_statements",
            "Statements run by the write-behind writer",
            metrics.writer_statements.clone(),
        );
        registry.register(
            "writer_failures",
            "Write-behind batches that failed and were kept for the next tick",
            metrics.writer_failures.clone(),
        );
        registry.register(
            "writer_lag_seconds",
            "Age of the oldest change in a write-behind batch when it was written",
            metrics.writer_lag_seconds.clone(),
        );
        registry.register(
            "pool_wait_seconds",
            "Time spent waiting for a MySQL connection from a pool",
            metrics.pool_wait_seconds.clone(),
        );
        registry.register(
            "turn_start_seconds",
            "Time from a chat request to its turn being saved, before Dify is called",
            metrics.turn_start_seconds.clone(),
        );
        registry.register(
            "turn_save_batch",
            "New conversations' first turns saved together in one transaction",
            metrics.turn_save_batch.clone(),
        );
        registry.register(
            "final_write_batch",
            "Answers whose final writes went to the database together",
            metrics.final_write_batch.clone(),
        );
        registry.register(
            "answers",
            "Answers ended, by outcome",
            metrics.outcomes.clone(),
        );
        registry.register(
            "resumes",
            "Subscriptions that resumed an answer, by where its events came from",
            metrics.resumes.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn resumed(&self, from: &'static str) {
        self.resumes.get_or_create(&ResumeLabels { from }).inc();
    }

    pub fn outcome(&self, label: &str) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: label.to_owned(),
            })
            .inc();
    }
}
