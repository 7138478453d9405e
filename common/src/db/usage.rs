//! `usage_daily`: tokens per user per UTC day — reserved by accepted jobs (their worst
//! case) and used by finished ones. Reservations are made in the submit transaction
//! under the user's row lock, so concurrent submissions cannot overspend a budget.

use chrono::NaiveDate;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct DailyUsage {
    pub reserved: i64,
    pub used: i64,
    pub jobs: i64,
    pub cost_micros: i64,
}

/// Today's date in UTC, as PostgreSQL sees it (one clock for every replica).
pub async fn today(ex: impl PgExecutor<'_>) -> Result<NaiveDate, sqlx::Error> {
    sqlx::query_scalar("SELECT (now() AT TIME ZONE 'utc')::date").fetch_one(ex).await
}

/// A user's standing now: today's date (UTC, PostgreSQL's clock), today's usage and
/// the jobs they have queued or running — one round trip.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Standing {
    pub day: NaiveDate,
    #[sqlx(flatten)]
    pub usage: DailyUsage,
    pub active_jobs: i64,
}

/// Read after `lock_user` in a submit (a statement of its own, so its snapshot is
/// taken once the lock is held and sees the submissions committed before it).
pub async fn standing(ex: impl PgExecutor<'_>, user_id: Uuid) -> Result<Standing, sqlx::Error> {
    sqlx::query_as(
        "WITH today AS (SELECT (now() AT TIME ZONE 'utc')::date AS day)
         SELECT today.day,
                coalesce(u.reserved, 0) AS reserved, coalesce(u.used, 0) AS used,
                coalesce(u.jobs, 0) AS jobs, coalesce(u.cost_micros, 0) AS cost_micros,
                (SELECT count(*) FROM jobs WHERE user_id = $1 AND status IN ('queued', 'running')) AS active_jobs
           FROM today LEFT JOIN usage_daily u ON u.user_id = $1 AND u.day = today.day",
    )
    .bind(user_id)
    .fetch_one(ex)
    .await
}

/// Serialises one user's submissions: the caller holds this lock until commit.
/// `FOR NO KEY UPDATE`, not `FOR UPDATE`: it must not block the `FOR KEY SHARE` that
/// foreign-key checks on the user's rows take (a worker finishing one of the user's
/// jobs needs it), or a submit and a finishing job deadlock.
pub async fn lock_user(conn: &mut PgConnection, user_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE").bind(user_id).execute(conn).await?;
    Ok(())
}

pub async fn reserve(conn: &mut PgConnection, user_id: Uuid, day: NaiveDate, tokens: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO usage_daily (user_id, day, reserved, jobs) VALUES ($1, $2, $3, 1)
         ON CONFLICT (user_id, day) DO UPDATE
            SET reserved = usage_daily.reserved + EXCLUDED.reserved, jobs = usage_daily.jobs + 1",
    )
    .bind(user_id)
    .bind(day)
    .bind(tokens)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes a replayed job's reservation again, for `day`.
pub async fn reserve_again(
    conn: &mut PgConnection,
    user_id: Uuid,
    day: NaiveDate,
    job_id: Uuid,
) -> Result<(), sqlx::Error> {
    let tokens: i64 =
        sqlx::query_scalar("SELECT reserved_tokens FROM jobs WHERE id = $1").bind(job_id).fetch_one(&mut *conn).await?;
    reserve(conn, user_id, day, tokens).await
}
