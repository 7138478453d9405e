//! LLM providers behind one trait. The worker asks the registry for the provider of
//! a model from the catalog; only the registry knows which implementations exist.

pub mod mock;

use std::sync::Arc;

use async_trait::async_trait;
use common::catalog::ModelSpec;
use serde_json::{json, Value};

pub use mock::MockProvider;

/// One provider call.
#[derive(Debug, Clone)]
pub struct CompletionRequest<'a> {
    pub model: &'a ModelSpec,
    pub prompt: &'a str,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
}

/// A finished answer with its token usage.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub input_tokens: i32,
    pub output_tokens: i32,
}

/// Why a call failed, and whether trying again could help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying later (timeouts, rate limits, overload).
    #[error("{code}: {message}")]
    Transient { code: &'static str, message: String },
    /// Retrying cannot help (bad request, authentication, refusal).
    #[error("{code}: {message}")]
    Permanent { code: &'static str, message: String },
}

impl ProviderError {
    /// The `{code, message}` stored on a failed step.
    pub fn to_json(&self) -> Value {
        let (code, message) = match self {
            ProviderError::Transient { code, message } | ProviderError::Permanent { code, message } => (code, message),
        };
        json!({ "code": code, "message": message })
    }
}

#[async_trait]
pub trait Provider: Send + Sync {
    async fn complete(&self, request: &CompletionRequest<'_>) -> Result<Completion, ProviderError>;
}

/// The providers this worker can call.
#[derive(Clone)]
pub struct Providers {
    mock: Arc<MockProvider>,
}

impl Providers {
    pub fn new(mock: Arc<MockProvider>) -> Self {
        Self { mock }
    }

    pub fn for_model(&self, model: &ModelSpec) -> Option<Arc<dyn Provider>> {
        match model.provider.as_str() {
            "mock" => Some(self.mock.clone()),
            _ => None,
        }
    }
}
