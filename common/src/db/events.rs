//! `job_events`: the persisted lifecycle events of each job, numbered 1, 2, 3, …

use sqlx::{types::Json, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::{events::JobEvent, job::EventData};

/// Appends an event with the job's next sequence number. Call it inside the
/// transaction that makes the event true: the counter's row lock orders concurrent
/// writers, so numbers are gapless and committed in order.
pub async fn append(conn: &mut PgConnection, job_id: Uuid, data: &EventData) -> Result<JobEvent, sqlx::Error> {
    let (seq, created_at) = sqlx::query_as(
        "WITH next AS (
            UPDATE jobs SET last_event_seq = last_event_seq + 1 WHERE id = $1 RETURNING last_event_seq
         )
         INSERT INTO job_events (job_id, seq, kind, data)
         SELECT $1, last_event_seq, $2, $3 FROM next
         RETURNING seq, created_at",
    )
    .bind(job_id)
    .bind(data.kind())
    .bind(Json(data))
    .fetch_one(conn)
    .await?;
    Ok(JobEvent::new(job_id, seq, data.clone(), created_at))
}

/// The rest of a statement whose data-modifying CTE `write` may change a row: the
/// job's next event (kind `$kind`, data `$data`, job `$1`: bind them with `bind_event`) is appended only if it did,
/// in the same statement — one round trip and one implicit transaction where a
/// `BEGIN`, two statements and a `COMMIT` would take four. Returns the event's `seq`
/// and `created_at` (`Written`), or no row when `write` changed nothing.
pub(crate) fn append_if_written(kind: usize, data: usize) -> String {
    format!(
        "next AS (
            UPDATE jobs SET last_event_seq = last_event_seq + 1
             WHERE id = $1 AND EXISTS (SELECT 1 FROM write) RETURNING last_event_seq
         )
         INSERT INTO job_events (job_id, seq, kind, data)
         SELECT $1, last_event_seq, ${kind}, ${data} FROM next
         RETURNING seq, created_at"
    )
}

/// What `append_if_written` returns of the event it wrote: the caller has its data.
pub(crate) type Written = (i64, chrono::DateTime<chrono::Utc>);

/// Binds an event's kind and data, for a statement built with `append_if_written`.
pub(crate) fn bind_event<'q>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, Written, sqlx::postgres::PgArguments>,
    data: &'q EventData,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, Written, sqlx::postgres::PgArguments> {
    query.bind(data.kind()).bind(Json(data))
}

/// Events after `after_seq`, oldest first, at most `limit`.
pub async fn after(
    ex: impl PgExecutor<'_>,
    job_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<JobEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT job_id, seq, kind, data, created_at FROM job_events
          WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(job_id)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(ex)
    .await
}
