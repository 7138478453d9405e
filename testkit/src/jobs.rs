//! Jobs written in states the api would never leave them in on its own.

use common::db::jobs::{bind_new_job, Job, NewJob};
use sqlx::{FromRow, PgConnection};

/// The job alone, with no event, reservation or outbox row (tests build odd states
/// with it; the api uses `common::db::jobs::submit`).
pub async fn insert(conn: &mut PgConnection, job: &NewJob<'_>) -> Result<Job, sqlx::Error> {
    let insert = sqlx::query(
        "INSERT INTO jobs (id, user_id, pattern, prompt, models, options, reserved_tokens, reserved_day, deadline_at,
                           chat, batch_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9), $10, $11) RETURNING *",
    );
    let row = bind_new_job(insert, job).fetch_one(conn).await?;
    Job::from_row(&row)
}
