//! `outbox`: jobs committed but not yet confirmed by RabbitMQ.

use sqlx::PgExecutor;
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

/// Claims up to `limit` rows older than `min_age_ms` that no other relay has claimed,
/// for `claim`: the claim commits at once, so no row lock is held while the broker
/// confirms. The age keeps the relay from racing the fast path for a job being
/// published right now; a retry's row (one with a delay) has no fast path, and waits
/// no longer than the delay it reports. A relay that dies mid-batch leaves claims
/// that lapse, and its rows are published by the next.
pub async fn claim_batch(
    ex: impl PgExecutor<'_>,
    min_age_ms: i64,
    limit: i64,
    claim: std::time::Duration,
) -> Result<Vec<Pending>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE outbox SET claimed_until = now() + make_interval(secs => $3)
          WHERE id IN (SELECT id FROM outbox
                        WHERE (created_at < now() - make_interval(secs => $1::float8 / 1000) OR delay_ms > 0)
                          AND (claimed_until IS NULL OR claimed_until < now())
                        ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
          RETURNING id, job_id, attempt, delay_ms, traceparent",
    )
    .bind(min_age_ms)
    .bind(limit)
    .bind(claim.as_secs_f64())
    .fetch_all(ex)
    .await
}

/// Gives claimed rows back at once (their publish failed), for the next pass.
pub async fn unclaim(ex: impl PgExecutor<'_>, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET claimed_until = NULL WHERE id = ANY($1)").bind(ids).execute(ex).await?;
    Ok(())
}

/// Deletes the rows the broker confirmed, in one statement.
pub async fn delete_many(ex: impl PgExecutor<'_>, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(ids).execute(ex).await?;
    Ok(())
}
