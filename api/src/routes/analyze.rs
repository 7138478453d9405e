//! `POST /v1/analyze`: validate the request, hand it to the submit service
//! (`crate::jobs`), and answer 202 — or stream the job's events at once.

use std::sync::Arc;

use common::{db, job::JobOptions, patterns::PatternSpec, trace::TraceContext};
use poem_openapi::{param::Header, payload::Json, ApiResponse, Object, OpenApi};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    body::JsonBody,
    error::{ApiError, FieldError},
    jobs::{self, Idempotency, Submission},
    problems::{Problems, ALWAYS, BODY, CONFLICT, UNAUTHORIZED},
    routes::{jobs::JobLinks, ApiTags},
    state::AppState,
    stream::{event_stream, frame::SseBody, stream_permit, views::StreamItemView},
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
    pub options: Option<JobOptions>,
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
        let state = &self.state;
        let request = body.0;
        let idempotency_key = idempotency_key.0.map(jobs::check_idempotency_key).transpose()?;
        // A stream slot is taken before anything is accepted: refusing the stream after
        // queueing the job would invite the client to submit it twice.
        let wants_stream = accept.0.as_deref().is_some_and(|a| a.contains("text/event-stream"));
        let stream_slot = if wants_stream { Some(stream_permit(state, &auth.0)?) } else { None };
        let tier = state.tiers.for_user(&auth.0.tier);
        let models_allowed = (tier.models_per_job as usize).min(state.config.max_models_per_job);
        let (pattern, spec) = validate(state, &request, models_allowed)?;
        jobs::check_models_can_run(state, &request.models).await?;
        if request.options.as_ref().is_some_and(|o| o.webhook_url.is_some())
            && !db::webhooks::has_default(&state.pool, auth.0.user_id).await?
        {
            return Err(ApiError::validation(vec![FieldError::new(
                "options.webhook_url",
                "needs a webhook endpoint to sign with: register one with POST /v1/webhooks",
            )])
            .into());
        }
        // What the key vouches for: the request as parsed (so whitespace does not matter).
        let idempotency = idempotency_key.as_deref().map(|key| Idempotency::new(key, &request));
        let traceparent = trace.0.to_string();
        let submission = Submission {
            user_id: auth.0.user_id,
            tier: &auth.0.tier,
            prompt: &request.prompt,
            models: &request.models,
            pattern: (&pattern, &spec),
            options: request.options.clone().unwrap_or_default(),
            chat: None,
            batch_id: None,
            idempotency,
            traceparent: &traceparent,
        };
        let job = jobs::submit(state, submission).await?;
        let links = JobLinks::for_job(job.id);
        let location = links.self_.clone();
        if let Some(permit) = stream_slot {
            let stream = event_stream(state, permit, job.id, 0, job.status.is_terminal());
            return Ok(AnalyzeResponse::Streaming(stream, location));
        }
        let view = AnalyzeAccepted { id: job.id, status: "queued".to_owned(), links };
        Ok(AnalyzeResponse::Accepted(Json(view), location))
    }
}

/// Checks everything at once, so the client can fix every field in one round trip.
/// An oversized prompt is a 413 of its own (it is about size, not shape).
fn validate(
    state: &AppState,
    request: &AnalyzeRequest,
    models_allowed: usize,
) -> Result<(String, PatternSpec), ApiError> {
    let config = &state.config;
    let prompt_chars = request.prompt.chars().count();
    if prompt_chars > config.max_prompt_chars {
        return Err(ApiError::PayloadTooLarge(
            format!("prompt has {prompt_chars} characters; the limit is {}", config.max_prompt_chars),
            Some(FieldError::new("prompt", format!("at most {} characters", config.max_prompt_chars))),
        ));
    }

    let mut errors = Vec::new();
    if request.prompt.chars().all(jobs::is_blank) {
        errors.push(FieldError::new("prompt", "must not be empty"));
    } else if request.prompt.contains('\0') {
        errors.push(FieldError::new("prompt", "must not contain NUL characters"));
    }
    errors.extend(jobs::check_model_names(state, "models", &request.models, models_allowed));
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
        for field in options.unknown.keys() {
            errors.push(FieldError::new(format!("options.{field}"), format!("unknown field `{field}`")));
        }
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
        if let Some(model) = options.synthesis_model.as_deref() {
            errors.extend(jobs::check_synthesis_model(state, "options.synthesis_model", model));
        }
        if let Some(min) = options.min_models {
            errors.extend(jobs::check_min_models(state, "options.min_models", min));
        }
        if let Some(url) = options.webhook_url.as_deref() {
            let policy = common::webhooks::address::Policy::from_config(config);
            super::webhooks::check_url(&policy, "options.webhook_url", url, &mut errors);
        }
    }
    match pattern {
        Some(pattern) if errors.is_empty() => Ok(pattern),
        _ => Err(ApiError::validation(errors)),
    }
}
