//! Reading jobs: one job with its steps, the caller's jobs page by page, and a job's
//! events as Server-Sent Events. Another user's job answers exactly like a missing one.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use common::{
    db,
    domain::{EventKind, JobStatus, Stage, StepStatus},
};
use futures::StreamExt;
use poem_openapi::{
    param::{Header, Path, Query},
    payload::Json,
    types::ToJSON,
    ApiResponse, Object, OpenApi, Union,
};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    auth::{ticket, BearerAuth, Credential, Principal},
    error::ApiError,
    problems::{Problems, ALWAYS, CONFLICT, MALFORMED, NOT_FOUND, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
    stream::{
        frame::{self, SseBody},
        limit::StreamPermit,
        JobEventStream, Partials, Sources, StreamItem,
    },
};

/// Largest page of `GET /v1/jobs`.
const MAX_PAGE: u32 = 100;

#[derive(Debug, Clone, Object)]
pub struct JobLinks {
    /// This job: `GET` it to poll.
    #[oai(rename = "self")]
    pub self_: String,
    /// Its Server-Sent Events stream.
    pub events: String,
}

impl JobLinks {
    pub fn for_job(id: Uuid) -> Self {
        Self { self_: format!("/v1/jobs/{id}"), events: format!("/v1/jobs/{id}/events") }
    }
}

#[derive(Debug, Object)]
pub struct Usage {
    pub input_tokens: i32,
    pub output_tokens: i32,
}

/// A stable code and a human message.
#[derive(Debug, Object)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
    /// For a failed step: whether the same call may succeed later.
    #[oai(skip_serializing_if_is_none)]
    pub retryable: Option<bool>,
    /// For a failed job: each model that failed, at which stage, and why.
    #[oai(skip_serializing_if_is_none)]
    pub failures: Option<Value>,
    /// For a failed step: the errors of its last runs (`attempt`, `code`, `message`),
    /// oldest first, so a final `circuit_open` still shows what opened the circuit.
    #[oai(skip_serializing_if_is_none)]
    pub attempts: Option<Value>,
}

impl ErrorInfo {
    fn from_json(value: &Value) -> Self {
        let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
        Self {
            code: text("code"),
            message: text("message"),
            retryable: value.get("retryable").and_then(Value::as_bool),
            failures: value.get("failures").cloned(),
            attempts: value.get("attempts").cloned(),
        }
    }
}

/// One provider call of a job.
#[derive(Debug, Object)]
pub struct StepView {
    pub stage: Stage,
    pub model: String,
    pub status: StepStatus,
    pub output: Option<String>,
    pub usage: Option<Usage>,
    /// What the call cost, in US dollars, at the catalog's prices.
    pub cost_usd: f64,
    /// Whether the answer came from the response cache (and so cost nothing).
    pub cached: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<ErrorInfo>,
}

/// A job with its steps and outcome.
#[derive(Debug, Object)]
pub struct JobView {
    #[oai(flatten)]
    pub summary: JobSummary,
    /// Once succeeded: `answers` (each model's output) and `failures` (models that failed).
    pub result: Option<Value>,
    pub steps: Vec<StepView>,
    /// Once failed: why.
    pub error: Option<ErrorInfo>,
    /// Tokens of all the job's provider calls so far (cached answers excluded).
    pub usage: Usage,
    /// What the job's calls cost so far, in US dollars.
    pub cost_usd: f64,
}

/// A job in a list (without its steps).
#[derive(Debug, Object)]
pub struct JobSummary {
    pub id: Uuid,
    pub status: JobStatus,
    pub pattern: String,
    pub models: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub links: JobLinks,
}

impl JobSummary {
    /// Takes what a summary shows; the caller keeps the rest of the job.
    fn of(job: &mut db::jobs::Job) -> Self {
        Self {
            id: job.id,
            status: job.status,
            pattern: std::mem::take(&mut job.pattern),
            models: std::mem::take(&mut job.models),
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            links: JobLinks::for_job(job.id),
        }
    }
}

#[derive(Debug, Object)]
pub struct JobPage {
    /// Newest first.
    pub jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A job event as streamed: the SSE `id:` is `seq`, `event:` is `kind`.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct EventView {
    pub job_id: Uuid,
    pub seq: i64,
    pub kind: String,
    pub data: Value,
    pub created_at: DateTime<Utc>,
}

impl poem_openapi::types::Example for EventView {
    fn example() -> Self {
        Self {
            job_id: Uuid::from_u128(0x0190_1234_5678_7abc_8def_0123_4567_89ab),
            seq: 5,
            kind: "step.completed".to_owned(),
            data: serde_json::json!({
                "stage": "initial", "model": "mock/alpha", "output": "[mock/alpha] …",
                "usage": { "input_tokens": 5, "output_tokens": 16 },
            }),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }
}

/// A piece of a running step's answer (SSE `event: token`, no `id:`: live only).
#[derive(Debug, Clone, Object)]
pub struct TokenView {
    pub job_id: Uuid,
    pub stage: Stage,
    pub model: String,
    /// The new text.
    pub delta: String,
    /// Byte offset of `delta` in the step's text.
    pub index: u64,
}

/// A running step's text so far, sent to a client that joins mid-step (SSE
/// `event: snapshot`); the `token` events after it continue from its end.
#[derive(Debug, Clone, Object)]
pub struct SnapshotView {
    pub job_id: Uuid,
    pub stage: Stage,
    pub model: String,
    pub text: String,
}

/// The reconnection delay the stream asks for (sent once, as SSE `retry:`).
#[derive(Debug, Clone, Object)]
pub struct RetryView {
    pub retry_ms: u64,
}

/// What an event stream carries.
#[derive(Debug, Clone, Union)]
pub enum StreamItemView {
    Event(EventView),
    Token(TokenView),
    Snapshot(SnapshotView),
    Retry(RetryView),
}

/// The SSE frame of a stream item. Lifecycle events and tokens come rendered (once for
/// every stream); a snapshot is one stream's own.
fn frame_of(job_id: Uuid, item: StreamItem) -> Bytes {
    match item {
        StreamItem::Event(event) => event.frame.clone(),
        StreamItem::Token(token) => token.frame.clone(),
        StreamItem::Snapshot { stage, model, text } => {
            frame::frame(None, "snapshot", &SnapshotView { job_id, stage, model, text }.to_json_string())
        }
    }
}

pub struct JobsApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Jobs")]
impl JobsApi {
    /// Get a job
    ///
    /// The job's status, its steps so far and, once finished, its result or error.
    #[oai(path = "/jobs/:id", method = "get", operation_id = "get_job")]
    async fn get_job(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<Json<JobView>, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        let mut job = self.owned_job(&auth, id.0).await?;
        let steps = db::steps::list(&self.state.pool, job.id).await?;
        let paid = steps.iter().filter(|s| !s.cached);
        let usage = paid.fold(Usage { input_tokens: 0, output_tokens: 0 }, |sum, s| Usage {
            input_tokens: sum.input_tokens + s.input_tokens.unwrap_or(0),
            output_tokens: sum.output_tokens + s.output_tokens.unwrap_or(0),
        });
        let cost_usd = steps.iter().map(|s| s.cost_micros).sum::<i64>() as f64 / 1e6;
        Ok(Json(JobView {
            summary: JobSummary::of(&mut job),
            result: job.result,
            steps: steps.into_iter().map(step_view).collect(),
            error: job.error.as_ref().map(ErrorInfo::from_json),
            usage,
            cost_usd,
        }))
    }

    /// List jobs
    ///
    /// The caller's jobs, newest first, optionally filtered by status.
    #[oai(path = "/jobs", method = "get", operation_id = "list_jobs")]
    async fn list_jobs(
        &self,
        auth: BearerAuth,
        /// Only jobs with this status.
        status: Query<Option<JobStatus>>,
        /// Page size (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<Uuid>>,
    ) -> Result<Json<JobPage>, Problems<{ ALWAYS | UNAUTHORIZED | MALFORMED }>> {
        let status = status.0;
        let limit = limit.0.unwrap_or(20).min(MAX_PAGE);
        let before = cursor.0;
        // One row more than asked tells whether another page exists.
        let mut jobs =
            db::jobs::list_owned(&self.state.pool, auth.0.user_id, status, before, i64::from(limit) + 1).await?;
        let more = jobs.len() > limit as usize;
        jobs.truncate(limit as usize);
        let next_cursor = more.then(|| jobs.last().map(|j| j.id.to_string())).flatten();
        let jobs = jobs.iter_mut().map(JobSummary::of).collect();
        Ok(Json(JobPage { jobs, next_cursor }))
    }

    /// Cancel a job
    ///
    /// A queued job is cancelled at once and never starts (200). A running job's
    /// worker is asked to stop: its in-flight provider calls are aborted within about a
    /// second and the job ends `cancelled`, keeping the steps already done (202;
    /// follow its events). A job that has already ended answers 409. Owner or admin.
    #[oai(path = "/jobs/:id/cancel", method = "post", operation_id = "cancel_job")]
    async fn cancel_job(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<CancelResponse, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND | CONFLICT }>> {
        let state = &self.state;
        let job = match auth.0.is_admin() {
            true => db::jobs::get(&state.pool, id.0).await?.ok_or(ApiError::NotFound("job not found"))?,
            false => self.owned_job(&auth, id.0).await?,
        };
        let mut tx = state.pool.begin().await?;
        let status = db::jobs::lock_status(&mut tx, job.id).await?.ok_or(ApiError::NotFound("job not found"))?;
        let view = |status: JobStatus| CancelView { id: job.id, status, links: JobLinks::for_job(job.id) };
        match status {
            status if status.is_terminal() => {
                Err(ApiError::Conflict(format!("the job has already ended ({status})")).into())
            }
            JobStatus::Queued => {
                let error = json!({ "code": "cancelled", "message": "cancelled before it started" });
                let data = json!({ "status": "cancelled", "error": error });
                let ended = db::jobs::finish(
                    &mut *tx,
                    job.id,
                    JobStatus::Cancelled,
                    None,
                    Some(&error),
                    EventKind::Cancelled,
                    data,
                )
                .await?;
                tx.commit().await?;
                if let Some((finished, event)) = ended {
                    state.events.publish(&event).await;
                    common::metrics::job_finished(&finished, JobStatus::Cancelled);
                }
                tracing::info!(job_id = %job.id, "queued job cancelled");
                Ok(CancelResponse::Cancelled(Json(view(JobStatus::Cancelled))))
            }
            _ => {
                db::jobs::request_cancel(&mut *tx, job.id).await?;
                tx.commit().await?;
                tracing::info!(job_id = %job.id, "cancellation requested for a running job");
                Ok(CancelResponse::Cancelling(Json(view(status))))
            }
        }
    }

    /// Get a stream ticket
    ///
    /// For browsers: `EventSource` cannot send an `Authorization` header, and a
    /// long-lived token must never go in a URL. The ticket must be used within 60 s
    /// and is good for this job's event stream only; once used it stays good for
    /// reconnections until the job's deadline plus 60 s, so an `EventSource` resumes.
    #[oai(path = "/jobs/:id/stream-ticket", method = "post", operation_id = "stream_ticket")]
    async fn stream_ticket(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<Json<StreamTicket>, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        let job = self.owned_job(&auth, id.0).await?;
        let state = &self.state;
        let ticket = ticket::issue(&state.redis, &state.config.redis_prefix, auth.0.user_id, job.id)
            .await
            .map_err(|e| ApiError::Unavailable(Box::new(e)))?;
        let url = format!("/v1/jobs/{}/events?ticket={ticket}", job.id);
        Ok(Json(StreamTicket { ticket, expires_in: ticket::TICKET_TTL.as_secs(), url }))
    }

    /// Stream a job's events
    ///
    /// Server-Sent Events: `id:` is the event's sequence number (1, 2, 3, … without
    /// gaps), `event:` its kind, `data:` the event as JSON. Reconnect with
    /// `Last-Event-ID` to resume after that event with nothing missed or repeated.
    /// While models answer, `token` events (no `id:`, live only) carry their text as
    /// it streams; a client joining mid-step first gets a `snapshot` of each running
    /// step. A comment line is sent as a heartbeat; the stream ends after the terminal
    /// event, or after `ULTRA_SSE_IDLE_SECS` with nothing to send.
    #[oai(path = "/jobs/:id/events", method = "get", operation_id = "job_events")]
    async fn job_events(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Resume after this sequence number.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
        /// A stream ticket from `POST /v1/jobs/{id}/stream-ticket`, for browsers'
        /// `EventSource` (which cannot send `Authorization`).
        ticket: Query<Option<String>>,
    ) -> Result<EventsResponse, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND | MALFORMED }>> {
        if matches!(auth.0.credential, Credential::StreamTicket(job) if job != id.0) {
            return Err(ApiError::NotFound("job not found").into());
        }
        let after = match last_event_id.0.as_deref().map(str::trim) {
            None | Some("") => 0,
            Some(raw) => raw.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::BadRequest("invalid header `Last-Event-ID`: expected an event sequence number".into())
            })?,
        };
        let state = &self.state;
        let job = self.owned_job(&auth, id.0).await?;
        // No client can have seen an event the job has not had.
        let after = after.min(job.last_event_seq);
        if let (Credential::StreamTicket(_), Some(ticket)) = (&auth.0.credential, &ticket.0) {
            ticket::keep_for_reconnects(&state.redis, &state.config.redis_prefix, ticket, job.deadline_at).await;
        }
        let ended = job.status.is_terminal();
        if ended && db::events::after(&state.pool, job.id, after, 1).await?.is_empty() {
            return Ok(EventsResponse::Ended);
        }
        let permit = stream_permit(state, &auth.0)?;
        Ok(EventsResponse::Stream(event_stream(state, permit, job.id, after, ended)))
    }
}

#[derive(ApiResponse)]
pub enum EventsResponse {
    /// The job's events after `Last-Event-ID`, as they happen.
    #[oai(status = 200)]
    Stream(SseBody<StreamItemView>),
    /// The client has the job's terminal event already: there is nothing more to
    /// send (an `EventSource` stops reconnecting on this answer).
    #[oai(status = 204)]
    Ended,
}

/// The SSE response for one job's events after `after`: a `retry:` hint first, then
/// the stream, with heartbeats while it is quiet.
pub fn event_stream(
    state: &AppState,
    permit: StreamPermit,
    job_id: Uuid,
    after: i64,
    job_ended: bool,
) -> SseBody<StreamItemView> {
    let sources = Sources {
        pool: state.pool.clone(),
        hub: state.hub.clone(),
        partials: Partials { redis: state.redis.clone(), prefix: state.config.redis_prefix.clone() },
        shutdown: state.shutdown.clone(),
        idle_limit: state.config.sse_idle(),
    };
    let stream = JobEventStream::new(sources, job_id, after, job_ended);
    let retry = futures::stream::once(async { frame::retry(RECONNECT_AFTER) });
    // The permit lives as long as the stream, which ends when it is done, idle, or its
    // client is found gone (at the next write).
    let items = retry
        .chain(stream.into_stream().map(move |item| {
            let _open = &permit;
            frame_of(job_id, item)
        }))
        .boxed();
    let heartbeat = Duration::from_secs(state.config.sse_heartbeat_secs.max(1));
    SseBody::new(items, heartbeat)
}

/// A slot for one more open stream of this caller, within their tier's limit.
pub fn stream_permit(state: &AppState, principal: &Principal) -> Result<StreamPermit, ApiError> {
    let limit = state.tiers.for_user(&principal.tier).concurrent_streams;
    state.streams.acquire(principal.user_id, limit).ok_or_else(|| {
        ApiError::TooManyStreams(format!("{limit} event streams are open; close one or wait for a job to end"))
    })
}

/// How long a disconnected `EventSource` waits before reconnecting (SSE `retry:`).
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Object)]
pub struct CancelView {
    pub id: Uuid,
    /// `cancelled`, or `running` while the worker stops it.
    pub status: JobStatus,
    pub links: JobLinks,
}

#[derive(ApiResponse)]
pub enum CancelResponse {
    /// The job was queued and is now cancelled.
    #[oai(status = 200)]
    Cancelled(Json<CancelView>),
    /// The job is running; its worker is stopping it.
    #[oai(status = 202)]
    Cancelling(Json<CancelView>),
}

/// A ticket to open one job's event stream without an `Authorization` header.
#[derive(Debug, Object)]
pub struct StreamTicket {
    pub ticket: String,
    /// Seconds the ticket has to be used in (it then stays good for reconnections).
    pub expires_in: u64,
    /// The stream URL with the ticket, for `new EventSource(url)`.
    pub url: String,
}

impl JobsApi {
    async fn owned_job(&self, auth: &BearerAuth, id: Uuid) -> Result<db::jobs::Job, ApiError> {
        db::jobs::get_owned(&self.state.pool, id, auth.0.user_id).await?.ok_or(ApiError::NotFound("job not found"))
    }
}

fn step_view(step: db::steps::Step) -> StepView {
    let usage = match (step.input_tokens, step.output_tokens) {
        (Some(input_tokens), Some(output_tokens)) => Some(Usage { input_tokens, output_tokens }),
        _ => None,
    };
    StepView {
        stage: step.stage,
        model: step.model,
        status: step.status,
        output: step.output,
        usage,
        cost_usd: step.cost_micros as f64 / 1e6,
        cached: step.cached,
        started_at: step.started_at,
        finished_at: step.finished_at,
        error: step.error.as_ref().map(ErrorInfo::from_json),
    }
}
