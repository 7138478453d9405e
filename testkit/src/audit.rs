//! The delivery guarantees, checked from the database after the fact: every job ended,
//! once, and no finished step was recorded twice. The chaos benchmark (`ultra-bench
//! chaos`) and the chaos test read the same audit.

use sqlx::PgExecutor;

/// What the audit counts; all zero but `jobs` when every guarantee held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct DeliveryAudit {
    pub jobs: i64,
    /// Still queued or running.
    pub unfinished: i64,
    /// Ended, but not `succeeded` (a loss when every job should succeed).
    pub not_succeeded: i64,
    /// Jobs with more than one terminal event.
    pub duplicate_results: i64,
    /// `(job, stage, model)` steps completed more than once.
    pub repeated_steps: i64,
    /// Outbox rows not yet published.
    pub outbox_left: i64,
}

/// Audits every job in the database `ex` reaches (a test's or a benchmark run's own).
pub async fn delivery(ex: impl PgExecutor<'_>) -> Result<DeliveryAudit, sqlx::Error> {
    sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM jobs) AS jobs,
           (SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')) AS unfinished,
           (SELECT count(*) FROM jobs WHERE status IN ('failed', 'cancelled')) AS not_succeeded,
           (SELECT count(*) FROM (SELECT job_id FROM job_events
                                   WHERE kind IN ('succeeded', 'failed', 'cancelled')
                                   GROUP BY job_id HAVING count(*) > 1) d) AS duplicate_results,
           (SELECT count(*) FROM (SELECT job_id FROM job_events WHERE kind = 'step.completed'
                                   GROUP BY job_id, data->>'stage', data->>'model' HAVING count(*) > 1) r)
             AS repeated_steps,
           (SELECT count(*) FROM outbox) AS outbox_left",
    )
    .fetch_one(ex)
    .await
}
