//! What the queues hold right now: RabbitMQ's counts for every queue of the topology,
//! and PostgreSQL's view (outbox backlog, jobs waiting and running, dead letters).
//! Served to admins by `GET /v1/admin/queues` and sampled into `/metrics`.

use common::{db, queue::QueueStats};
use poem_openapi::Object;

use crate::state::AppState;

#[derive(Debug, Clone, Object)]
pub struct QueueView {
    pub name: String,
    /// `work` (the analyze queue), `dead_letter` or `delay` (retry back-off).
    pub role: String,
    /// Messages ready for delivery (not those delivered and awaiting an ack).
    pub messages: u32,
    pub consumers: u32,
}

#[derive(Debug, Clone, Object)]
pub struct QueuesSnapshot {
    /// Every queue of the topology; empty when RabbitMQ cannot be asked.
    pub queues: Vec<QueueView>,
    /// Why `queues` is empty, when RabbitMQ is unavailable.
    #[oai(skip_serializing_if_is_none)]
    pub broker_error: Option<String>,
    /// Jobs committed but not yet confirmed by RabbitMQ; the relay publishes them.
    pub outbox_backlog: i64,
    /// Jobs waiting for a worker (including those waiting out a retry delay).
    pub jobs_queued: i64,
    pub jobs_running: i64,
    /// Jobs failed by a dead letter and not replayed (`/v1/admin/dead-letters`).
    pub dead_lettered_jobs: i64,
}

impl QueuesSnapshot {
    /// Reads both sides; a broker outage is reported in the snapshot, a database
    /// outage is an error.
    pub async fn take(state: &AppState) -> Result<Self, sqlx::Error> {
        let (broker, backlog, active, dead) = tokio::join!(
            state.publisher.queue_stats(),
            db::outbox::backlog(&state.pool),
            db::jobs::active_counts(&state.pool),
            db::jobs::dead_lettered_count(&state.pool),
        );
        let (jobs_queued, jobs_running) = active?;
        let (queues, broker_error) = match broker {
            Ok(stats) => (stats.into_iter().map(QueueView::from).collect(), None),
            Err(err) => (Vec::new(), Some(err.to_string())),
        };
        Ok(Self {
            queues,
            broker_error,
            outbox_backlog: backlog?,
            jobs_queued,
            jobs_running,
            dead_lettered_jobs: dead?,
        })
    }

    /// Sets the scrape-time gauges.
    pub fn record(&self) {
        use common::metrics::{JOBS_ACTIVE, OUTBOX_BACKLOG, QUEUE_CONSUMERS, QUEUE_MESSAGES};
        for queue in &self.queues {
            let labels = [("queue", queue.name.clone()), ("role", queue.role.clone())];
            metrics::gauge!(QUEUE_MESSAGES, &labels).set(f64::from(queue.messages));
            metrics::gauge!(QUEUE_CONSUMERS, &labels).set(f64::from(queue.consumers));
        }
        metrics::gauge!(OUTBOX_BACKLOG).set(self.outbox_backlog as f64);
        metrics::gauge!(JOBS_ACTIVE, "status" => "queued").set(self.jobs_queued as f64);
        metrics::gauge!(JOBS_ACTIVE, "status" => "running").set(self.jobs_running as f64);
    }
}

impl From<QueueStats> for QueueView {
    fn from(stats: QueueStats) -> Self {
        Self { name: stats.name, role: stats.role.to_owned(), messages: stats.messages, consumers: stats.consumers }
    }
}
