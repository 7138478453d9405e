//! `outbox`: jobs committed but not yet confirmed by RabbitMQ.

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    pub id: i64,
    pub job_id: Uuid,
    pub attempt: i32,
    /// Publish through a delay queue (a retry's backoff); 0 for now.
    pub delay_ms: i32,
    /// The trace the message continues (W3C `traceparent`).
    pub traceparent: Option<String>,
}

pub async fn insert(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    attempt: i32,
    traceparent: Option<&str>,
) -> Result<i64, sqlx::Error> {
    insert_delayed(ex, job_id, attempt, 0, traceparent).await
}

/// A retry: published through a delay queue of about `delay_ms`.
pub async fn insert_delayed(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    attempt: i32,
    delay_ms: i32,
    traceparent: Option<&str>,
) -> Result<i64, sqlx::Error> {
    // `clock_timestamp()`, not the transaction's start (`now()`): the relay's age
    // filter must count from when the row was written, however long the transaction.
    sqlx::query_scalar(
        "INSERT INTO outbox (job_id, attempt, delay_ms, traceparent, created_at)
         VALUES ($1, $2, $3, $4, clock_timestamp()) RETURNING id",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(delay_ms)
    .bind(traceparent)
    .fetch_one(ex)
    .await
}

/// Rows not yet confirmed by the broker (a growing number means it is down).
pub async fn backlog(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(ex).await
}

pub async fn delete(ex: impl PgExecutor<'_>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox WHERE id = $1").bind(id).execute(ex).await?;
    Ok(())
}

/// Locks up to `limit` rows older than `min_age_ms` that no other relay holds. The
/// age keeps the relay from racing the fast path for a job being published right now;
/// a retry's row (one with a delay) has no fast path, and waits no longer than the
/// delay it reports.
pub async fn lock_batch(conn: &mut PgConnection, min_age_ms: i64, limit: i64) -> Result<Vec<Pending>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, job_id, attempt, delay_ms, traceparent FROM outbox
          WHERE created_at < now() - make_interval(secs => $1::float8 / 1000) OR delay_ms > 0
          ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(min_age_ms)
    .bind(limit)
    .fetch_all(conn)
    .await
}
