//! `idempotency_keys`: what a client's `Idempotency-Key` created, per user.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recorded {
    pub request_hash: Vec<u8>,
    pub job_id: Uuid,
}

/// The live (unexpired) record of a key.
pub async fn get(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    key: &str,
    retention: Duration,
) -> Result<Option<Recorded>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request_hash, job_id FROM idempotency_keys
          WHERE user_id = $1 AND key = $2 AND created_at > now() - make_interval(secs => $3)",
    )
    .bind(user_id)
    .bind(key)
    .bind(retention.as_secs_f64())
    .fetch_optional(ex)
    .await
}

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key is now this request's.
    Claimed,
    /// A live record holds it: the earlier request's job answers.
    Taken,
    /// A concurrent transaction is claiming it and did not finish within the wait.
    Busy,
}

/// Claims the key for `job_id` in the caller's transaction (replacing an expired
/// record), waiting at most `wait` for a concurrent transaction that holds it. After
/// `Busy` the transaction is aborted: roll it back.
pub async fn claim(
    conn: &mut PgConnection,
    user_id: Uuid,
    key: &str,
    request_hash: &[u8],
    job_id: Uuid,
    retention: Duration,
    wait: Duration,
) -> Result<Claim, sqlx::Error> {
    // `SET LOCAL` takes no parameters; the number is ours.
    sqlx::query(&format!("SET LOCAL lock_timeout = '{}ms'", wait.as_millis().max(1))).execute(&mut *conn).await?;
    let claimed: Result<Option<Uuid>, sqlx::Error> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (user_id, key, request_hash, job_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (user_id, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, job_id = EXCLUDED.job_id, created_at = now()
          WHERE idempotency_keys.created_at <= now() - make_interval(secs => $5)
         RETURNING job_id",
    )
    .bind(user_id)
    .bind(key)
    .bind(request_hash)
    .bind(job_id)
    .bind(retention.as_secs_f64())
    .fetch_optional(&mut *conn)
    .await;
    let claim = match claimed {
        Ok(Some(_)) => Claim::Claimed,
        Ok(None) => Claim::Taken,
        // lock_not_available: the wait ran out.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => return Ok(Claim::Busy),
        Err(err) => return Err(err),
    };
    sqlx::query("SET LOCAL lock_timeout TO DEFAULT").execute(conn).await?;
    Ok(claim)
}

/// Forgets records past their retention (housekeeping).
pub async fn purge_expired(ex: impl PgExecutor<'_>, retention: Duration) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)")
        .bind(retention.as_secs_f64())
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}
