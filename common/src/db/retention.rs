//! Housekeeping: rows that would otherwise grow without bound are deleted once past
//! their retention — a pass deletes at most `PURGE_BATCH` rows of each kind, so it
//! never holds many locks for long, and the next pass takes the rest.

use std::time::Duration;

use sqlx::PgPool;

/// Rows of one kind deleted per statement.
const PURGE_BATCH: i64 = 10_000;

/// How long each kind of row is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `Idempotency-Key` records, from their creation.
    pub idempotency_keys: Duration,
    /// The events of ended jobs, from the job's end (the job row itself is kept).
    pub job_events: Duration,
    /// Refresh tokens, from their expiry.
    pub refresh_tokens: Duration,
    /// Daily usage rows, from their day.
    pub usage_days: Duration,
    /// Files (batch inputs and outputs), from their upload or writing.
    pub files: Duration,
    /// Webhook deliveries that ended (succeeded or failed), from their end.
    pub webhook_deliveries: Duration,
}

/// Rows deleted by one pass, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub idempotency_keys: u64,
    pub job_events: u64,
    pub refresh_tokens: u64,
    pub usage_days: u64,
    pub files: u64,
    pub webhook_deliveries: u64,
}

/// One pass over every kind of row.
pub async fn purge(pool: &PgPool, retention: &Retention) -> Result<Purged, sqlx::Error> {
    Ok(Purged {
        idempotency_keys: super::idempotency::purge_expired(pool, retention.idempotency_keys).await?,
        job_events: delete(
            pool,
            // Whole jobs at a time (a job's events are gone or all there), a batch of
            // jobs with events per pass.
            "DELETE FROM job_events WHERE job_id IN (
                SELECT j.id FROM jobs j
                 WHERE j.status IN ('succeeded', 'failed', 'cancelled')
                   AND j.finished_at <= now() - make_interval(secs => $1)
                   AND EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = j.id)
                 LIMIT $2 / 100)",
            retention.job_events,
        )
        .await?,
        refresh_tokens: delete(
            pool,
            "DELETE FROM refresh_tokens WHERE id IN (
                SELECT id FROM refresh_tokens WHERE expires_at <= now() - make_interval(secs => $1) LIMIT $2)",
            retention.refresh_tokens,
        )
        .await?,
        usage_days: delete(
            pool,
            "DELETE FROM usage_daily WHERE (user_id, day) IN (
                SELECT user_id, day FROM usage_daily
                 WHERE day < (now() AT TIME ZONE 'utc')::date - make_interval(secs => $1) AND reserved = 0
                 LIMIT $2)",
            retention.usage_days,
        )
        .await?,
        // Files are large: a hundredth of a batch of rows per pass.
        files: delete(
            pool,
            "DELETE FROM files WHERE id IN (
                SELECT id FROM files WHERE created_at <= now() - make_interval(secs => $1) LIMIT $2 / 100)",
            retention.files,
        )
        .await?,
        webhook_deliveries: delete(
            pool,
            "DELETE FROM webhook_deliveries WHERE id IN (
                SELECT id FROM webhook_deliveries
                 WHERE status <> 'pending' AND finished_at <= now() - make_interval(secs => $1) LIMIT $2)",
            retention.webhook_deliveries,
        )
        .await?,
    })
}

async fn delete(pool: &PgPool, sql: &'static str, older_than: Duration) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(sql).bind(older_than.as_secs_f64()).bind(PURGE_BATCH).execute(pool).await?;
    Ok(done.rows_affected())
}
