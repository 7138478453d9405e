//! Accepting jobs, for every surface that submits them. The service owns what makes a
//! submission safe: the idempotency key, the user's standing (jobs in progress, the
//! daily budget), the budget reservation, the durable insert (job, `queued` event and
//! outbox row in one transaction) and the fast-path publish. Handlers parse the
//! request, call `submit`, and answer in their surface's shape.

mod runnable;

use common::{
    db::{self, idempotency::Claim, jobs::Job},
    job::{ChatInput, JobOptions},
    patterns::{estimate_tokens, PatternSpec},
    queue::JobMessage,
};
use uuid::Uuid;

pub use self::runnable::{check_min_models, check_model_names, check_models_can_run, check_synthesis_model};
use crate::{error::ApiError, relay, state::AppState};

/// A validated request for a job.
pub struct Submission<'a> {
    /// Who submits: the job's owner, and the tier whose limits apply.
    pub user_id: Uuid,
    pub tier: &'a str,
    pub prompt: &'a str,
    pub models: &'a [String],
    /// The pattern's name and its stages.
    pub pattern: (&'a str, &'a PatternSpec),
    pub options: JobOptions,
    /// For a chat: the whole conversation (`prompt` is its transcript).
    pub chat: Option<ChatInput>,
    /// For a batch's line: the batch.
    pub batch_id: Option<Uuid>,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency: Option<Idempotency<'a>>,
    /// The request's trace, carried by the job's messages.
    pub traceparent: &'a str,
}

/// A key and what it vouches for: a digest of the request as parsed, so that the
/// same key with another request is refused rather than answered with the first job.
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub request_hash: Vec<u8>,
}

impl<'a> Idempotency<'a> {
    /// `key`, vouching for `request` as parsed (so white space does not matter).
    pub fn new(key: &'a str, request: &impl serde::Serialize) -> Self {
        use sha2::{Digest, Sha256};
        Self { key, request_hash: Sha256::digest(serde_json::to_vec(request).unwrap_or_default()).to_vec() }
    }
}

/// What a request with a key that is still being used answers.
const IN_PROGRESS: &str = "a request with this Idempotency-Key is still being processed; retry shortly";

/// How long a request waits for a concurrent one holding the same key before a 409.
const KEY_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Accepts a job, or finds the one its idempotency key already created (a replay
/// answers as the first request did). The job is durable when this returns, even
/// while the broker is down.
pub async fn submit(state: &AppState, submission: Submission<'_>) -> Result<Job, ApiError> {
    let Submission {
        user_id,
        tier,
        prompt,
        models,
        pattern: (pattern, spec),
        mut options,
        chat,
        batch_id,
        idempotency,
        traceparent,
    } = submission;
    let config = &state.config;
    let tier = state.tiers.for_user(tier);
    // The effective `max_tokens` is stored with the job, so the reservation is a real
    // bound: what every call of every stage can read and write.
    let max_tokens = *options.max_tokens.get_or_insert(config.default_max_tokens);
    let worst_case = spec.worst_case_tokens(models.len() as u64, estimate_tokens(prompt), u64::from(max_tokens));
    let reserve = i64::try_from(worst_case).unwrap_or(i64::MAX);
    let timeout_secs = options.timeout_s.unwrap_or(config.default_job_timeout_secs).min(tier.max_job_seconds);
    let id = Uuid::now_v7();

    let retention = config.idempotency_retention();
    if let Some(key) = &idempotency {
        if let Some(recorded) = db::idempotency::get(&state.pool, user_id, key.key, retention).await? {
            return replay(state, user_id, recorded, key).await;
        }
    }
    let mut tx = state.pool.begin().await?;
    if let Some(key) = &idempotency {
        match db::idempotency::claim(&mut tx, user_id, key.key, &key.request_hash, id, retention, KEY_WAIT).await? {
            Claim::Claimed => {}
            Claim::Taken => {
                tx.rollback().await?;
                let recorded = db::idempotency::get(&state.pool, user_id, key.key, retention).await?;
                let recorded = recorded.ok_or_else(|| ApiError::Conflict(IN_PROGRESS.into()))?;
                return replay(state, user_id, recorded, key).await;
            }
            Claim::Busy => return Err(ApiError::Conflict(IN_PROGRESS.into())),
        }
    }
    // The user's row lock serialises their submissions, so the checks below and the
    // reservation are one atomic step: racing requests cannot overspend.
    db::usage::lock_user(&mut tx, user_id).await?;
    let db::usage::Standing { day: today, usage, active_jobs: active } = db::usage::standing(&mut *tx, user_id).await?;
    if active >= i64::from(tier.concurrent_jobs) {
        return Err(ApiError::TooManyJobs(format!(
            "{active} jobs in progress; your tier allows {} at once",
            tier.concurrent_jobs
        )));
    }
    let budget = i64::try_from(tier.daily_tokens).unwrap_or(i64::MAX);
    if usage.used + usage.reserved + reserve > budget {
        return Err(ApiError::BudgetExceeded(format!(
            "this job may use up to {reserve} tokens; {} of today's {budget} remain",
            (budget - usage.used - usage.reserved).max(0)
        )));
    }
    let new_job = db::jobs::NewJob {
        id,
        user_id,
        pattern,
        prompt,
        models,
        options: &options,
        chat: chat.as_ref(),
        batch_id,
        reserved_tokens: reserve,
        reserved_day: Some(today),
        timeout_secs,
    };
    let db::jobs::Submitted { job, queued, outbox_id } = db::jobs::submit(&mut tx, &new_job, Some(traceparent)).await?;
    tx.commit().await?;
    metrics::counter!(common::metrics::JOBS_SUBMITTED, "pattern" => job.pattern.clone()).increment(1);
    tracing::info!(job_id = %id, models = job.models.len(), pattern = %job.pattern, "job accepted");

    state.events.publish(&queued).await;
    relay::publish_now(state, outbox_id, &JobMessage::new(id, 1), Some(traceparent)).await;
    Ok(job)
}

/// The job an earlier request with the same key created, if the request is the same.
async fn replay(
    state: &AppState,
    user_id: Uuid,
    recorded: db::idempotency::Recorded,
    key: &Idempotency<'_>,
) -> Result<Job, ApiError> {
    if recorded.request_hash != key.request_hash {
        return Err(ApiError::field("Idempotency-Key", "was already used with a different request body"));
    }
    let job = db::jobs::get_owned(&state.pool, recorded.job_id, user_id)
        .await?
        .ok_or(ApiError::Conflict(IN_PROGRESS.into()))?;
    Ok(job)
}

/// 1 to 255 visible ASCII characters (a UUID is the usual choice).
pub fn check_idempotency_key(key: String) -> Result<String, ApiError> {
    let valid = (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(key)
    } else {
        Err(ApiError::BadRequest("invalid header `Idempotency-Key`: 1 to 255 visible ASCII characters".into()))
    }
}

/// White space as the document's prompt `pattern` lists it (ECMAScript's `\s`,
/// spelled out so that every regex engine reads it alike), so the server refuses
/// exactly the prompts the document calls invalid.
pub fn is_blank(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}' | '\u{feff}'
    )
}
