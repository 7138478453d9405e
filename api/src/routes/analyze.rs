//! `POST /v1/analyze`: validate, then commit the job, its `queued` event and its
//! outbox row in one transaction, answer 202, and publish at once.

use std::{collections::HashMap, sync::Arc};

use common::{
    catalog::ModelSpec,
    db,
    patterns::{estimate_tokens, PatternSpec},
    queue::JobMessage,
    trace::TraceContext,
};
use poem_openapi::{param::Header, payload::Json, ApiResponse, Object, OpenApi};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    body::JsonBody,
    error::{ApiError, FieldError},
    problems::{Problems, ALWAYS, BODY, CONFLICT, UNAUTHORIZED},
    relay,
    routes::{
        jobs::{event_stream, stream_permit, JobLinks, StreamItemView},
        models::availability,
        ApiTags,
    },
    state::AppState,
    stream::frame::SseBody,
};

/// An analysis request: one prompt, the models to ask, and how to combine them.
#[derive(Debug, Serialize, Deserialize, Object)]
#[serde(deny_unknown_fields)]
#[oai(example)]
pub struct AnalyzeRequest {
    /// The prompt (not empty; at most `ULTRA_MAX_PROMPT_CHARS` characters).
    pub prompt: String,
    /// Model ids from `GET /v1/models`, without duplicates.
    pub models: Vec<String>,
    /// How the models' answers are combined; `direct` (the default) asks each model once.
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub options: Option<AnalyzeOptions>,
}

impl poem_openapi::types::Example for AnalyzeRequest {
    fn example() -> Self {
        Self {
            prompt: "What are the trade-offs of event sourcing?".to_owned(),
            models: vec!["mock/alpha".to_owned(), "mock/beta".to_owned()],
            pattern: Some("direct".to_owned()),
            options: None,
        }
    }
}

/// Generation options passed to every model of the job.
#[derive(Debug, Default, Serialize, Deserialize, Object)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeOptions {
    /// Sampling temperature, 0 to 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[oai(validator(minimum(value = "0"), maximum(value = "2")))]
    pub temperature: Option<f64>,
    /// Most tokens each model may write, 1 to 32768.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[oai(validator(minimum(value = "1"), maximum(value = "32768")))]
    pub max_tokens: Option<u32>,
    /// Reuse a cached answer for the same model, prompt and parameters (and cache
    /// this one). A cached answer costs nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    /// The model that writes the synthesis; by default the first model with an answer.
    /// One not among `models` writes the synthesis only. If it fails, the job's models
    /// take over in their order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthesis_model: Option<String>,
    /// Answers a stage needs to go on (default 1); fewer fail the job. More than the
    /// job's models asks for every one of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[oai(validator(minimum(value = "1")))]
    pub min_models: Option<u32>,
    /// The job's deadline in seconds from submission, at most the tier's
    /// `max_job_seconds`; past it the job fails `deadline_exceeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[oai(validator(minimum(value = "1"), maximum(value = "4294967295")))]
    pub timeout_s: Option<u32>,
}

/// The job was accepted; it runs in the background.
#[derive(Debug, Object)]
#[oai(example)]
pub struct AnalyzeAccepted {
    pub id: Uuid,
    /// Always `queued`.
    pub status: String,
    pub links: JobLinks,
}

impl poem_openapi::types::Example for AnalyzeAccepted {
    fn example() -> Self {
        let id = Uuid::from_u128(0x0190_1234_5678_7abc_8def_0123_4567_89ab);
        Self { id, status: "queued".to_owned(), links: JobLinks::for_job(id) }
    }
}

#[derive(ApiResponse)]
pub enum AnalyzeResponse {
    /// Accepted: poll `Location` or stream `links.events`.
    #[oai(status = 202)]
    Accepted(Json<AnalyzeAccepted>, #[oai(header = "Location")] String),
    /// Accepted, and streamed at once (the request sent `Accept: text/event-stream`):
    /// the job's events, as `GET /v1/jobs/{id}/events` would send them.
    #[oai(status = 200)]
    Streaming(SseBody<StreamItemView>, #[oai(header = "Location")] String),
}

pub struct AnalyzeApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Jobs")]
impl AnalyzeApi {
    /// Submit an analysis job
    ///
    /// Validates the request and queues the job. The job is durable from the moment
    /// this returns 202, even while the message broker is down.
    #[oai(path = "/analyze", method = "post", operation_id = "analyze")]
    async fn analyze(
        &self,
        auth: BearerAuth,
        body: JsonBody<AnalyzeRequest>,
        /// `text/event-stream` to submit and stream the job's events in one request.
        #[oai(name = "Accept")]
        accept: Header<Option<String>>,
        /// Makes a retried submission safe: the same key with the same body returns the
        /// original job; with another body, 422; while the first is in progress, 409.
        /// Keys are per user, kept `ULTRA_IDEMPOTENCY_RETENTION_SECS` (a day).
        #[oai(name = "Idempotency-Key", validator(max_length = 255, pattern = "^[ \t]*[!-~]+[ \t]*$"))]
        idempotency_key: Header<Option<String>>,
        trace: poem::web::Data<&TraceContext>,
    ) -> Result<AnalyzeResponse, Problems<{ ALWAYS | UNAUTHORIZED | BODY | CONFLICT }>> {
        let traceparent = trace.0.to_string();
        let state = &self.state;
        let request = body.0;
        let idempotency_key = idempotency_key.0.map(check_idempotency_key).transpose()?;
        // A stream slot is taken before anything is accepted: refusing the stream after
        // queueing the job would invite the client to submit it twice.
        let wants_stream = accept.0.as_deref().is_some_and(|a| a.contains("text/event-stream"));
        let stream_slot = if wants_stream { Some(stream_permit(state, &auth.0)?) } else { None };
        let tier = state.tiers.for_user(&auth.0.tier);
        let models_allowed = (tier.models_per_job as usize).min(state.config.max_models_per_job);
        let accepted = validate(state, &request, models_allowed)?;
        check_models_can_run(state, &request.models).await?;
        // The effective `max_tokens` is stored with the job, so the reservation below is
        // a real bound: what every call of every stage can read and write.
        // What the key vouches for: the request as parsed (so whitespace does not matter).
        let request_hash = Sha256::digest(serde_json::to_vec(&request).unwrap_or_default()).to_vec();
        let mut options = request.options.unwrap_or_default();
        let max_tokens = *options.max_tokens.get_or_insert(state.config.default_max_tokens);
        let timeout = options.timeout_s;
        let worst_case = accepted.spec.worst_case_tokens(
            request.models.len() as u64,
            estimate_tokens(&request.prompt),
            u64::from(max_tokens),
        );
        let reserve = i64::try_from(worst_case).unwrap_or(i64::MAX);
        let options = serde_json::to_value(options).map_err(|e| ApiError::Internal(e.into()))?;
        let id = Uuid::now_v7();

        let retention = state.config.idempotency_retention();
        if let Some(key) = &idempotency_key {
            if let Some(recorded) = db::idempotency::get(&state.pool, auth.0.user_id, key, retention).await? {
                return Ok(replay(state, &auth, recorded, &request_hash, stream_slot).await?);
            }
        }
        let mut tx = state.pool.begin().await?;
        if let Some(key) = &idempotency_key {
            // A concurrent request holding the same key answers 409 rather than waiting.
            sqlx::query("SET LOCAL lock_timeout = '100ms'").execute(&mut *tx).await?;
            match db::idempotency::claim(&mut tx, auth.0.user_id, key, &request_hash, id, retention).await {
                Ok(true) => {}
                Ok(false) => {
                    tx.rollback().await?;
                    let recorded = db::idempotency::get(&state.pool, auth.0.user_id, key, retention).await?;
                    let recorded = recorded.ok_or_else(|| ApiError::Conflict(IN_PROGRESS.into()))?;
                    return Ok(replay(state, &auth, recorded, &request_hash, stream_slot).await?);
                }
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                    return Err(ApiError::Conflict(IN_PROGRESS.into()).into());
                }
                Err(err) => return Err(err.into()),
            }
            sqlx::query("SET LOCAL lock_timeout = 0").execute(&mut *tx).await?;
        }
        // The user's row lock serialises their submissions, so the checks below and
        // the reservation are one atomic step: racing requests cannot overspend.
        db::usage::lock_user(&mut tx, auth.0.user_id).await?;
        let db::usage::Standing { day: today, usage, active_jobs: active } =
            db::usage::standing(&mut *tx, auth.0.user_id).await?;
        if active >= i64::from(tier.concurrent_jobs) {
            return Err(ApiError::TooManyJobs(format!(
                "{active} jobs in progress; your tier allows {} at once",
                tier.concurrent_jobs
            ))
            .into());
        }
        let budget = i64::try_from(tier.daily_tokens).unwrap_or(i64::MAX);
        if usage.used + usage.reserved + reserve > budget {
            return Err(ApiError::BudgetExceeded(format!(
                "this job may use up to {reserve} tokens; {} of today's {budget} remain",
                (budget - usage.used - usage.reserved).max(0)
            ))
            .into());
        }
        let queued = json!({ "status": "queued", "pattern": accepted.name, "models": request.models });
        let db::jobs::Submitted { job, queued, outbox_id } = db::jobs::submit(
            &mut tx,
            &db::jobs::NewJob {
                id,
                user_id: auth.0.user_id,
                pattern: &accepted.name,
                prompt: &request.prompt,
                models: &request.models,
                options: &options,
                reserved_tokens: reserve,
                reserved_day: Some(today),
                timeout_secs: timeout.unwrap_or(state.config.default_job_timeout_secs).min(tier.max_job_seconds),
            },
            queued,
            Some(&traceparent),
        )
        .await?;
        tx.commit().await?;
        metrics::counter!(common::metrics::JOBS_SUBMITTED, "pattern" => job.pattern.clone()).increment(1);
        tracing::info!(job_id = %id, models = job.models.len(), pattern = %job.pattern, "job accepted");

        state.events.publish(&queued).await;
        relay::publish_now(state, outbox_id, &JobMessage::new(id, 1), Some(&traceparent)).await;

        let links = JobLinks::for_job(id);
        let location = links.self_.clone();
        if let Some(permit) = stream_slot {
            return Ok(AnalyzeResponse::Streaming(event_stream(state, permit, id, 0, false), location));
        }
        Ok(AnalyzeResponse::Accepted(Json(AnalyzeAccepted { id, status: "queued".to_owned(), links }), location))
    }
}

struct Accepted {
    name: String,
    spec: PatternSpec,
}

const IN_PROGRESS: &str = "a request with this Idempotency-Key is still being processed; retry shortly";

/// 1 to 255 visible ASCII characters (a UUID is the usual choice).
fn check_idempotency_key(key: String) -> Result<String, ApiError> {
    let valid = (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(key)
    } else {
        Err(ApiError::BadRequest("invalid header `Idempotency-Key`: 1 to 255 visible ASCII characters".into()))
    }
}

/// The answer to a repeated `Idempotency-Key`: the original job, as first accepted.
async fn replay(
    state: &AppState,
    auth: &BearerAuth,
    recorded: db::idempotency::Recorded,
    request_hash: &[u8],
    stream_slot: Option<crate::stream::limit::StreamPermit>,
) -> Result<AnalyzeResponse, ApiError> {
    if recorded.request_hash != request_hash {
        return Err(ApiError::field("Idempotency-Key", "was already used with a different request body"));
    }
    let job = db::jobs::get_owned(&state.pool, recorded.job_id, auth.0.user_id)
        .await?
        .ok_or(ApiError::Conflict(IN_PROGRESS.into()))?;
    let links = JobLinks::for_job(job.id);
    let location = links.self_.clone();
    if let Some(permit) = stream_slot {
        let stream = event_stream(state, permit, job.id, 0, job.status.is_terminal());
        return Ok(AnalyzeResponse::Streaming(stream, location));
    }
    Ok(AnalyzeResponse::Accepted(Json(AnalyzeAccepted { id: job.id, status: "queued".to_owned(), links }), location))
}

/// Refuses what cannot run rather than accepting a job bound to fail: a model whose
/// provider has no key is a `422` naming it; a job whose every model is behind an
/// open circuit is a `503` with `Retry-After` (the soonest circuit's cool-down).
async fn check_models_can_run(state: &AppState, models: &[String]) -> Result<(), ApiError> {
    let specs: Vec<&ModelSpec> = models.iter().filter_map(|id| state.catalog.get(id)).collect();
    check_specs_can_run(state, &specs).await
}

async fn check_specs_can_run(state: &AppState, specs: &[&ModelSpec]) -> Result<(), ApiError> {
    let availability = availability(state, specs).await;
    let unavailable: Vec<FieldError> = specs
        .iter()
        .zip(&availability)
        .enumerate()
        .filter(|(_, (_, a))| !a.has_key)
        .map(|(index, (model, _))| {
            FieldError::new(
                format!("models[{index}]"),
                format!(
                    "model `{}` is not available: its provider `{}` has no API key configured",
                    model.id, model.provider
                ),
            )
        })
        .collect();
    if !unavailable.is_empty() {
        return Err(ApiError::validation(unavailable));
    }
    let soonest = availability
        .iter()
        .map(|a| a.circuit_open_for)
        .collect::<Option<Vec<_>>>()
        .and_then(|open| open.into_iter().min());
    if let Some(wait) = soonest {
        return Err(ApiError::ModelsUnavailable {
            detail: format!(
                "every model of this job is behind an open circuit breaker (its provider is failing); retry in {} s",
                wait.as_secs_f64().ceil() as u64
            ),
            retry_after: (wait.as_secs_f64().ceil() as u64).max(1),
        });
    }
    Ok(())
}

/// White space as the document's prompt `pattern` lists it (ECMAScript's `\s`,
/// spelled out so that every regex engine reads it alike), so the server refuses
/// exactly the prompts the document calls invalid.
fn is_blank(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}' | '\u{feff}'
    )
}

/// Checks everything at once, so the client can fix every field in one round trip.
/// An oversized prompt is a 413 of its own (it is about size, not shape).
fn validate(state: &AppState, request: &AnalyzeRequest, models_allowed: usize) -> Result<Accepted, ApiError> {
    let config = &state.config;
    let prompt_chars = request.prompt.chars().count();
    if prompt_chars > config.max_prompt_chars {
        return Err(ApiError::PayloadTooLarge(
            format!("prompt has {prompt_chars} characters; the limit is {}", config.max_prompt_chars),
            Some(FieldError::new("prompt", format!("at most {} characters", config.max_prompt_chars))),
        ));
    }

    let mut errors = Vec::new();
    if request.prompt.chars().all(is_blank) {
        errors.push(FieldError::new("prompt", "must not be empty"));
    } else if request.prompt.contains('\0') {
        errors.push(FieldError::new("prompt", "must not contain NUL characters"));
    }
    if request.models.is_empty() {
        errors.push(FieldError::new("models", "name at least one model"));
    } else if request.models.len() > models_allowed {
        errors.push(FieldError::new(
            "models",
            format!("{} models named; at most {models_allowed} per job", request.models.len()),
        ));
    }
    let mut seen = HashMap::new();
    // Past the count limit each model is not looked at: a long list of bogus names
    // gets one error, not one per name.
    let named = if request.models.len() > models_allowed { &[][..] } else { &request.models[..] };
    for (index, model) in named.iter().enumerate() {
        if let Some(first) = seen.insert(model.as_str(), index) {
            errors.push(FieldError::new(format!("models[{index}]"), format!("duplicate of models[{first}]")));
        } else if state.catalog.get(model).is_none() {
            errors.push(FieldError::new(
                format!("models[{index}]"),
                format!("unknown model `{model}`; see GET /v1/models"),
            ));
        }
    }
    let name = request.pattern.as_deref().unwrap_or("direct");
    let pattern = match state.patterns.get(name) {
        Some(spec) => Some((name.to_owned(), spec.clone())),
        None => {
            let known: Vec<_> = state.patterns.iter().map(|(name, _)| name).collect();
            errors.push(FieldError::new(
                "pattern",
                format!("unknown pattern `{name}`; known patterns: {} (GET /v1/patterns)", known.join(", ")),
            ));
            None
        }
    };
    if let Some(options) = &request.options {
        if let Some(t) = options.temperature {
            if !(0.0..=2.0).contains(&t) {
                errors.push(FieldError::new("options.temperature", "must be between 0 and 2"));
            }
        }
        if let Some(m) = options.max_tokens {
            if !(1..=32_768).contains(&m) {
                errors.push(FieldError::new("options.max_tokens", "must be between 1 and 32768"));
            }
        }
        if options.timeout_s == Some(0) {
            errors.push(FieldError::new("options.timeout_s", "must be at least 1 second"));
        }
        // One outside `models` makes one call, the synthesis (so it is not counted in
        // the tier's models per job); if it cannot, the job's models take over.
        match options.synthesis_model.as_deref().map(|model| (model, state.catalog.get(model))) {
            Some((model, None)) => errors.push(FieldError::new(
                "options.synthesis_model",
                format!("unknown model `{model}`; see GET /v1/models"),
            )),
            Some((model, Some(spec))) if !state.catalog.has_key(&spec.provider) => errors.push(FieldError::new(
                "options.synthesis_model",
                format!("model `{model}` is not available: its provider `{}` has no API key configured", spec.provider),
            )),
            _ => {}
        }
        if let Some(min) = options.min_models {
            if min == 0 || min as usize > config.max_models_per_job {
                errors.push(FieldError::new(
                    "options.min_models",
                    format!("must be between 1 and {}", config.max_models_per_job),
                ));
            }
        }
    }
    match pattern {
        Some((name, spec)) if errors.is_empty() => Ok(Accepted { name, spec }),
        _ => Err(ApiError::validation(errors)),
    }
}
