//! `batches` and `batch_lines`: OpenAI-style batches, each line a chat completion
//! request that becomes a job (`jobs.batch_id`) when the feeder admits it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{types::Json, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::webhooks::{self, RequestCounts};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Batch {
    pub id: Uuid,
    pub user_id: Uuid,
    pub input_file_id: Uuid,
    pub endpoint: String,
    pub completion_window: String,
    pub status: String,
    pub metadata: Option<Value>,
    pub errors: Option<Value>,
    pub output_file_id: Option<Uuid>,
    pub error_file_id: Option<Uuid>,
    pub total: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub in_progress_at: Option<DateTime<Utc>>,
    pub finalizing_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub cancelling_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
}

/// One input line, as stored.
#[derive(Debug, Clone)]
pub struct NewLine<'a> {
    pub line: i32,
    pub custom_id: &'a str,
    pub body: &'a Value,
}

/// A batch with its line counts.
#[derive(Debug, Clone)]
pub struct WithCounts {
    pub batch: Batch,
    pub completed: i64,
    pub failed: i64,
}

/// What a new batch is.
pub struct NewBatch<'a> {
    pub user_id: Uuid,
    pub input_file_id: Uuid,
    pub endpoint: &'a str,
    pub completion_window: &'a str,
    pub window: std::time::Duration,
    pub metadata: Option<&'a Value>,
}

/// Creates a batch: `in_progress` with its lines, or `failed` with `errors` (the
/// input's validation errors) and none.
pub async fn create(
    conn: &mut PgConnection,
    batch: &NewBatch<'_>,
    lines: &[NewLine<'_>],
    errors: Option<&Value>,
) -> Result<Batch, sqlx::Error> {
    let id = Uuid::now_v7();
    let status = if errors.is_some() { "failed" } else { "in_progress" };
    let created: Batch = sqlx::query_as(
        "INSERT INTO batches (id, user_id, input_file_id, endpoint, completion_window, status, metadata, errors, total,
                              expires_at, in_progress_at, failed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10),
                 CASE WHEN $6 = 'in_progress' THEN now() END, CASE WHEN $6 = 'failed' THEN now() END)
         RETURNING *",
    )
    .bind(id)
    .bind(batch.user_id)
    .bind(batch.input_file_id)
    .bind(batch.endpoint)
    .bind(batch.completion_window)
    .bind(status)
    .bind(batch.metadata)
    .bind(errors)
    .bind(lines.len() as i32)
    .bind(batch.window.as_secs_f64())
    .fetch_one(&mut *conn)
    .await?;
    if errors.is_some() {
        // Refused whole: it ends as it is created.
        let counts = RequestCounts { total: i64::from(created.total), completed: 0, failed: 0 };
        tell(conn, batch.user_id, id, status, counts).await?;
    }
    // One statement per thousand lines: a 50,000-line batch is 50 round trips.
    for chunk in lines.chunks(1_000) {
        let numbers: Vec<i32> = chunk.iter().map(|l| l.line).collect();
        let custom_ids: Vec<&str> = chunk.iter().map(|l| l.custom_id).collect();
        let bodies: Vec<Json<&Value>> = chunk.iter().map(|l| Json(l.body)).collect();
        sqlx::query(
            "INSERT INTO batch_lines (batch_id, line, custom_id, body)
             SELECT $1, * FROM unnest($2::int[], $3::text[], $4::jsonb[])",
        )
        .bind(id)
        .bind(&numbers)
        .bind(&custom_ids)
        .bind(&bodies)
        .execute(&mut *conn)
        .await?;
    }
    Ok(created)
}

/// Each batch's `completed` and `failed` lines, in one pass over its lines.
const COUNTS: &str = "LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.status = 'succeeded') AS completed,
           count(*) FILTER (WHERE bl.error IS NOT NULL OR j.status IN ('failed', 'cancelled')) AS failed
      FROM batch_lines bl LEFT JOIN jobs j ON j.id = bl.job_id
     WHERE bl.batch_id = b.id) c ON true";

fn with_counts(row: &sqlx::postgres::PgRow) -> Result<WithCounts, sqlx::Error> {
    use sqlx::{FromRow, Row};
    Ok(WithCounts {
        batch: Batch::from_row(row)?,
        completed: row.try_get("completed")?,
        failed: row.try_get("failed")?,
    })
}

/// The batch if `user_id` owns it.
pub async fn get_owned(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<Option<WithCounts>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT b.*, c.completed, c.failed FROM batches b {COUNTS} WHERE b.id = $1 AND b.user_id = $2"
    ))
    .bind(id)
    .bind(user_id)
    .fetch_optional(ex)
    .await?;
    row.as_ref().map(with_counts).transpose()
}

/// A page of the user's batches, newest first, after the id `after`.
pub async fn list_owned(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<WithCounts>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT b.*, c.completed, c.failed FROM batches b {COUNTS} WHERE b.user_id = $1 AND ($2::uuid IS NULL OR b.id < $2)
          ORDER BY b.id DESC LIMIT $3"
    ))
    .bind(user_id)
    .bind(after)
    .bind(limit)
    .fetch_all(ex)
    .await?;
    rows.iter().map(with_counts).collect()
}

/// Asks a running batch to stop: `cancelling`, which the feeder carries on. False if
/// the batch had already ended (or was cancelling).
pub async fn request_cancel(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE batches SET status = 'cancelling', cancelling_at = now()
          WHERE id = $1 AND user_id = $2 AND status = 'in_progress'",
    )
    .bind(id)
    .bind(user_id)
    .execute(ex)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The next batch that needs the feeder, locked for the caller's transaction (another
/// api replica's feeder skips it). `after` walks the batches in one pass.
pub async fn lock_next_active(conn: &mut PgConnection, after: Option<Uuid>) -> Result<Option<Batch>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM batches WHERE status IN ('in_progress', 'cancelling') AND ($1::uuid IS NULL OR id > $1)
          ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .bind(after)
    .fetch_optional(conn)
    .await
}

/// Lines of a batch whose jobs are queued or running, and lines not yet admitted.
pub async fn progress(ex: impl PgExecutor<'_>, batch_id: Uuid) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE batch_id = $1 AND status IN ('queued', 'running')),
                (SELECT count(*) FROM batch_lines WHERE batch_id = $1 AND job_id IS NULL AND error IS NULL)",
    )
    .bind(batch_id)
    .fetch_one(ex)
    .await
}

/// What admission weighs, in one snapshot.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct Load {
    /// Interactive jobs waiting for a worker, every user's.
    pub interactive_queued: i64,
    /// Batch lines queued or running, every batch's.
    pub batch_lines: i64,
    /// The user's batch lines queued or running, across all their batches.
    pub users_lines: i64,
}

pub async fn load(ex: impl PgExecutor<'_>, user_id: Uuid) -> Result<Load, sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE status = 'queued' AND batch_id IS NULL) AS interactive_queued,
                (SELECT count(*) FROM jobs WHERE status IN ('queued', 'running') AND batch_id IS NOT NULL)
                  AS batch_lines,
                (SELECT count(*) FROM jobs
                  WHERE user_id = $1 AND batch_id IS NOT NULL AND status IN ('queued', 'running')) AS users_lines",
    )
    .bind(user_id)
    .fetch_one(ex)
    .await
}

/// A line waiting to be admitted.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingLine {
    pub line: i32,
    pub custom_id: String,
    pub body: Value,
}

pub async fn pending(ex: impl PgExecutor<'_>, batch_id: Uuid, limit: i64) -> Result<Vec<PendingLine>, sqlx::Error> {
    sqlx::query_as(
        "SELECT line, custom_id, body FROM batch_lines WHERE batch_id = $1 AND job_id IS NULL AND error IS NULL
          ORDER BY line LIMIT $2",
    )
    .bind(batch_id)
    .bind(limit)
    .fetch_all(ex)
    .await
}

/// The line became `job_id`.
pub async fn admitted(ex: impl PgExecutor<'_>, batch_id: Uuid, line: i32, job_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE batch_lines SET job_id = $3 WHERE batch_id = $1 AND line = $2")
        .bind(batch_id)
        .bind(line)
        .bind(job_id)
        .execute(ex)
        .await?;
    Ok(())
}

/// The line will not run: `error` is its answer (an OpenAI error body, with a status).
pub async fn refused(ex: impl PgExecutor<'_>, batch_id: Uuid, line: i32, error: &Value) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE batch_lines SET error = $3 WHERE batch_id = $1 AND line = $2")
        .bind(batch_id)
        .bind(line)
        .bind(error)
        .execute(ex)
        .await?;
    Ok(())
}

/// Every line not yet admitted will not run (the batch was cancelled or expired).
pub async fn refuse_pending(ex: impl PgExecutor<'_>, batch_id: Uuid, error: &Value) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("UPDATE batch_lines SET error = $2 WHERE batch_id = $1 AND job_id IS NULL AND error IS NULL")
            .bind(batch_id)
            .bind(error)
            .execute(ex)
            .await?;
    Ok(done.rows_affected())
}

/// The batch's queued jobs (to cancel them).
pub async fn queued_jobs(ex: impl PgExecutor<'_>, batch_id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM jobs WHERE batch_id = $1 AND status = 'queued'")
        .bind(batch_id)
        .fetch_all(ex)
        .await
}

/// A line at the end of its batch: its request and what became of it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FinishedLine {
    pub line: i32,
    pub custom_id: String,
    pub body: Value,
    pub job_id: Option<Uuid>,
    pub error: Option<Value>,
    /// Tokens of the job's paid calls.
    pub input_tokens: i64,
    pub output_tokens: i64,
}

pub async fn finished_lines(ex: impl PgExecutor<'_>, batch_id: Uuid) -> Result<Vec<FinishedLine>, sqlx::Error> {
    sqlx::query_as(
        "SELECT bl.line, bl.custom_id, bl.body, bl.job_id, bl.error,
                coalesce(u.input_tokens, 0) AS input_tokens, coalesce(u.output_tokens, 0) AS output_tokens
           FROM batch_lines bl
           LEFT JOIN (SELECT s.job_id, sum(coalesce(s.input_tokens, 0))::bigint AS input_tokens,
                             sum(coalesce(s.output_tokens, 0))::bigint AS output_tokens
                        FROM job_steps s JOIN jobs j ON j.id = s.job_id
                       WHERE j.batch_id = $1 AND NOT s.cached GROUP BY s.job_id) u ON u.job_id = bl.job_id
          WHERE bl.batch_id = $1 ORDER BY bl.line",
    )
    .bind(batch_id)
    .fetch_all(ex)
    .await
}

/// Ends a batch: its final status (`completed`, `cancelled` or `expired`) and files,
/// and the deliveries of its webhooks, which commit with it.
pub async fn finish(
    conn: &mut PgConnection,
    id: Uuid,
    status: &str,
    files: (Option<Uuid>, Option<Uuid>),
    counts: RequestCounts,
) -> Result<(), sqlx::Error> {
    let (output_file_id, error_file_id) = files;
    let user_id: Uuid = sqlx::query_scalar(
        "UPDATE batches SET status = $2, output_file_id = $3, error_file_id = $4, finalizing_at = now(),
                completed_at = CASE WHEN $2 = 'completed' THEN now() END,
                cancelled_at = CASE WHEN $2 = 'cancelled' THEN now() END,
                expired_at = CASE WHEN $2 = 'expired' THEN now() END
          WHERE id = $1
         RETURNING user_id",
    )
    .bind(id)
    .bind(status)
    .bind(output_file_id)
    .bind(error_file_id)
    .fetch_one(&mut *conn)
    .await?;
    tell(conn, user_id, id, status, counts).await
}

/// Writes the webhook deliveries of a batch that ended with `status`.
async fn tell(
    conn: &mut PgConnection,
    user_id: Uuid,
    id: Uuid,
    status: &str,
    counts: RequestCounts,
) -> Result<(), sqlx::Error> {
    if let Some((event_type, body)) = webhooks::batch_body(id, status, counts, Utc::now()) {
        super::webhooks::enqueue(conn, user_id, event_type, &body).await?;
    }
    Ok(())
}
