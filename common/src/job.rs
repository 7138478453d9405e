//! The job contract shared by the api, the workers and the database: what a client
//! sets (`JobOptions`), what a job yields (`JobResult`) or why it or one of its steps
//! failed (`JobError`, `StepError`), and the payload of each kind of event.
//!
//! Each type is stored as JSON (`sqlx::types::Json`), sent by serde on the event bus
//! and in SSE frames, and is an OpenAPI schema (poem's `Object`). The two renderings
//! must agree — the `serde` and `oai` attributes of a field go together, and a test
//! below holds them to it — so what is stored, streamed and documented is one shape.

use poem_openapi::Object;
use serde::{Deserialize, Serialize};

use crate::domain::{ChatRole, ErrorCode, EventKind, JobStatus, QueuedReason, Stage};

/// Generation options passed to every model of the job.
///
/// Unknown fields are kept aside rather than refused, so a row a newer version wrote
/// still reads; a request's are refused by its handler (`unknown`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Object)]
#[oai(rename = "AnalyzeOptions")]
pub struct JobOptions {
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(minimum(value = "0"), maximum(value = "2")))]
    pub temperature: Option<f64>,
    /// Most tokens each model may write, 1 to 32768.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(minimum(value = "1"), maximum(value = "32768")))]
    pub max_tokens: Option<u32>,
    /// Reuse a cached answer for the same model, prompt and parameters (and cache
    /// this one). A cached answer costs nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub cache: Option<bool>,
    /// The model that writes the synthesis; by default the first model with an answer.
    /// One not among `models` writes the synthesis only. If it fails, the job's models
    /// take over in their order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub synthesis_model: Option<String>,
    /// Answers a stage needs to go on (default 1); fewer fail the job. More than the
    /// job's models asks for every one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(minimum(value = "1")))]
    pub min_models: Option<u32>,
    /// The job's deadline in seconds from submission, at most the tier's
    /// `max_job_seconds`; past it the job fails `deadline_exceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(minimum(value = "1"), maximum(value = "4294967295")))]
    pub timeout_s: Option<u32>,
    /// A URL to tell when this job ends, besides the user's webhook endpoints: signed
    /// with the secret of the user's default endpoint (their oldest enabled one), so
    /// the user must have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub webhook_url: Option<String>,
    /// Fields this version does not know.
    #[serde(flatten, skip_serializing)]
    #[oai(skip)]
    pub unknown: std::collections::BTreeMap<String, serde_json::Value>,
}

impl JobOptions {
    /// The quorum of each stage for a job of `models` models: at least one, at most all.
    pub fn quorum(&self, default_min_models: u32, models: usize) -> usize {
        (self.min_models.unwrap_or(default_min_models) as usize).min(models).max(1)
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

/// A job submitted as a chat (the OpenAI-compatible surface): the whole conversation,
/// which the initial stage sends to every model, and the sampling options `JobOptions`
/// does not have. Stored as `jobs.chat`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatInput {
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Sequences that end the answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl ChatInput {
    /// The conversation as one prompt, for the job's `prompt` (what `/v1` shows, the
    /// budget estimates and later stages quote): a lone user message as it is, a longer
    /// conversation one `role: text` paragraph per message.
    pub fn transcript(&self) -> String {
        match self.messages.as_slice() {
            [only] if only.role == ChatRole::User => only.content.clone(),
            messages => messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n\n"),
        }
    }
}

/// Tokens a call read and wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Object)]
pub struct Usage {
    pub input_tokens: i32,
    pub output_tokens: i32,
}

/// One earlier run of a failed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct Attempt {
    pub attempt: i32,
    pub code: ErrorCode,
    /// The start of the run's error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub message: Option<String>,
}

/// Why a step (one provider call) failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct StepError {
    pub code: ErrorCode,
    pub message: String,
    /// Whether the same call may succeed later (the job is retried while it has runs left).
    #[serde(default)]
    #[oai(default)]
    pub retryable: bool,
    /// How long the provider asked to wait before calling again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub retry_after_ms: Option<u64>,
    /// The errors of the step's last runs, oldest first, so a final `circuit_open`
    /// still shows what opened the circuit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[oai(default, skip_serializing_if_is_empty)]
    pub attempts: Vec<Attempt>,
}

impl StepError {
    /// An error no later run can cure.
    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retryable: false, retry_after_ms: None, attempts: Vec::new() }
    }
}

/// A model that failed at a stage; the job went on without it, or failed for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct Failure {
    pub model: String,
    pub stage: Stage,
    pub error: StepError,
}

/// Why a job failed or was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
    /// Each model that failed, at which stage, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[oai(default, skip_serializing_if_is_empty)]
    pub failures: Vec<Failure>,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), failures: Vec::new() }
    }
}

/// One model's answer at a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Object)]
pub struct Answer {
    pub model: String,
    pub output: String,
}

/// What a succeeded job yields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Object)]
pub struct JobResult {
    /// Each model's first answer, in the job's model order.
    pub answers: Vec<Answer>,
    /// Each model's revised answer (patterns with a `meta` stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub meta: Option<Vec<Answer>>,
    /// The final answer and the model that wrote it (patterns with a `synthesis` stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub synthesis: Option<Answer>,
    /// The synthesis's text, when there is one: the job's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub output: Option<String>,
    /// Models that failed along the way (the job went on without them).
    #[serde(default)]
    #[oai(default)]
    pub failures: Vec<Failure>,
}

/// `queued`: the job was accepted, or is back in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct QueuedData {
    /// Always `queued`.
    pub status: JobStatus,
    /// Why it is queued again; absent when it was just accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<QueuedReason>,
    /// On acceptance: the job's pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub pattern: Option<String>,
    /// On acceptance: the job's models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub models: Option<Vec<String>>,
    /// On a retry: the run the job will have next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub attempt: Option<i32>,
    /// On a retry: how long it waits first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub delay_ms: Option<i64>,
}

impl QueuedData {
    /// Just accepted.
    pub fn accepted(pattern: &str, models: &[String]) -> Self {
        Self { pattern: Some(pattern.to_owned()), models: Some(models.to_vec()), ..Self::requeued(None) }
    }

    /// Back in the queue, for `reason`.
    pub fn requeued(reason: Option<QueuedReason>) -> Self {
        Self { status: JobStatus::Queued, reason, pattern: None, models: None, attempt: None, delay_ms: None }
    }

    /// A retry: run `attempt` after `delay_ms`.
    pub fn retry(attempt: i32, delay_ms: i64) -> Self {
        Self { attempt: Some(attempt), delay_ms: Some(delay_ms), ..Self::requeued(Some(QueuedReason::Retry)) }
    }
}

/// `started`: a worker took the job for the first time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct StartedData {
    pub attempt: i32,
}

/// `step.started`: a model was called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct StepStartedData {
    pub stage: Stage,
    pub model: String,
}

/// `step.completed`: a model answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct StepCompletedData {
    pub stage: Stage,
    pub model: String,
    pub output: String,
    pub usage: Usage,
    /// What the call cost, in US dollars.
    #[serde(default)]
    #[oai(default)]
    pub cost_usd: f64,
    /// Whether the answer came from the response cache.
    #[serde(default)]
    #[oai(default)]
    pub cached: bool,
}

/// `step.failed`: a model's call failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct StepFailedData {
    pub stage: Stage,
    pub model: String,
    pub error: StepError,
}

/// `succeeded`, `failed` or `cancelled`: the job's last event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct EndedData {
    pub status: JobStatus,
    /// Once succeeded: the result.
    #[serde(default)]
    pub result: Option<JobResult>,
    /// Once failed or cancelled: why.
    #[serde(default)]
    pub error: Option<JobError>,
}

/// The payload of a job event; its variant decides the event's kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    Queued(QueuedData),
    Started(StartedData),
    StepStarted(StepStartedData),
    StepCompleted(StepCompletedData),
    StepFailed(StepFailedData),
    Ended(EndedData),
}

impl EventData {
    pub fn kind(&self) -> EventKind {
        match self {
            EventData::Queued(_) => EventKind::Queued,
            EventData::Started(_) => EventKind::Started,
            EventData::StepStarted(_) => EventKind::StepStarted,
            EventData::StepCompleted(_) => EventKind::StepCompleted,
            EventData::StepFailed(_) => EventKind::StepFailed,
            EventData::Ended(ended) => match ended.status {
                JobStatus::Succeeded => EventKind::Succeeded,
                JobStatus::Cancelled => EventKind::Cancelled,
                _ => EventKind::Failed,
            },
        }
    }

    /// The payload of a `kind` event, from its stored or received JSON.
    pub fn decode(kind: EventKind, data: serde_json::Value) -> Result<Self, serde_json::Error> {
        use serde_json::from_value;
        Ok(match kind {
            EventKind::Queued => EventData::Queued(from_value(data)?),
            EventKind::Started => EventData::Started(from_value(data)?),
            EventKind::StepStarted => EventData::StepStarted(from_value(data)?),
            EventKind::StepCompleted => EventData::StepCompleted(from_value(data)?),
            EventKind::StepFailed => EventData::StepFailed(from_value(data)?),
            EventKind::Succeeded | EventKind::Failed | EventKind::Cancelled => EventData::Ended(from_value(data)?),
        })
    }

    /// The step a `step.*` event is about.
    pub fn step(&self) -> Option<(Stage, &str)> {
        match self {
            EventData::StepStarted(d) => Some((d.stage, &d.model)),
            EventData::StepCompleted(d) => Some((d.stage, &d.model)),
            EventData::StepFailed(d) => Some((d.stage, &d.model)),
            _ => None,
        }
    }

    /// A job's last event: it reached `status`, with its result or error.
    pub fn ended(status: JobStatus, result: Option<JobResult>, error: Option<JobError>) -> Self {
        EventData::Ended(EndedData { status, result, error })
    }
}

#[cfg(test)]
mod tests {
    use poem_openapi::types::ToJSON;
    use serde_json::json;

    use super::*;

    fn step_error() -> StepError {
        StepError {
            code: ErrorCode::CircuitOpen,
            message: "the circuit breaker for this provider is open".to_owned(),
            retryable: true,
            retry_after_ms: Some(1_500),
            attempts: vec![Attempt { attempt: 1, code: ErrorCode::Overloaded, message: Some("500".to_owned()) }],
        }
    }

    fn failure() -> Failure {
        Failure { model: "mock/alpha".to_owned(), stage: Stage::Meta, error: step_error() }
    }

    /// serde (the database, the bus, SSE) and poem (the document, JSON responses)
    /// render each type alike, absent and empty fields included.
    fn agree<T: Serialize + ToJSON>(value: &T) {
        let serde = serde_json::to_value(value).expect("serde");
        assert_eq!(Some(serde.clone()), value.to_json(), "{}", T::name());
    }

    #[test]
    fn serde_and_the_document_render_every_type_alike() {
        let answer = Answer { model: "mock/alpha".to_owned(), output: "yes".to_owned() };
        agree(&JobOptions::default());
        agree(&JobOptions { temperature: Some(0.5), max_tokens: Some(9), cache: Some(true), ..JobOptions::default() });
        agree(&step_error());
        agree(&StepError::permanent(ErrorCode::Auth, "no"));
        agree(&JobError::new(ErrorCode::Cancelled, "cancelled"));
        agree(&JobError { failures: vec![failure()], ..JobError::new(ErrorCode::TooFewModels, "few") });
        agree(&JobResult { answers: vec![answer.clone()], ..JobResult::default() });
        agree(&JobResult {
            answers: vec![answer.clone()],
            meta: Some(vec![answer.clone()]),
            output: Some("yes".to_owned()),
            synthesis: Some(answer),
            failures: vec![failure()],
        });
        agree(&QueuedData::accepted("direct", &["mock/alpha".to_owned()]));
        agree(&QueuedData::retry(2, 5_000));
        agree(&QueuedData::requeued(Some(QueuedReason::WorkerLost)));
        agree(&StartedData { attempt: 1 });
        agree(&StepStartedData { stage: Stage::Initial, model: "m".to_owned() });
        agree(&StepCompletedData {
            stage: Stage::Initial,
            model: "m".to_owned(),
            output: "o".to_owned(),
            usage: Usage { input_tokens: 1, output_tokens: 2 },
            cost_usd: 0.25,
            cached: false,
        });
        agree(&StepFailedData { stage: Stage::Synthesis, model: "m".to_owned(), error: step_error() });
        agree(&EndedData {
            status: JobStatus::Failed,
            result: None,
            error: Some(JobError::new(ErrorCode::Timeout, "t")),
        });
    }

    #[test]
    fn stored_events_of_every_kind_decode_and_keep_their_shape() {
        let stored = [
            (EventKind::Queued, json!({ "status": "queued", "pattern": "direct", "models": ["mock/alpha"] })),
            (EventKind::Queued, json!({ "status": "queued", "reason": "retry", "attempt": 2, "delay_ms": 5000 })),
            (EventKind::Queued, json!({ "status": "queued", "reason": "worker lost; requeued" })),
            (EventKind::Started, json!({ "attempt": 1 })),
            (EventKind::StepStarted, json!({ "stage": "initial", "model": "mock/alpha" })),
            (
                EventKind::StepFailed,
                json!({ "stage": "meta", "model": "m", "error": { "code": "auth", "message": "no", "retryable": false } }),
            ),
            (
                EventKind::Succeeded,
                json!({ "status": "succeeded", "result": { "answers": [], "failures": [] }, "error": null }),
            ),
            (
                EventKind::Cancelled,
                json!({ "status": "cancelled", "result": null, "error": { "code": "cancelled", "message": "c" } }),
            ),
        ];
        for (kind, data) in stored {
            let decoded = EventData::decode(kind, data.clone()).expect("decodes");
            assert_eq!(decoded.kind(), kind);
            assert_eq!(serde_json::to_value(&decoded).ok(), Some(data));
        }
        // What an older api wrote on cancelling a queued job: no `result`, no `retryable`.
        let older = json!({ "status": "cancelled", "error": { "code": "cancelled", "message": "cancelled before it started" } });
        assert_eq!(EventData::decode(EventKind::Cancelled, older).map(|d| d.kind()).ok(), Some(EventKind::Cancelled));
        assert!(EventData::decode(EventKind::StepStarted, json!({ "stage": "initial" })).is_err());
    }
}
