//! The model catalog: which models a job may name, which provider serves each, at
//! what price and within which limits. It comes from the operator's configuration
//! file (`ULTRA_CONFIG_FILE`: `[providers.<name>]` tables and `[[models]]` entries,
//! read by `common::settings`); API keys come from the environment variables the file
//! names, never from the file or a request. Without any configured model, the catalog
//! is the three deterministic mock models — the default for development, refused in
//! production.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI Chat Completions, and every server compatible with it (Ollama, vLLM,
    /// LM Studio, OpenRouter, DeepSeek, Mistral, Groq, …).
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini (`generateContent`).
    Gemini,
    /// The deterministic in-process mock.
    Mock,
}

/// How to reach one provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The environment variable holding the API key (the key itself is never configured).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Calls in flight to this provider from one worker process.
    #[serde(default = "default_provider_concurrency")]
    pub concurrency: u32,
    /// Longest a whole call may take.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Longest to wait for the first byte of the answer.
    #[serde(default = "default_first_byte_secs")]
    pub first_byte_timeout_secs: u64,
    /// Consecutive failures that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit waits before letting one call through.
    #[serde(default = "default_breaker_cooldown_secs")]
    pub breaker_cooldown_secs: u64,
    /// OpenAI-compatible only: ask for usage in the stream (`stream_options`). Some
    /// servers (Mistral) refuse the field: set `false`, and usage is estimated.
    #[serde(default = "enabled")]
    pub stream_usage: bool,
    /// OpenAI-compatible only: the request field for the output limit — `max_tokens`,
    /// or `max_completion_tokens` for OpenAI's reasoning models.
    #[serde(default = "default_max_tokens_field")]
    pub max_tokens_field: String,
    /// Gemini only: `false` calls the unary `generateContent` instead of streaming
    /// (for proxies that cannot stream).
    #[serde(default = "enabled")]
    pub streaming: bool,
    /// Mock only: simulated latency before the first token, in milliseconds.
    #[serde(default)]
    pub mock_latency_ms: Option<u64>,
    /// Mock only: extra random latency, up to this many milliseconds.
    #[serde(default)]
    pub mock_jitter_ms: u64,
    /// Mock only: tokens streamed per second (0: all at once).
    #[serde(default)]
    pub mock_tokens_per_second: u32,
    /// Mock only: fraction of calls that fail, 0 to 1.
    #[serde(default)]
    pub mock_failure_rate: f64,
    /// Mock only: how they fail: `rate_limited`, `overloaded`, `timeout`, `auth`, `bad_request`.
    #[serde(default)]
    pub mock_failure_kind: Option<String>,
    /// Mock only: text every answer starts with (to see how a client shows a given
    /// text, markup included).
    #[serde(default)]
    pub mock_prefix: Option<String>,
}

fn default_max_tokens_field() -> String {
    "max_tokens".to_owned()
}
fn default_provider_concurrency() -> u32 {
    64
}
fn default_timeout_secs() -> u64 {
    300
}
fn default_first_byte_secs() -> u64 {
    60
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown_secs() -> u64 {
    30
}

/// One model a job may name, as `provider/name`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The id clients use, e.g. `openai/gpt-4o-mini`.
    pub id: String,
    /// The provider (a key of `[providers]`) that serves it.
    pub provider: String,
    /// The provider's own name for the model.
    pub upstream: String,
    #[serde(default)]
    pub description: String,
    /// US dollars per million input tokens.
    #[serde(default)]
    pub input_price_per_mtok: f64,
    /// US dollars per million output tokens.
    #[serde(default)]
    pub output_price_per_mtok: f64,
    /// Tokens the model reads and writes in one call.
    #[serde(default = "default_context_window")]
    pub context_window: u32,
    /// Most tokens the model writes in one answer.
    #[serde(default = "default_max_output")]
    pub max_output_tokens: u32,
    /// Calls in flight to this model from one worker process.
    #[serde(default = "default_model_concurrency")]
    pub concurrency: u32,
    #[serde(default = "enabled")]
    pub enabled: bool,
}

fn default_context_window() -> u32 {
    128_000
}
fn default_max_output() -> u32 {
    4_096
}
fn default_model_concurrency() -> u32 {
    32
}
fn enabled() -> bool {
    true
}

impl ModelSpec {
    /// Cost of a call in millionths of a US dollar.
    pub fn cost_micros(&self, input_tokens: i64, output_tokens: i64) -> i64 {
        // Rounded up: a budget must never be undercharged.
        (input_tokens as f64 * self.input_price_per_mtok + output_tokens as f64 * self.output_price_per_mtok).ceil()
            as i64
    }
}

/// The Redis key a worker sets while a provider's circuit breaker is open (it
/// expires with the cool-down), so every api replica can report it.
pub fn circuit_key(redis_prefix: &str, provider: &str) -> String {
    format!("{redis_prefix}:circuit:{provider}")
}

#[derive(Debug, Clone)]
pub struct Catalog {
    providers: BTreeMap<String, ProviderSpec>,
    models: Vec<ModelSpec>,
}

/// The catalog's part of the configuration file; its other tables are ignored here.
#[derive(Debug, Default, Deserialize)]
pub struct CatalogFile {
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderSpec>,
    #[serde(default)]
    pub models: Vec<ModelSpec>,
}

/// What can be wrong with the catalog a file defines (its TOML being well-formed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogProblem {
    #[error("model `{0}` is defined twice")]
    DuplicateModel(String),
    #[error("model `{0}` has a negative price")]
    NegativePrice(String),
    #[error("model `{model}` names unknown provider `{provider}`")]
    UnknownProvider { model: String, provider: String },
    #[error("provider `{0}` has no base_url")]
    NoBaseUrl(String),
    #[error("provider `{0}`: timeouts must be at least 1 second")]
    ZeroTimeout(String),
    #[error("provider `{0}`: base_url must be an http(s) URL")]
    NotHttp(String),
}

impl Catalog {
    /// The built-in catalog: three mock models with distinct, deterministic voices.
    pub fn builtin() -> Self {
        let mock = |name: &str, description: &str| ModelSpec {
            id: format!("mock/{name}"),
            provider: "mock".to_owned(),
            upstream: name.to_owned(),
            description: description.to_owned(),
            input_price_per_mtok: 0.0,
            output_price_per_mtok: 0.0,
            context_window: default_context_window(),
            max_output_tokens: default_max_output(),
            concurrency: 1_000,
            enabled: true,
        };
        let provider = ProviderSpec {
            kind: ProviderKind::Mock,
            base_url: None,
            api_key_env: None,
            concurrency: 10_000,
            timeout_secs: default_timeout_secs(),
            first_byte_timeout_secs: default_first_byte_secs(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_secs: default_breaker_cooldown_secs(),
            streaming: true,
            stream_usage: true,
            max_tokens_field: default_max_tokens_field(),
            mock_latency_ms: None,
            mock_jitter_ms: 0,
            mock_tokens_per_second: 0,
            mock_prefix: None,
            mock_failure_rate: 0.0,
            mock_failure_kind: None,
        };
        Self {
            providers: BTreeMap::from([("mock".to_owned(), provider)]),
            models: vec![
                mock("alpha", "Deterministic mock model for development and tests."),
                mock("beta", "Deterministic mock model with a different seed."),
                mock("gamma", "Deterministic mock model with a third seed."),
            ],
        }
    }

    /// The catalog the file defines, or the built-in mock catalog if it defines no
    /// models. Every problem found is reported at once.
    pub fn from_file(file: CatalogFile) -> Result<Self, Vec<CatalogProblem>> {
        if file.models.is_empty() {
            return Ok(Self::builtin());
        }
        let catalog = Self { providers: file.providers, models: file.models };
        let problems = catalog.problems();
        if problems.is_empty() {
            Ok(catalog)
        } else {
            Err(problems)
        }
    }

    fn problems(&self) -> Vec<CatalogProblem> {
        let mut problems = Vec::new();
        for (index, model) in self.models.iter().enumerate() {
            if self.models[..index].iter().any(|m| m.id == model.id) {
                problems.push(CatalogProblem::DuplicateModel(model.id.clone()));
            }
            if model.input_price_per_mtok < 0.0 || model.output_price_per_mtok < 0.0 {
                problems.push(CatalogProblem::NegativePrice(model.id.clone()));
            }
            match self.providers.get(&model.provider) {
                None => problems.push(CatalogProblem::UnknownProvider {
                    model: model.id.clone(),
                    provider: model.provider.clone(),
                }),
                Some(p) if p.kind != ProviderKind::Mock && p.base_url.is_none() => {
                    problems.push(CatalogProblem::NoBaseUrl(model.provider.clone()))
                }
                Some(_) => {}
            }
        }
        for (name, provider) in &self.providers {
            if provider.first_byte_timeout_secs == 0 || provider.timeout_secs == 0 {
                problems.push(CatalogProblem::ZeroTimeout(name.clone()));
            }
            if let Some(url) = &provider.base_url {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    problems.push(CatalogProblem::NotHttp(name.clone()));
                }
            }
        }
        problems.dedup();
        problems
    }

    /// Enabled models, in configuration order.
    pub fn models(&self) -> impl Iterator<Item = &ModelSpec> {
        self.models.iter().filter(|m| m.enabled)
    }

    /// An enabled model by id.
    pub fn get(&self, id: &str) -> Option<&ModelSpec> {
        self.models().find(|m| m.id == id)
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderSpec> {
        self.providers.get(name)
    }

    pub fn providers(&self) -> impl Iterator<Item = (&str, &ProviderSpec)> {
        self.providers.iter().map(|(name, spec)| (name.as_str(), spec))
    }

    /// Whether any enabled model is served by the mock (production refuses this).
    pub fn uses_mock(&self) -> bool {
        self.models().any(|m| self.provider(&m.provider).is_some_and(|p| p.kind == ProviderKind::Mock))
    }

    /// Whether the provider's API key is present in the environment (or none is needed).
    pub fn has_key(&self, provider: &str) -> bool {
        match self.provider(provider) {
            Some(ProviderSpec { kind: ProviderKind::Mock, .. }) => true,
            Some(ProviderSpec { api_key_env: None, .. }) => true, // e.g. a local Ollama
            Some(ProviderSpec { api_key_env: Some(var), .. }) => {
                std::env::var(var).is_ok_and(|key| !key.trim().is_empty())
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Catalog, Vec<CatalogProblem>> {
        Catalog::from_file(toml::from_str(text).expect("well-formed"))
    }

    #[test]
    fn a_file_defines_providers_and_models() {
        let catalog = load(
            r#"
[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "ULTRA_TEST_NO_SUCH_KEY"

[[models]]
id = "openai/gpt-4o-mini"
provider = "openai"
upstream = "gpt-4o-mini"
input_price_per_mtok = 0.15
output_price_per_mtok = 0.60
context_window = 128000
"#,
        )
        .expect("loads");
        let model = catalog.get("openai/gpt-4o-mini").expect("model");
        assert_eq!(model.cost_micros(1_000_000, 1_000_000), 750_000);
        assert!(!catalog.uses_mock());
        assert!(!catalog.has_key("openai"), "the key variable is not set");
        assert!(catalog.get("mock/alpha").is_none());
    }

    #[test]
    fn problems_are_reported_together() {
        let problems = load(
            "[providers.x]\nkind = \"openai\"\n[[models]]\nid = \"x/a\"\nprovider = \"x\"\nupstream = \"a\"\n\
             [[models]]\nid = \"y/b\"\nprovider = \"y\"\nupstream = \"b\"\n",
        )
        .expect_err("invalid");
        assert!(problems.contains(&CatalogProblem::NoBaseUrl("x".to_owned())), "{problems:?}");
        let unknown = CatalogProblem::UnknownProvider { model: "y/b".to_owned(), provider: "y".to_owned() };
        assert!(problems.contains(&unknown), "{problems:?}");
    }

    #[test]
    fn without_models_the_mock_catalog_applies() {
        let catalog = Catalog::from_file(CatalogFile::default()).expect("builtin");
        assert!(catalog.uses_mock());
        assert_eq!(catalog.models().count(), 3);
    }
}
