//! The batch feeder: turns batch lines into jobs, a few at a time, and ends batches.
//! Runs in every api process; a batch is fed by one at a time (its row is locked,
//! other feeders skip it).
//!
//! **Decision — batch lines yield at admission, not in the broker.** A line becomes a
//! job only while (a) fewer interactive jobs wait in the queue than one worker's
//! slots (`ULTRA_WORKER_CONCURRENCY`), and batch lines (queued or running, every
//! batch together) hold at most `ULTRA_BATCH_SLOTS_PERCENT` of those slots (20: 3 of
//! 16), so a 50,000-line batch never stands in front of interactive work or takes its
//! workers, and (b) the user's
//! batch jobs in flight stay within half their tier's `concurrent_jobs` (at least
//! one), so one user's batch cannot hold the worker slots while others' wait, and
//! leaves the user room for interactive work. The
//! alternatives — RabbitMQ priorities (quorum queues have them only from 4.0; the
//! machine runs 3.10) or a second queue drained when the first is empty (every worker
//! then needs two consumers and a policy) — change the broker topology for what one
//! admission check does.
//!
//! A line is submitted with an idempotency key of its own (`batch:<id>:<line>`): if
//! the feeder dies between creating the job and recording it on the line, the next
//! pass finds the same job instead of running the line twice.

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    db::{self, batches::Batch},
    domain::{ErrorCode, JobStatus},
    job::JobError,
    patterns::PatternSpec,
    webhooks::RequestCounts,
};
use futures::StreamExt;
use poem_openapi::types::ToJSON;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    chat::{completion, failure, Answering},
    error,
    objects::{CompletionUsage, ErrorResponse},
    request::ChatRequest,
};
use crate::{
    error::ApiError,
    jobs::{self, Idempotency, Submission},
    state::AppState,
};

/// How often the feeder looks at the active batches.
const FEED_EVERY: Duration = Duration::from_millis(250);

pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut busy = false;
    loop {
        // A pass that admitted lines goes again at once: jobs end fast, and waiting
        // would leave worker slots empty.
        if !busy {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(FEED_EVERY) => {}
            }
        } else if shutdown.is_cancelled() {
            return;
        }
        busy = match feed(&state).await {
            Ok(admitted) => admitted > 0,
            Err(err) => {
                tracing::warn!(error = %err, "batch feeder pass failed; retrying");
                false
            }
        };
    }
}

/// One pass over every active batch this process can lock. Returns the lines admitted.
async fn feed(state: &Arc<AppState>) -> Result<usize, ApiError> {
    let (mut after, mut admitted) = (None, 0);
    loop {
        let mut tx = state.pool.begin().await?;
        let Some(batch) = db::batches::lock_next_active(&mut tx, after).await? else {
            return Ok(admitted);
        };
        after = Some(batch.id);
        admitted += advance(state, &mut tx, &batch).await?;
        tx.commit().await?;
    }
}

/// Moves one batch on: stops it if it was cancelled or expired, admits lines while
/// there is room, and ends it once nothing is pending or running (in `locked`, the
/// transaction holding the batch's row). Returns the lines admitted.
async fn advance(state: &Arc<AppState>, locked: &mut PgConnection, batch: &Batch) -> Result<usize, ApiError> {
    let expired = batch.status == "in_progress" && chrono::Utc::now() > batch.expires_at;
    let cancelling = batch.status == "cancelling";
    if cancelling || expired {
        stop(state, batch, stop_code(if expired { "expired" } else { "cancelled" })).await?;
    }
    let (in_flight, pending) = db::batches::progress(&state.pool, batch.id).await?;
    if in_flight == 0 && pending == 0 {
        let status = if cancelling {
            "cancelled"
        } else if expired {
            "expired"
        } else {
            "completed"
        };
        finalize(state, locked, batch, status).await?;
        return Ok(0);
    }
    if cancelling || expired || pending == 0 {
        return Ok(0);
    }
    let Some(user) = db::users::get(&state.pool, batch.user_id).await? else { return Ok(0) };
    let tier = state.tiers.for_user(&user.tier);
    let share = i64::from((tier.concurrent_jobs / 2).max(1));
    // Interactive work first: no line is admitted while it waits, and batch lines
    // hold at most `ULTRA_BATCH_SLOTS_PERCENT` of one worker's slots, so an
    // interactive job that comes next finds a slot, little ahead of it, and CPU to spare.
    let slots = i64::from(state.config.concurrency);
    // The share is the user's, across all their batches.
    let load = db::batches::load(&state.pool, batch.user_id).await?;
    let room = (share - load.users_lines).min(state.config.batch_slots() - load.batch_lines);
    if room <= 0 || load.interactive_queued >= slots {
        return Ok(0);
    }
    // A few at once: each submission waits on the user's row lock for only part of
    // its round trips, so the rest overlap.
    let lines = db::batches::pending(&state.pool, batch.id, room).await?;
    let mut admissions = futures::stream::iter(lines)
        .map(|line| admit(state, batch, &user.tier, line))
        .buffer_unordered(ADMISSIONS_AT_ONCE);
    let mut admitted = 0;
    while let Some(taken) = admissions.next().await {
        // No room for another job now: the rest wait for the next pass.
        if !taken? {
            break;
        }
        admitted += 1;
    }
    Ok(admitted)
}

/// Lines submitted at once by one feeder pass.
const ADMISSIONS_AT_ONCE: usize = 8;

/// Submits one line as a job. False when the user has no room for another job now
/// (the line waits for the next pass).
async fn admit(
    state: &Arc<AppState>,
    batch: &Batch,
    tier: &str,
    line: db::batches::PendingLine,
) -> Result<bool, ApiError> {
    let refuse = |err: &ApiError| {
        tracing::info!(batch_id = %batch.id, line = line.line, error = %err, "batch line refused");
        let (status, body) = error::of_api_error(err);
        json!({ "status_code": status.as_u16(), "body": body.to_value() })
    };
    let request = match ChatRequest::deserialize(&line.body) {
        Ok(request) => request,
        Err(err) => {
            let error = refuse(&ApiError::field("body", err.to_string()));
            db::batches::refused(&state.pool, batch.id, line.line, &error).await?;
            return Ok(true);
        }
    };
    let planned = match request.plan(state, tier) {
        Ok(planned) => planned,
        Err(refusal) => {
            let err = match refusal {
                super::request::Refusal::Invalid(err) => err,
                super::request::Refusal::UnknownModel(model) => {
                    ApiError::field("model", format!("the model `{model}` does not exist"))
                }
            };
            db::batches::refused(&state.pool, batch.id, line.line, &refuse(&err)).await?;
            return Ok(true);
        }
    };
    let key = format!("batch:{}:{}", batch.id, line.line);
    let submission = Submission {
        user_id: batch.user_id,
        tier,
        prompt: &planned.prompt,
        models: &planned.models,
        pattern: (&planned.pattern, &planned.spec),
        options: planned.options,
        chat: Some(planned.chat),
        batch_id: Some(batch.id),
        idempotency: Some(Idempotency::new(&key, &line.body)),
        traceparent: &common::trace::TraceContext::root().to_string(),
    };
    match jobs::submit(state, submission).await {
        Ok(job) => {
            db::batches::admitted(&state.pool, batch.id, line.line, job.id).await?;
            Ok(true)
        }
        // Room frees as the user's jobs end.
        Err(ApiError::TooManyJobs(_)) => Ok(false),
        Err(err @ (ApiError::Unavailable(_) | ApiError::Internal(_))) => Err(err),
        Err(err) => {
            db::batches::refused(&state.pool, batch.id, line.line, &refuse(&err)).await?;
            Ok(true)
        }
    }
}

/// A cancelled or expired batch: its pending lines never run, its queued jobs are
/// cancelled; running ones finish.
async fn stop(state: &AppState, batch: &Batch, code: &str) -> Result<(), ApiError> {
    let body = stopped(code);
    let message = body.error.message.clone();
    db::batches::refuse_pending(&state.pool, batch.id, &json!({ "status_code": 400, "body": body.to_value() })).await?;
    for job_id in db::batches::queued_jobs(&state.pool, batch.id).await? {
        // Locked and read again: a worker may have claimed it since, and a running
        // line finishes.
        let mut tx = state.pool.begin().await?;
        if db::jobs::lock_status(&mut tx, job_id).await? != Some(JobStatus::Queued) {
            continue;
        }
        let error = JobError::new(ErrorCode::Cancelled, message.as_str());
        let ended = db::jobs::finish(&mut *tx, job_id, JobStatus::Cancelled, None, Some(error)).await?;
        tx.commit().await?;
        if let Some((finished, event)) = ended {
            state.events.publish(&event).await;
            common::metrics::job_finished(&finished, JobStatus::Cancelled);
        }
    }
    Ok(())
}

/// The error a request gets when its batch ended before it ran (`code`:
/// `batch_cancelled` or `batch_expired`).
fn stopped(code: &str) -> ErrorResponse {
    let message = if code == "batch_expired" {
        "the batch expired before this request ran"
    } else {
        "the batch was cancelled before this request ran"
    };
    ErrorResponse::new(message, "invalid_request_error", None, Some(code))
}

/// The code of a batch that ends with `status` before all its requests ran.
fn stop_code(status: &str) -> &'static str {
    if status == "expired" {
        "batch_expired"
    } else {
        "batch_cancelled"
    }
}

/// Writes the output file (one line per request that succeeded) and the error file
/// (one per request that did not), and ends the batch with `status`.
async fn finalize(state: &AppState, locked: &mut PgConnection, batch: &Batch, status: &str) -> Result<(), ApiError> {
    let lines = db::batches::finished_lines(&state.pool, batch.id).await?;
    let jobs: HashMap<Uuid, db::jobs::Job> =
        db::jobs::list_in_batch(&state.pool, batch.id).await?.into_iter().map(|j| (j.id, j)).collect();
    let (mut output, mut errors) = (String::new(), String::new());
    let mut counts = RequestCounts { total: i64::from(batch.total), completed: 0, failed: 0 };
    let no_pattern = PatternSpec::default();
    for line in &lines {
        let job = line.job_id.and_then(|id| jobs.get(&id));
        let (status_code, body, request_id) = match (job, &line.error) {
            (Some(job), _) => match (&job.result, job.status) {
                (Some(result), JobStatus::Succeeded) => {
                    let model = line.body["model"].as_str().unwrap_or_default();
                    let spec = state.patterns.get(&job.pattern).unwrap_or(&no_pattern);
                    let answering = Answering::of(spec, &job.models, model);
                    let usage = CompletionUsage::new(line.input_tokens, line.output_tokens);
                    (200, completion(job, &answering, result, usage).to_json().unwrap_or_default(), Some(job.id))
                }
                // Cancelled by the batch's end while it waited: said as for the lines
                // that never became jobs.
                (_, JobStatus::Cancelled) if status != "completed" => {
                    (400, stopped(stop_code(status)).to_value(), Some(job.id))
                }
                _ => {
                    let (status, body) = failure(job.error.as_ref());
                    (status.as_u16(), body.to_value(), Some(job.id))
                }
            },
            (None, Some(error)) => (error["status_code"].as_u64().unwrap_or(400) as u16, error["body"].clone(), None),
            (None, None) => continue,
        };
        let record = json!({
            "id": format!("batch_req_{}_{}", batch.id.simple(), line.line),
            "custom_id": line.custom_id,
            "response": { "status_code": status_code, "request_id": request_id, "body": body },
            "error": Value::Null,
        });
        *(if status_code == 200 { &mut counts.completed } else { &mut counts.failed }) += 1;
        let file = if status_code == 200 { &mut output } else { &mut errors };
        file.push_str(&record.to_string());
        file.push('\n');
    }
    // In the batch's own transaction: the files and the end commit together.
    let mut store = async |name: &str, content: &str| -> Result<Option<Uuid>, sqlx::Error> {
        if content.is_empty() {
            return Ok(None);
        }
        let filename = format!("batch_{}_{name}.jsonl", batch.id);
        Ok(Some(
            db::files::insert(&mut *locked, batch.user_id, "batch_output", &filename, content.as_bytes()).await?.id,
        ))
    };
    let output_file = store("output", &output).await?;
    let error_file = store("error", &errors).await?;
    db::batches::finish(&mut *locked, batch.id, status, (output_file, error_file), counts).await?;
    tracing::info!(batch_id = %batch.id, status, lines = lines.len(), "batch ended");
    Ok(())
}
