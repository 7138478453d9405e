//! Running one job. Every provider call is a step `(job, stage, model)` committed as
//! it finishes, so a redelivered job skips what is done; the terminal status, result
//! and event commit together, and the delivery is acked only after that commit.
//!
//! The `direct` pattern runs one stage: every model answers the prompt, concurrently.

mod stages;
mod step;
pub mod tokens;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    catalog::Catalog,
    db::{self, steps::Step},
    domain::{ErrorCode, JobStatus, Stage},
    events::EventPublisher,
    job::{EventData, JobError, JobResult, QueuedData},
    trace::TraceContext,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::stages::{Stages, StagesOutcome};
use crate::providers::Providers;

/// What a job run needs, shared by every delivery of a worker process.
pub struct JobContext {
    pub pool: PgPool,
    pub events: EventPublisher,
    pub providers: Providers,
    pub catalog: Catalog,
    pub cache: crate::cache::ResponseCache,
    pub patterns: common::patterns::Patterns,
    /// Runs of a job before transient failures are final.
    pub max_attempts: u32,
    /// The quorum of a stage when a job sets none.
    pub default_min_models: u32,
    /// This process, as the owner of its leases.
    pub worker_id: Uuid,
    /// Jobs this process is running now.
    pub running: RunningJobs,
    /// `ULTRA_LOG_PROMPTS`: each step's prompt at debug level (user data, so opt-in).
    pub log_prompts: bool,
}

/// The jobs one worker process is running, each with the tokens that stop it: a
/// duplicate delivery of one of them is dropped rather than run twice at once, and one
/// watcher (`watch`) serves them all.
#[derive(Default)]
pub struct RunningJobs {
    jobs: std::sync::Mutex<HashMap<Uuid, Running>>,
    /// Held by a renewal from reading the running jobs to its update, and by a release
    /// (`release_leases`): a renewal that read jobs which have stopped since cannot
    /// extend their leases after the release.
    renewals: tokio::sync::Mutex<()>,
}

/// One job running here.
struct Running {
    /// Cancelled on a cancellation request: the job ends `cancelled`.
    cancel: CancellationToken,
    /// Cancelled when a renewal finds the lease is no longer ours: the run is dropped
    /// and writes nothing more (another worker has the job, or it ended elsewhere).
    lease_lost: CancellationToken,
    /// Whether its claim succeeded: only then is there a lease to renew (a job is
    /// entered before its claim, so two deliveries here cannot both claim it).
    claimed: bool,
}

/// Marks a job running here until dropped (also when its task is aborted).
pub struct RunningGuard<'a> {
    jobs: &'a RunningJobs,
    job_id: Uuid,
}

impl RunningJobs {
    pub fn enter(
        &self,
        job_id: Uuid,
        cancel: CancellationToken,
        lease_lost: CancellationToken,
    ) -> Option<RunningGuard<'_>> {
        let mut jobs = self.lock();
        if jobs.contains_key(&job_id) {
            return None;
        }
        jobs.insert(job_id, Running { cancel, lease_lost, claimed: false });
        Some(RunningGuard { jobs: self, job_id })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ids(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    /// The claimed jobs, each with the token that drops its run if its lease is lost.
    fn leased(&self) -> Vec<(Uuid, CancellationToken)> {
        self.lock().iter().filter(|(_, job)| job.claimed).map(|(id, job)| (*id, job.lease_lost.clone())).collect()
    }

    fn cancel(&self, job_id: Uuid) {
        if let Some(job) = self.lock().get(&job_id) {
            job.cancel.cancel();
        }
    }
}

impl RunningGuard<'_> {
    /// The claim succeeded: from now on the watcher renews the job's lease.
    pub fn claimed(&self) {
        if let Some(job) = self.jobs.lock().get_mut(&self.job_id) {
            job.claimed = true;
        }
    }
}

/// Watches this process's running jobs with one query per interval, whatever their
/// number: cancellation requests (within `CANCEL_POLL`) and lease renewals (every third
/// of `LEASE`). Runs until `shutdown`.
pub async fn watch(ctx: Arc<JobContext>, shutdown: CancellationToken) {
    let mut last_renewal = tokio::time::Instant::now();
    let mut renewed_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CANCEL_POLL) => {}
        }
        let ids = ctx.running.ids();
        if ids.is_empty() {
            continue;
        }
        match db::jobs::cancel_requested_among(&ctx.pool, &ids).await {
            Ok(cancelled) => {
                for job_id in cancelled {
                    tracing::info!(%job_id, "cancellation requested; aborting provider calls");
                    ctx.running.cancel(job_id);
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot check for cancellations; retrying"),
        }
        if last_renewal.elapsed() >= LEASE / 3 {
            last_renewal = tokio::time::Instant::now();
            if renew_leases(&ctx).await {
                renewed_at = last_renewal;
            } else if renewed_at.elapsed() >= LEASE {
                // Our leases have expired by now: another worker may be running these
                // jobs. Stop paying for their calls here.
                tracing::warn!("leases not renewed for a whole lease; dropping every run");
                for (_, lease_lost) in ctx.running.leased() {
                    lease_lost.cancel();
                }
            }
        }
    }
}

/// Renews the leases of the jobs this process is running — only those: a job it
/// stopped running must not stay leased (see `db::jobs::renew_leases`). A claimed job
/// whose lease was not renewed is no longer ours, so its run is dropped at once,
/// writing nothing more: another worker has it, or it ended elsewhere.
/// Returns whether the database answered.
async fn renew_leases(ctx: &JobContext) -> bool {
    let _renewal = ctx.running.renewals.lock().await;
    let leased = ctx.running.leased();
    if leased.is_empty() {
        return true;
    }
    let ids: Vec<Uuid> = leased.iter().map(|(id, _)| *id).collect();
    let renewed = match db::jobs::renew_leases(&ctx.pool, ctx.worker_id, &ids, LEASE).await {
        Ok(renewed) => renewed,
        Err(err) => {
            tracing::warn!(error = %err, "cannot renew leases; retrying");
            return false;
        }
    };
    // A job that ended since it was read is missing too; dropping its finished run is harmless.
    for (job_id, lease_lost) in leased {
        if !renewed.contains(&job_id) {
            tracing::warn!(%job_id, "lease lost: the job is no longer this worker's; dropping its run");
            lease_lost.cancel();
        }
    }
    true
}

/// Ends every lease this process holds (see `db::jobs::release_leases`), so the
/// redeliveries of the jobs it abandoned are claimed at once. Only for the process's
/// one consumer, once every job it ran has stopped: then no run here uses a lease.
/// Under the renewal lock, so a renewal that read those jobs before they stopped
/// cannot extend their leases afterwards. Returns the jobs released.
pub async fn release_leases(ctx: &JobContext) -> Result<Vec<Uuid>, sqlx::Error> {
    let _renewals = ctx.running.renewals.lock().await;
    db::jobs::release_leases(&ctx.pool, ctx.worker_id).await
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.job_id);
    }
}

/// What happened to a delivery's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job reached this terminal status now.
    Finished(JobStatus),
    /// A transient failure: the job is queued again for a later run.
    Retried,
    /// Already terminal, or unknown: a duplicate delivery; nothing was done.
    Skipped,
    /// The job's lease passed to another worker (or the job ended elsewhere, or was
    /// requeued by the reaper) while it ran here: the run was dropped mid-way, writing
    /// nothing more. The delivery is requeued; the job goes on wherever it is now.
    LeaseLost,
}

/// Failures of infrastructure (not of providers): the delivery must be retried.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl PipelineError {
    /// A row that does not fit its type: no retry will read it.
    pub fn is_undecodable(&self) -> bool {
        matches!(self, PipelineError::Database(sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. }))
    }
}

/// How long a claim holds a job without renewal; renewed every third of it while the
/// job runs here, and released at once if this worker stops running it unfinished. A
/// worker gone for longer has its jobs returned to the queue by the reaper.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often a running job checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(250);

/// Runs (or resumes) one job. `trace` is this run's span context: a retry's message
/// continues it.
pub async fn run(ctx: &Arc<JobContext>, job_id: Uuid, trace: &TraceContext) -> Result<Outcome, PipelineError> {
    // A job this process is running already: the delivery is a duplicate.
    let (cancel, lease_lost) = (CancellationToken::new(), CancellationToken::new());
    let Some(running_here) = ctx.running.enter(job_id, cancel.clone(), lease_lost.clone()) else {
        tracing::info!(%job_id, "job already running in this worker; dropping duplicate delivery");
        return Ok(Outcome::Skipped);
    };
    let (job, started) = match db::jobs::claim(&ctx.pool, job_id, ctx.worker_id, LEASE).await? {
        Ok(claimed) => claimed,
        Err(unclaimed) => {
            // Safe to drop even if leased elsewhere: see `Unclaimed::Leased`.
            tracing::info!(%job_id, ?unclaimed, "job finished, unknown or leased elsewhere; dropping duplicate delivery");
            return Ok(Outcome::Skipped);
        }
    };
    running_here.claimed();
    // Only a first run announces itself (and only a claimed job has steps).
    let first_run = started.is_some();
    if let Some(event) = started {
        ctx.events.publish(&event).await;
    }
    tracing::info!(%job_id, attempt = job.attempts, "job running");

    let left = job.deadline_at.map(|at| (at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO));
    if left == Some(Duration::ZERO) {
        return finish(ctx, job_id, JobStatus::Failed, None, Some(deadline_error())).await;
    }
    let deadline = tokio::time::Instant::now() + left.unwrap_or(Duration::from_secs(365 * 24 * 3600));

    // Only a claimed job has steps, so a first run has none to look up.
    let steps = if first_run { Vec::new() } else { db::steps::list(&ctx.pool, job_id).await? };
    let done: HashMap<(Stage, String), Step> = steps.into_iter().map(|s| ((s.stage, s.model.clone()), s)).collect();
    let Some(pattern) = ctx.patterns.get(&job.pattern).cloned() else {
        let error = JobError::new(ErrorCode::UnknownPattern, format!("this worker has no pattern `{}`", job.pattern));
        return finish(ctx, job_id, JobStatus::Failed, None, Some(error)).await;
    };
    let stages = Stages {
        ctx,
        job: &job,
        pattern: &pattern,
        done: &done,
        cancel: &cancel,
        max_attempts: ctx.max_attempts,
        default_min_models: ctx.default_min_models,
    };
    let work = stages.run();
    tokio::pin!(work);
    // The deadline aborts the calls in flight at once; a cancellation request does so
    // through the process's watcher, which cancels the same token. A lost lease drops
    // the run outright, as an abort would: the job is no longer this worker's, so
    // nothing more is written for it here — no failed steps, no terminal status.
    let mut deadline_passed = false;
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome?,
            _ = tokio::time::sleep_until(deadline), if !cancel.is_cancelled() => {
                tracing::info!(%job_id, "deadline passed; aborting provider calls");
                deadline_passed = true;
                cancel.cancel();
            }
            _ = lease_lost.cancelled() => return Ok(Outcome::LeaseLost),
        }
    };
    if deadline_passed {
        return finish(ctx, job_id, JobStatus::Failed, None, Some(deadline_error())).await;
    }
    if cancel.is_cancelled() || db::jobs::cancel_requested(&ctx.pool, job_id).await? {
        let error = JobError::new(ErrorCode::Cancelled, "the job was cancelled");
        return finish(ctx, job_id, JobStatus::Cancelled, None, Some(error)).await;
    }
    match outcome {
        StagesOutcome::Succeeded(result) => finish(ctx, job_id, JobStatus::Succeeded, Some(result), None).await,
        StagesOutcome::Failed(error) => finish(ctx, job_id, JobStatus::Failed, None, Some(error)).await,
        StagesOutcome::Retry(delay) => retry_later(ctx, &job, delay, trace).await,
    }
}

/// Sends the job back to the queue to run again after `delay` (through a delay queue,
/// published by the relay from the outbox), with a `queued` event saying why.
async fn retry_later(
    ctx: &JobContext,
    job: &db::jobs::Job,
    delay: Duration,
    trace: &TraceContext,
) -> Result<Outcome, PipelineError> {
    let delay_ms = i32::try_from(delay.as_millis()).unwrap_or(i32::MAX);
    let mut tx = ctx.pool.begin().await?;
    db::jobs::requeue_for_retry(&mut tx, job.id, job.attempts + 1, delay_ms, Some(&trace.to_string())).await?;
    let data = EventData::Queued(QueuedData::retry(job.attempts + 1, i64::from(delay_ms)));
    let event = db::events::append(&mut tx, job.id, &data).await?;
    tx.commit().await?;
    ctx.events.publish(&event).await;
    metrics::counter!(common::metrics::JOB_RETRIES, "pattern" => job.pattern.clone()).increment(1);
    tracing::info!(job_id = %job.id, attempt = job.attempts + 1, delay_ms, "transient failure; retrying later");
    Ok(Outcome::Retried)
}

/// Ends a job whose message was dead-lettered (a no-op if it already ended).
pub async fn dead_lettered(ctx: &JobContext, job_id: Uuid) -> Result<Outcome, PipelineError> {
    let error = JobError::new(
        ErrorCode::DeadLettered,
        "the job's message was dead-lettered after repeated delivery failures; an admin can replay it",
    );
    finish(ctx, job_id, JobStatus::Failed, None, Some(error)).await
}

fn deadline_error() -> JobError {
    JobError::new(ErrorCode::DeadlineExceeded, "the job did not finish before its deadline")
}

/// Commits the terminal status with its event; a no-op if another delivery got there first.
async fn finish(
    ctx: &JobContext,
    job_id: Uuid,
    status: JobStatus,
    result: Option<JobResult>,
    error: Option<JobError>,
) -> Result<Outcome, PipelineError> {
    // Status, budget settlement and event in one statement: exactly once, or not at all.
    let ended = db::jobs::finish(&ctx.pool, job_id, status, result, error).await?;
    let Some((finished, event)) = ended else {
        return Ok(Outcome::Skipped);
    };
    ctx.events.publish(&event).await;
    common::metrics::job_finished(&finished, status);
    tracing::info!(%job_id, status = %status, "job finished");
    Ok(Outcome::Finished(status))
}
