//! Jobs written in states the api would never leave them in on its own.

use common::db::jobs::{Job, NewJob};
use sqlx::PgConnection;

/// The job alone, with no event, reservation or outbox row (tests build odd states
/// with it; the api uses `common::db::jobs::submit`).
pub async fn insert(conn: &mut PgConnection, job: &NewJob<'_>) -> Result<Job, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO jobs (id, user_id, pattern, prompt, models, options, reserved_tokens, reserved_day, deadline_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9)) RETURNING *",
    )
    .bind(job.id)
    .bind(job.user_id)
    .bind(job.pattern)
    .bind(job.prompt)
    .bind(job.models)
    .bind(job.options)
    .bind(job.reserved_tokens)
    .bind(job.reserved_day)
    .bind(f64::from(job.timeout_secs))
    .fetch_one(conn)
    .await
}
