//! The mock provider: deterministic text from prompt and model, streamed after a
//! configurable latency at a configurable pace, failing at a configurable rate. It
//! makes development, tests and benchmarks independent of any network, and counts
//! its calls, so tests can prove a finished step is never paid for twice.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use common::catalog::ProviderSpec;
use futures::StreamExt;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::{CompletionRequest, EventStream, Provider, ProviderError, StreamEvent, Usage};

const WORDS: &[&str] = &[
    "analysis",
    "balance",
    "context",
    "evidence",
    "trade-off",
    "latency",
    "throughput",
    "risk",
    "signal",
    "model",
    "system",
    "design",
    "failure",
    "recovery",
    "queue",
    "state",
    "budget",
    "scale",
    "consistency",
    "insight",
    "however",
    "therefore",
    "notably",
    "in",
    "practice",
    "the",
    "a",
    "of",
    "and",
    "with",
    "under",
    "load",
];

/// How the mock behaves.
#[derive(Debug, Clone, Default)]
pub struct MockBehaviour {
    /// Before the first token.
    pub latency: Duration,
    /// Added to `latency`: uniformly random up to this.
    pub jitter: Duration,
    /// Streaming pace; 0 sends the whole answer at once.
    pub tokens_per_second: u32,
    /// Fraction of calls that fail, 0 to 1.
    pub failure_rate: f64,
    /// The error those calls fail with.
    pub failure: Option<ProviderError>,
    /// Text every answer starts with.
    pub prefix: Option<String>,
}

impl MockBehaviour {
    /// From a `[providers.<name>]` table of kind `mock`, defaulting the latency.
    pub fn from_spec(spec: &ProviderSpec, default_latency: Duration) -> Self {
        let failure = match spec.mock_failure_kind.as_deref() {
            Some("rate_limited") => ProviderError::RateLimited { retry_after: Some(Duration::from_secs(1)) },
            Some("timeout") => ProviderError::Timeout,
            Some("auth") => ProviderError::Auth,
            Some("bad_request") => ProviderError::BadRequest("mock failure".into()),
            _ => ProviderError::Overloaded { status: 503, detail: None },
        };
        Self {
            latency: spec.mock_latency_ms.map_or(default_latency, Duration::from_millis),
            jitter: Duration::from_millis(spec.mock_jitter_ms),
            tokens_per_second: spec.mock_tokens_per_second,
            failure_rate: spec.mock_failure_rate.clamp(0.0, 1.0),
            failure: Some(failure),
            prefix: spec.mock_prefix.clone(),
        }
    }
}

pub struct MockProvider {
    behaviour: MockBehaviour,
    calls: AtomicU64,
}

impl MockProvider {
    /// A mock that answers after `latency`, all at once, never failing.
    pub fn new(latency: Duration) -> Self {
        Self::with_behaviour(MockBehaviour { latency, ..MockBehaviour::default() })
    }

    pub fn with_behaviour(behaviour: MockBehaviour) -> Self {
        Self { behaviour, calls: AtomicU64::new(0) }
    }

    /// Provider calls made so far by this process.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The answer `model` gives to `prompt`: always the same for the same pair.
    pub fn answer(model: &str, prompt: &str) -> String {
        let seed =
            Sha256::new().chain_update(model.as_bytes()).chain_update([0]).chain_update(prompt.as_bytes()).finalize();
        let count = 12 + usize::from(seed[0]) % 24;
        let words: Vec<&str> =
            (0..count).map(|i| WORDS[usize::from(seed[(i + 1) % seed.len()] ^ i as u8) % WORDS.len()]).collect();
        format!("[{model}] {}.", words.join(" "))
    }
}

#[async_trait]
impl Provider for MockProvider {
    async fn stream(&self, request: &CompletionRequest<'_>) -> Result<EventStream, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let behaviour = &self.behaviour;
        let (jitter, fails) = {
            let mut rng = rand::rng();
            let jitter =
                if behaviour.jitter.is_zero() { Duration::ZERO } else { behaviour.jitter.mul_f64(rng.random()) };
            (jitter, behaviour.failure_rate > 0.0 && rng.random::<f64>() < behaviour.failure_rate)
        };
        tokio::time::sleep(behaviour.latency + jitter).await;
        if fails {
            return Err(behaviour.failure.clone().unwrap_or(ProviderError::Overloaded { status: 503, detail: None }));
        }

        let answer = Self::answer(&request.model.id, request.prompt);
        let answer = match &behaviour.prefix {
            Some(prefix) => format!("{prefix} {answer}"),
            None => answer,
        };
        let mut words: Vec<String> = answer.split(' ').map(str::to_owned).collect();
        if let Some(max) = request.max_tokens {
            words.truncate(max.max(1) as usize);
        }
        let usage = Usage {
            input_tokens: request.prompt.split_whitespace().count().max(1) as i32,
            output_tokens: words.len() as i32,
        };
        let pause = (behaviour.tokens_per_second > 0)
            .then(|| Duration::from_secs_f64(1.0 / f64::from(behaviour.tokens_per_second)));
        let deltas: Vec<String> = match pause {
            // Token by token, each with its leading space, as real providers stream.
            Some(_) => {
                words.iter().enumerate().map(|(i, w)| if i == 0 { w.clone() } else { format!(" {w}") }).collect()
            }
            None => vec![words.join(" ")],
        };
        let deltas = futures::stream::iter(deltas).then(move |delta| async move {
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
            Ok(StreamEvent::Delta(delta))
        });
        let done =
            futures::stream::once(async move { Ok(StreamEvent::Done { usage, finish_reason: Some("stop".into()) }) });
        Ok(deltas.chain(done).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::collect;

    #[test]
    fn answers_are_deterministic_and_differ_by_model() {
        assert_eq!(MockProvider::answer("mock/alpha", "hi"), MockProvider::answer("mock/alpha", "hi"));
        assert_ne!(MockProvider::answer("mock/alpha", "hi"), MockProvider::answer("mock/beta", "hi"));
        assert_ne!(MockProvider::answer("mock/alpha", "hi"), MockProvider::answer("mock/alpha", "hello"));
    }

    #[tokio::test]
    async fn streamed_deltas_add_up_to_the_answer() {
        let catalog = common::catalog::Catalog::builtin();
        let model = catalog.get("mock/alpha").expect("model");
        let mock = MockProvider::with_behaviour(MockBehaviour { tokens_per_second: 1000, ..MockBehaviour::default() });
        let request = CompletionRequest::new(model, "hi there");
        let mut deltas = 0;
        let completion =
            collect(mock.stream(&request).await.expect("stream"), |_| deltas += 1).await.expect("completes");
        assert_eq!(completion.text, MockProvider::answer("mock/alpha", "hi there"));
        assert_eq!(deltas, completion.output_tokens);
        assert_eq!(completion.input_tokens, 2);
    }

    /// Two mock providers in one file: each answers as its own table says (they
    /// shared the first table's behaviour once).
    #[tokio::test]
    async fn each_mock_provider_behaves_as_its_own_table_says() {
        let file = r#"
            [providers.plain]
            kind = "mock"
            [providers.marked]
            kind = "mock"
            mock_prefix = "<b>marked</b>"
            [[models]]
            id = "plain/a"
            provider = "plain"
            upstream = "a"
            [[models]]
            id = "marked/a"
            provider = "marked"
            upstream = "a"
        "#;
        let catalog = common::catalog::Catalog::from_file(toml::from_str(file).expect("TOML")).expect("catalog");
        let providers = crate::providers::Providers::from_catalog(&catalog, Duration::ZERO, None).expect("providers");
        for (id, prefixed) in [("plain/a", false), ("marked/a", true)] {
            let model = catalog.get(id).expect("model");
            let provider = providers.for_model(model).expect("provider");
            let request = CompletionRequest::new(model, "hi");
            let answer = provider.complete(&request, |_| ()).await.expect("answer");
            assert_eq!(answer.text.starts_with("<b>marked</b> "), prefixed, "{id} answered {:?}", answer.text);
        }
    }

    #[tokio::test]
    async fn a_failure_rate_of_one_always_fails_with_the_configured_kind() {
        let catalog = common::catalog::Catalog::builtin();
        let model = catalog.get("mock/alpha").expect("model");
        let mock = MockProvider::with_behaviour(MockBehaviour {
            failure_rate: 1.0,
            failure: Some(ProviderError::Auth),
            ..MockBehaviour::default()
        });
        let request = CompletionRequest::new(model, "hi");
        assert_eq!(mock.stream(&request).await.err(), Some(ProviderError::Auth));
    }
}
