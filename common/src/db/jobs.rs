//! `jobs`: one row per accepted analyze request, owned by one user.

use chrono::{DateTime, Utc};
use sqlx::{types::Json, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::{
    domain::{EventKind, JobStatus, WebhookEventType},
    events::{JobEvent, StoredEvent},
    job::{ChatInput, EventData, JobError, JobOptions, JobResult, QueuedData},
    webhooks,
};

const COLUMNS: &str = "id, user_id, status, pattern, prompt, models, options, chat, result, error, attempts, \
                       created_at, started_at, finished_at, deadline_at, last_event_seq";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: JobStatus,
    pub pattern: String,
    pub prompt: String,
    pub models: Vec<String>,
    #[sqlx(json)]
    pub options: JobOptions,
    /// For a job submitted as a chat: its messages and sampling options.
    #[sqlx(json(nullable))]
    pub chat: Option<ChatInput>,
    #[sqlx(json(nullable))]
    pub result: Option<JobResult>,
    #[sqlx(json(nullable))]
    pub error: Option<JobError>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Past this the job fails `deadline_exceeded`.
    pub deadline_at: Option<DateTime<Utc>>,
    /// The sequence number of the job's newest event.
    pub last_event_seq: i64,
}

/// What a client asked for, validated.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub pattern: &'a str,
    pub prompt: &'a str,
    pub models: &'a [String],
    pub options: &'a JobOptions,
    pub chat: Option<&'a ChatInput>,
    /// The batch the job is a line of.
    pub batch_id: Option<Uuid>,
    /// Tokens reserved against the user's daily budget, and the day they count for.
    pub reserved_tokens: i64,
    pub reserved_day: Option<chrono::NaiveDate>,
    /// Seconds from now until the job's deadline.
    pub timeout_secs: u32,
}

/// Binds a new job's fields as `$1` to `$11`, in the order `submit` uses (tests that
/// write jobs in odd states bind them the same way).
pub fn bind_new_job<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    job: &NewJob<'q>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(job.id)
        .bind(job.user_id)
        .bind(job.pattern)
        .bind(job.prompt)
        .bind(job.models)
        .bind(Json(job.options))
        .bind(job.reserved_tokens)
        .bind(job.reserved_day)
        .bind(f64::from(job.timeout_secs))
        .bind(job.chat.map(Json))
        .bind(job.batch_id)
}

/// An accepted job as written: the job, its `queued` event and its outbox row.
pub struct Submitted {
    pub job: Job,
    pub queued: JobEvent,
    pub outbox_id: i64,
}

/// Accepts a job in one statement: the budget reservation (`reserved_tokens` for
/// `reserved_day`), the job, its `queued` event (seq 1) and its
/// outbox row (carrying `traceparent`). Run it in the transaction that holds the
/// user's lock and checked their standing.
pub async fn submit(
    conn: &mut PgConnection,
    job: &NewJob<'_>,
    traceparent: Option<&str>,
) -> Result<Submitted, sqlx::Error> {
    use sqlx::{FromRow, Row};
    let event = EventData::Queued(QueuedData::accepted(job.pattern, job.models));
    let sql = format!(
        "WITH reserved AS (
            INSERT INTO usage_daily (user_id, day, reserved, jobs) SELECT $2, $8, $7, 1 WHERE $8 IS NOT NULL
            ON CONFLICT (user_id, day) DO UPDATE
               SET reserved = usage_daily.reserved + EXCLUDED.reserved, jobs = usage_daily.jobs + 1
         ), job AS (
            INSERT INTO jobs (id, user_id, pattern, prompt, models, options, reserved_tokens, reserved_day,
                              deadline_at, chat, batch_id, last_event_seq)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9), $10, $11, 1)
            RETURNING {COLUMNS}
         ), queued AS (
            INSERT INTO job_events (job_id, seq, kind, data) VALUES ($1, 1, $12, $13)
            RETURNING seq, created_at
         ), outbox AS (
            -- Aged from the insert, not the transaction's start: see the relay.
            INSERT INTO outbox (job_id, attempt, traceparent, created_at) VALUES ($1, 1, $14, clock_timestamp())
            RETURNING id
         )
         SELECT job.*, queued.seq AS event_seq, queued.created_at AS event_created_at, outbox.id AS outbox_id
           FROM job, queued, outbox"
    );
    let row = bind_new_job(sqlx::query(&sql), job)
        .bind(EventKind::Queued)
        .bind(Json(&event))
        .bind(traceparent)
        .fetch_one(conn)
        .await?;
    let queued = JobEvent::new(job.id, row.try_get("event_seq")?, event, row.try_get("event_created_at")?);
    Ok(Submitted { job: Job::from_row(&row)?, queued, outbox_id: row.try_get("outbox_id")? })
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(ex).await
}

/// The job if `user_id` owns it. Someone else's job and a missing one look the same.
pub async fn get_owned(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 AND user_id = $2"))
        .bind(id)
        .bind(user_id)
        .fetch_optional(ex)
        .await
}

/// A batch's jobs.
pub async fn list_in_batch(ex: impl PgExecutor<'_>, batch_id: Uuid) -> Result<Vec<Job>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM jobs WHERE batch_id = $1")).bind(batch_id).fetch_all(ex).await
}

/// One page of a user's jobs, newest first; `before` is the last id of the previous page.
pub async fn list_owned(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    status: Option<JobStatus>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Job>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs
          WHERE user_id = $1 AND ($2::text IS NULL OR status = $2) AND ($3::uuid IS NULL OR id < $3)
          ORDER BY id DESC LIMIT $4"
    ))
    .bind(user_id)
    .bind(status)
    .bind(before)
    .bind(limit)
    .fetch_all(ex)
    .await
}

/// Why a delivery's job was not claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unclaimed {
    /// Terminal or unknown: the delivery is a duplicate.
    Finished,
    /// Another worker holds a live lease on it. Acking and dropping the delivery cannot
    /// strand the job, because a lease outlives its holder's run by at most `lease`:
    /// renewals extend only the jobs a worker is running now (`renew_leases`), and a
    /// worker that stops running one without ending it (its broker connection dropped,
    /// it shut down) releases the lease at once (`release_leases`). So the holder
    /// either ends the job or sends it back to `queued` with an outbox row (a retry),
    /// or the lease expires and the reaper (`reap_expired`, in every api) returns the
    /// job to `queued` with an outbox row, which the relay publishes.
    Leased,
}

/// Takes a job for a run with one atomic update: a `queued` job, or a `running` one
/// whose lease has expired (or is this worker's own: it stopped running it when its
/// broker connection dropped), becomes `running`, leased to `owner` for `lease`, with
/// one more attempt. On its first run the `started` event is appended in the same
/// statement. Returns the job and, on a first run, that event.
pub async fn claim(
    pool: &sqlx::PgPool,
    id: Uuid,
    owner: Uuid,
    lease: std::time::Duration,
) -> Result<Result<(Job, Option<JobEvent>), Unclaimed>, sqlx::Error> {
    use sqlx::{FromRow, Row};
    // In SET, `attempts` is the value before the update: 0 means this is the first run.
    let row = sqlx::query(&format!(
        "WITH claimed AS (
            UPDATE jobs SET status = 'running', attempts = attempts + 1,
                   started_at = coalesce(started_at, now()), updated_at = now(),
                   lease_owner = $2, lease_until = now() + make_interval(secs => $3),
                   last_event_seq = last_event_seq + CASE WHEN attempts = 0 THEN 1 ELSE 0 END
             WHERE id = $1
               AND (status = 'queued'
                    OR (status = 'running' AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $2)))
             RETURNING {COLUMNS}
         ), started AS (
            INSERT INTO job_events (job_id, seq, kind, data)
            SELECT id, last_event_seq, $4, jsonb_build_object('attempt', attempts) FROM claimed WHERE attempts = 1
            RETURNING seq, kind, data, created_at
         )
         SELECT claimed.*, started.seq AS event_seq, started.kind AS event_kind, started.data AS event_data,
                started.created_at AS event_created_at
           FROM claimed LEFT JOIN started ON true"
    ))
    .bind(id)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(EventKind::Started)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = row {
        let job = Job::from_row(&row)?;
        let started = match row.try_get::<Option<i64>, _>("event_seq")? {
            Some(seq) => Some(
                StoredEvent {
                    job_id: id,
                    seq,
                    kind: row.try_get("event_kind")?,
                    data: row.try_get("event_data")?,
                    created_at: row.try_get("event_created_at")?,
                }
                .decode()?,
            ),
            None => None,
        };
        return Ok(Ok((job, started)));
    }
    let status: Option<JobStatus> =
        sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1").bind(id).fetch_optional(pool).await?;
    Ok(Err(match status {
        Some(JobStatus::Running) => Unclaimed::Leased,
        _ => Unclaimed::Finished,
    }))
}

/// Extends `owner`'s leases on `ids`, the jobs it is running now — never on a job it
/// has stopped running (one aborted when its broker connection dropped, say), which
/// would then stay leased, and its redeliveries dropped, for as long as the worker
/// is busy. Returns the ids renewed: one missing is no longer `owner`'s (its lease
/// expired and the reaper or another worker took it, or it ended elsewhere), so its
/// run must stop. An expired lease nobody took is still `owner`'s, and renewed.
pub async fn renew_leases(
    ex: impl PgExecutor<'_>,
    owner: Uuid,
    ids: &[Uuid],
    lease: std::time::Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE jobs SET lease_until = now() + make_interval(secs => $3)
          WHERE id = ANY($2) AND lease_owner = $1 AND status = 'running'
          RETURNING id",
    )
    .bind(owner)
    .bind(ids)
    .bind(lease.as_secs_f64())
    .fetch_all(ex)
    .await
}

/// Ends every lease `owner` holds on a running job now, for a worker that runs none of
/// them any more (it aborted them when its broker connection dropped, or abandoned
/// them at shutdown): their messages go back to the queue, and the next delivery,
/// wherever it lands, claims the job at once instead of finding it leased. A job
/// whose delivery was dropped meanwhile (it came while the lease was still live) is
/// now expired, so the reaper's next pass requeues it. Returns the jobs released.
pub async fn release_leases(ex: impl PgExecutor<'_>, owner: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE jobs SET lease_until = now()
          WHERE lease_owner = $1 AND status = 'running' AND lease_until > now()
          RETURNING id",
    )
    .bind(owner)
    .fetch_all(ex)
    .await
}

/// Returns running jobs whose lease expired (their worker is gone, or released the
/// lease when it stopped running them) to the queue, with an outbox row each so the
/// relay publishes them. Returns their ids.
pub async fn reap_expired(conn: &mut PgConnection, limit: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH expired AS (
            SELECT id FROM jobs WHERE status = 'running' AND lease_until < now()
             ORDER BY lease_until LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED
         ), requeued AS (
            UPDATE jobs j SET status = 'queued', lease_owner = NULL, lease_until = NULL, updated_at = now()
              FROM expired WHERE j.id = expired.id RETURNING j.id, j.attempts
         ), published AS (
            INSERT INTO outbox (job_id, attempt) SELECT id, attempts + 1 FROM requeued RETURNING job_id
         )
         SELECT job_id FROM published",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Ends a job, in one statement: the terminal status, the budget settlement (the
/// reservation released, what the steps really used booked — exactly once, since only
/// the statement that ends the job does it) and the terminal event, which carries the
/// result or the error. `None` if the job had already ended: nothing is written.
pub async fn finish(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    status: JobStatus,
    result: Option<JobResult>,
    error: Option<JobError>,
) -> Result<Option<(Finished, JobEvent)>, sqlx::Error> {
    debug_assert!(status.is_terminal());
    let event = EventData::ended(status, result, error);
    let EventData::Ended(ended) = &event else { unreachable!("an ended event") };
    let webhooks = super::webhooks::insert_deliveries(
        "(SELECT * FROM finished WHERE batch_id IS NULL) f",
        "f.user_id",
        "$7",
        "$8",
        "f.webhook_url",
    );
    let webhook_type = WebhookEventType::of_job(status);
    let error_code = ended.error.as_ref().map(|e| e.code.as_str());
    let webhook_body = webhooks::job_body(id, status, error_code, Utc::now());
    let row: Option<FinishedRow> = sqlx::query_as(&format!(
        "WITH spent AS (
            -- Cached answers cost nothing: they count neither tokens nor money. What an
            -- earlier end of this job booked (a replayed dead letter's) is not booked again.
            SELECT coalesce(sum(coalesce(s.input_tokens, 0) + coalesce(s.output_tokens, 0))
                                FILTER (WHERE NOT s.cached), 0)::bigint AS tokens,
                   coalesce(sum(s.cost_micros), 0)::bigint AS cost,
                   (SELECT booked_tokens FROM jobs WHERE id = $1) AS booked_tokens,
                   (SELECT booked_cost_micros FROM jobs WHERE id = $1) AS booked_cost
              FROM job_steps s WHERE s.job_id = $1
         ), finished AS (
            UPDATE jobs SET status = $2, result = $3, error = $4, finished_at = now(), updated_at = now(),
                            last_event_seq = last_event_seq + 1,
                            booked_tokens = spent.tokens, booked_cost_micros = spent.cost
              FROM spent
             WHERE id = $1 AND status IN ('queued', 'running')
             RETURNING id, user_id, batch_id, options->>'webhook_url' AS webhook_url, pattern, created_at, finished_at,
                       reserved_day, reserved_tokens, last_event_seq,
                       greatest(spent.tokens - spent.booked_tokens, 0) AS new_tokens,
                       greatest(spent.cost - spent.booked_cost, 0) AS new_cost
         ), settled AS (
            UPDATE usage_daily u
               SET reserved = greatest(u.reserved - f.reserved_tokens, 0), used = u.used + f.new_tokens,
                   cost_micros = u.cost_micros + f.new_cost
              FROM finished f
             WHERE f.reserved_day IS NOT NULL AND u.user_id = f.user_id AND u.day = f.reserved_day
         ), event AS (
            INSERT INTO job_events (job_id, seq, kind, data)
            SELECT id, last_event_seq, $5, $6 FROM finished
            RETURNING seq, kind, data, created_at
         ), webhooks AS (
            -- The outbox of the job's webhooks: a batch's lines are told by their batch.
            {webhooks}
         )
         SELECT f.pattern, f.created_at, f.finished_at, e.seq, e.created_at AS event_created_at
           FROM finished f, event e"
    ))
    .bind(id)
    .bind(status)
    .bind(ended.result.as_ref().map(Json))
    .bind(ended.error.as_ref().map(Json))
    .bind(event.kind())
    .bind(Json(&event))
    .bind(webhook_type)
    .bind(webhook_body)
    .fetch_optional(ex)
    .await?;
    Ok(row.map(|row| {
        let finished = Finished { pattern: row.pattern, created_at: row.created_at, finished_at: row.finished_at };
        let event =
            JobEvent { job_id: id, seq: row.seq, kind: event.kind(), data: event, created_at: row.event_created_at };
        (finished, event)
    }))
}

#[derive(sqlx::FromRow)]
struct FinishedRow {
    pattern: String,
    created_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    seq: i64,
    event_created_at: DateTime<Utc>,
}

/// A job that has just ended: what its metrics need.
#[derive(Debug, Clone)]
pub struct Finished {
    pub pattern: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

impl Finished {
    /// Submit to terminal status.
    pub fn duration(&self) -> std::time::Duration {
        (self.finished_at - self.created_at).to_std().unwrap_or_default()
    }
}

/// Jobs waiting and running now, across every user (operations).
pub async fn active_counts(ex: impl PgExecutor<'_>) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running')
           FROM jobs WHERE status IN ('queued', 'running')",
    )
    .fetch_one(ex)
    .await
}

/// Jobs failed by a dead letter and not replayed.
pub async fn dead_lettered_count(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'failed' AND error->>'code' = 'dead_lettered'")
        .fetch_one(ex)
        .await
}

/// A job's status, locked for the caller's transaction (`FOR NO KEY UPDATE`, so the
/// foreign-key checks of concurrent step and event writes are not blocked).
pub async fn lock_status(conn: &mut PgConnection, id: Uuid) -> Result<Option<JobStatus>, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR NO KEY UPDATE").bind(id).fetch_optional(conn).await
}

/// Asks the worker running a job to stop it.
pub async fn request_cancel(ex: impl PgExecutor<'_>, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, now()) WHERE id = $1")
        .bind(id)
        .execute(ex)
        .await?;
    Ok(())
}

/// Which of `ids` someone asked to cancel.
pub async fn cancel_requested_among(ex: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM jobs WHERE id = ANY($1) AND cancel_requested_at IS NOT NULL")
        .bind(ids)
        .fetch_all(ex)
        .await
}

/// Whether someone asked to cancel the job.
pub async fn cancel_requested(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool, sqlx::Error> {
    let requested: Option<bool> = sqlx::query_scalar("SELECT cancel_requested_at IS NOT NULL FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(ex)
        .await?;
    Ok(requested.unwrap_or(false))
}

/// A dead-lettered job, for administrators.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: Uuid,
    pub user_id: Uuid,
    pub attempts: i32,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Jobs that failed because their message was dead-lettered, newest first.
pub async fn dead_letters(ex: impl PgExecutor<'_>, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, user_id, attempts, finished_at FROM jobs
          WHERE status = 'failed' AND error->>'code' = 'dead_lettered'
          ORDER BY finished_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(ex)
    .await
}

/// Puts a dead-lettered job back in the queue — the one way a terminal job changes,
/// and only by an administrator. Returns the job, or `None` if it is not dead-lettered.
pub async fn requeue_dead_letter(conn: &mut PgConnection, id: Uuid) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL, lease_owner = NULL,
                lease_until = NULL, reserved_day = (now() AT TIME ZONE 'utc')::date, updated_at = now()
          WHERE id = $1 AND status = 'failed' AND error->>'code' = 'dead_lettered'
          RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Sends a running job back to the queue for a retry: `queued`, lease released, and
/// an outbox row that publishes it through a delay queue — all in the caller's
/// transaction, so a crash cannot lose it.
pub async fn requeue_for_retry(
    conn: &mut PgConnection,
    id: Uuid,
    attempt: i32,
    delay_ms: i32,
    traceparent: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL, updated_at = now()
          WHERE id = $1 AND status = 'running'",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    super::outbox::insert_delayed(&mut *conn, id, attempt, delay_ms, traceparent).await?;
    Ok(())
}
