//! The mock provider: deterministic text from prompt and model after a configurable
//! latency. It makes development, tests and benchmarks independent of any network
//! and counts its calls, so tests can prove a finished step is never paid for twice.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{Completion, CompletionRequest, Provider, ProviderError};

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

pub struct MockProvider {
    latency: Duration,
    calls: AtomicU64,
}

impl MockProvider {
    pub fn new(latency: Duration) -> Self {
        Self { latency, calls: AtomicU64::new(0) }
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
    async fn complete(&self, request: &CompletionRequest<'_>) -> Result<Completion, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        let mut text = Self::answer(&request.model.id, request.prompt);
        let mut output_tokens = text.split_whitespace().count();
        if let Some(max) = request.max_tokens.map(|m| m as usize) {
            if output_tokens > max {
                text = text.split_whitespace().take(max).collect::<Vec<_>>().join(" ");
                output_tokens = max;
            }
        }
        Ok(Completion {
            text,
            input_tokens: request.prompt.split_whitespace().count().max(1) as i32,
            output_tokens: output_tokens as i32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_deterministic_and_differ_by_model() {
        assert_eq!(MockProvider::answer("mock/alpha", "hi"), MockProvider::answer("mock/alpha", "hi"));
        assert_ne!(MockProvider::answer("mock/alpha", "hi"), MockProvider::answer("mock/beta", "hi"));
        assert_ne!(MockProvider::answer("mock/alpha", "hi"), MockProvider::answer("mock/alpha", "hello"));
    }
}
