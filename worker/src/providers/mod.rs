//! LLM providers behind one streaming-first trait. A call yields text deltas as they
//! arrive and ends with the usage and finish reason; `ProviderError` says what went
//! wrong and whether trying again can help. `Providers` builds one client per
//! configured provider and wraps each in its defences (`guard`): concurrency limits,
//! timeouts and a circuit breaker.

pub mod anthropic;
pub mod gemini;
pub mod guard;
pub mod http;
pub mod mock;
pub mod openai;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use common::{
    catalog::{Catalog, ModelSpec, ProviderKind},
    domain::{ChatRole, ErrorCode},
    job::{ChatMessage, StepError},
};
use futures::{stream::BoxStream, StreamExt};

pub use guard::Guarded;
pub use mock::MockProvider;

/// One provider call.
#[derive(Debug, Clone)]
pub struct CompletionRequest<'a> {
    pub model: &'a ModelSpec,
    /// The prompt as one text: what the model is asked, or, for a chat, its transcript
    /// (the mock answers it; token estimates count it).
    pub prompt: &'a str,
    /// A chat's messages, sent instead of `prompt` as one user message when not empty.
    pub messages: &'a [ChatMessage],
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    /// Sequences that end the answer.
    pub stop: &'a [String],
}

impl<'a> CompletionRequest<'a> {
    /// `prompt` alone, with the provider's defaults.
    pub fn new(model: &'a ModelSpec, prompt: &'a str) -> Self {
        Self { model, prompt, messages: &[], temperature: None, top_p: None, max_tokens: None, stop: &[] }
    }

    /// What the model reads, as chat turns: the messages, or the prompt as the user's.
    pub fn turns(&self) -> Vec<(ChatRole, &'a str)> {
        if self.messages.is_empty() {
            return vec![(ChatRole::User, self.prompt)];
        }
        self.messages.iter().map(|m| (m.role, m.content.as_str())).collect()
    }

    /// The turns as Anthropic's and Gemini's APIs take them: the system messages as one
    /// instruction, and the rest with consecutive turns of one role merged (both
    /// require user and assistant to alternate).
    pub fn system_and_dialogue(&self) -> (Option<String>, Vec<(ChatRole, String)>) {
        let mut system: Vec<&str> = Vec::new();
        let mut dialogue: Vec<(ChatRole, String)> = Vec::new();
        for (role, content) in self.turns() {
            match (role, dialogue.last_mut()) {
                (ChatRole::System, _) => system.push(content),
                (role, Some((last, text))) if *last == role => {
                    text.push_str("\n\n");
                    text.push_str(content);
                }
                (role, _) => dialogue.push((role, content.to_owned())),
            }
        }
        ((!system.is_empty()).then(|| system.join("\n\n")), dialogue)
    }
}

/// Token usage as the provider reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: i32,
    pub output_tokens: i32,
}

/// What a streaming call yields: text as it arrives, then the end.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Delta(String),
    Done { usage: Usage, finish_reason: Option<String> },
}

/// A finished answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub input_tokens: i32,
    pub output_tokens: i32,
    pub finish_reason: Option<String>,
}

/// Why a call failed. The first four are worth retrying; the rest are not.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("rate limited by the provider")]
    RateLimited { retry_after: Option<Duration> },
    /// `detail`: a short, redacted excerpt of what the provider said (`http::excerpt`),
    /// so a user sees why, not only the status.
    #[error("the provider is overloaded or failing ({status}){}", detail_suffix(.detail))]
    Overloaded { status: u16, detail: Option<String> },
    #[error("the provider did not answer in time")]
    Timeout,
    #[error("cannot reach the provider: {0}")]
    Connection(String),
    #[error("the provider refused the credentials")]
    Auth,
    #[error("the provider refused the request: {0}")]
    BadRequest(String),
    #[error("the provider refused to answer (content filter)")]
    ContentFiltered,
    #[error("the prompt does not fit the model's context window: {0}")]
    ContextTooLong(String),
    #[error("the answer stream broke off: {0}")]
    Truncated(String),
    #[error("the circuit breaker for this provider is open")]
    CircuitOpen,
}

impl ProviderError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. }
                | ProviderError::Overloaded { .. }
                | ProviderError::Timeout
                | ProviderError::Connection(_)
                | ProviderError::Truncated(_)
                | ProviderError::CircuitOpen
        )
    }

    /// How long the provider asked us to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// The same error with `secret` (an API key a provider echoed back) blanked out
    /// of its message, so it cannot reach a log or a client.
    pub fn redact(self, secret: Option<&str>) -> Self {
        let Some(secret) = secret.filter(|s| s.len() >= 8) else { return self };
        let clean = |message: String| message.replace(secret, "[redacted]");
        match self {
            ProviderError::Connection(m) => ProviderError::Connection(clean(m)),
            ProviderError::BadRequest(m) => ProviderError::BadRequest(clean(m)),
            ProviderError::ContextTooLong(m) => ProviderError::ContextTooLong(clean(m)),
            ProviderError::Truncated(m) => ProviderError::Truncated(clean(m)),
            ProviderError::Overloaded { status, detail } => {
                ProviderError::Overloaded { status, detail: detail.map(clean) }
            }
            other => other,
        }
    }

    /// A stable code for clients and metrics.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProviderError::RateLimited { .. } => ErrorCode::RateLimited,
            ProviderError::Overloaded { .. } => ErrorCode::Overloaded,
            ProviderError::Timeout => ErrorCode::Timeout,
            ProviderError::Connection(_) => ErrorCode::Connection,
            ProviderError::Auth => ErrorCode::Auth,
            ProviderError::BadRequest(_) => ErrorCode::BadRequest,
            ProviderError::ContentFiltered => ErrorCode::ContentFiltered,
            ProviderError::ContextTooLong(_) => ErrorCode::ContextTooLong,
            ProviderError::Truncated(_) => ErrorCode::Truncated,
            ProviderError::CircuitOpen => ErrorCode::CircuitOpen,
        }
    }

    /// The error stored on the failed step.
    pub fn to_step_error(&self) -> StepError {
        StepError {
            code: self.code(),
            message: self.to_string(),
            retryable: self.is_retryable(),
            retry_after_ms: self.retry_after().map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            attempts: Vec::new(),
        }
    }
}

/// `: detail`, or nothing: how `Overloaded` ends its message.
fn detail_suffix(detail: &Option<String>) -> String {
    detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

pub type EventStream = BoxStream<'static, Result<StreamEvent, ProviderError>>;

#[async_trait]
pub trait Provider: Send + Sync {
    /// Starts a call; the stream yields deltas, then exactly one `Done`, or an error.
    async fn stream(&self, request: &CompletionRequest<'_>) -> Result<EventStream, ProviderError>;
}

/// Drains a call's stream into a completion, handing each delta to `on_delta`. A
/// stream that ends without `Done` is an error, never a silently short answer.
pub async fn collect(mut stream: EventStream, mut on_delta: impl FnMut(&str)) -> Result<Completion, ProviderError> {
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::Delta(delta) => {
                on_delta(&delta);
                text.push_str(&delta);
            }
            StreamEvent::Done { usage, finish_reason } => {
                return Ok(Completion {
                    text,
                    input_tokens: usage.input_tokens,
                    output_tokens: usage.output_tokens,
                    finish_reason,
                })
            }
        }
    }
    Err(ProviderError::Truncated("the stream ended without its terminator".into()))
}

/// The providers this worker can call, each behind its guard.
#[derive(Clone)]
pub struct Providers {
    by_name: HashMap<String, Arc<Guarded>>,
}

impl Providers {
    /// One client per configured provider; each mock provider behaves as its own
    /// table says, waiting `mock_latency` where it names no latency.
    pub fn from_catalog(
        catalog: &Catalog,
        mock_latency: std::time::Duration,
        redis: Option<guard::CircuitBoard>,
    ) -> reqwest::Result<Self> {
        let mut by_name = HashMap::new();
        for (name, spec) in catalog.providers() {
            let client: Arc<dyn Provider> = match spec.kind {
                ProviderKind::Mock => {
                    Arc::new(MockProvider::with_behaviour(mock::MockBehaviour::from_spec(spec, mock_latency)))
                }
                ProviderKind::Openai => Arc::new(openai::OpenAi::new(spec)?),
                ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(spec)?),
                ProviderKind::Gemini => Arc::new(gemini::Gemini::new(spec)?),
            };
            by_name.insert(name.to_owned(), Arc::new(Guarded::new(name, spec, client, catalog, redis.clone())));
        }
        Ok(Self { by_name })
    }

    /// Just the mock, for tests and benchmarks.
    pub fn new(mock: Arc<MockProvider>) -> Self {
        let by_name = Catalog::builtin()
            .providers()
            .map(|(name, spec)| {
                let client: Arc<dyn Provider> = mock.clone();
                (name.to_owned(), Arc::new(Guarded::new(name, spec, client, &Catalog::builtin(), None)))
            })
            .collect();
        Self { by_name }
    }

    pub fn for_model(&self, model: &ModelSpec) -> Option<Arc<Guarded>> {
        self.by_name.get(&model.provider).cloned()
    }
}
