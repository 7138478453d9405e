//! Reading jobs: one job with its steps, the caller's jobs page by page, and a job's
//! events as Server-Sent Events. Another user's job answers exactly like a missing one.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::{
    db,
    domain::{ErrorCode, JobStatus, Stage, StepStatus},
    job::{JobError, JobResult, StepError, Usage},
};
use poem_openapi::{
    param::{Header, Path, Query},
    payload::Json,
    ApiResponse, Object, OpenApi,
};
use uuid::Uuid;

use crate::{
    auth::{ticket, BearerAuth, Credential},
    error::ApiError,
    problems::{Problems, ALWAYS, CONFLICT, MALFORMED, NOT_FOUND, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
    stream::{event_stream, frame::SseBody, stream_permit, views::StreamItemView},
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
    pub error: Option<StepError>,
}

/// A job with its steps and outcome.
#[derive(Debug, Object)]
pub struct JobView {
    #[oai(flatten)]
    pub summary: JobSummary,
    /// What was asked (for a chat, its transcript).
    pub prompt: String,
    /// Once succeeded: what the job yields.
    pub result: Option<JobResult>,
    pub steps: Vec<StepView>,
    /// Once failed or cancelled: why.
    pub error: Option<JobError>,
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
            prompt: std::mem::take(&mut job.prompt),
            result: job.result,
            steps: steps.into_iter().map(step_view).collect(),
            error: job.error,
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
        let jobs = db::jobs::list_owned(&self.state.pool, auth.0.user_id, status, before, i64::from(limit) + 1).await?;
        let (mut jobs, next_cursor) = super::paged(jobs, limit, |job| job.id);
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
                let error = JobError::new(ErrorCode::Cancelled, "cancelled before it started");
                let ended = db::jobs::finish(&mut *tx, job.id, JobStatus::Cancelled, None, Some(error)).await?;
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
        error: step.error,
    }
}
