//! The response cache: opt-in per request (`options.cache: true`), in Redis, keyed by
//! a hash of everything that shapes the answer — model, upstream name, prompt and
//! generation parameters — and of the user who asked. Only answers are stored, never
//! errors. A hit costs nothing and is marked on its step, so it is kept per user: a
//! shared entry would tell one user that another had asked the same prompt. Without
//! Redis the cache is simply empty.

use std::time::Duration;

use common::redis::RedisHandle;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::providers::{Completion, CompletionRequest};

#[derive(Clone)]
pub struct ResponseCache {
    redis: RedisHandle,
    prefix: String,
    ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    text: String,
    input_tokens: i32,
    output_tokens: i32,
    finish_reason: Option<String>,
}

impl ResponseCache {
    pub fn new(redis: RedisHandle, prefix: &str, ttl: Duration) -> Self {
        Self { redis, prefix: format!("{prefix}:cache:"), ttl }
    }

    pub fn key(&self, user_id: Uuid, request: &CompletionRequest<'_>) -> String {
        let identity = serde_json::json!([
            user_id,
            request.model.id,
            request.model.upstream,
            request.prompt,
            request.messages,
            request.temperature,
            request.top_p,
            request.max_tokens,
            request.stop,
        ]);
        let digest = Sha256::digest(identity.to_string().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}", self.prefix)
    }

    /// The answer stored under `key` (from `key`: computed once per call, for the
    /// lookup and the store after it).
    pub async fn get(&self, key: &str) -> Option<Completion> {
        let raw = self.redis.get_string(key).await.ok()??;
        let stored: Stored = serde_json::from_str(&raw).ok()?;
        Some(Completion {
            text: stored.text,
            input_tokens: stored.input_tokens,
            output_tokens: stored.output_tokens,
            finish_reason: stored.finish_reason,
        })
    }

    pub async fn put(&self, key: &str, completion: &Completion) {
        let stored = Stored {
            text: completion.text.clone(),
            input_tokens: completion.input_tokens,
            output_tokens: completion.output_tokens,
            finish_reason: completion.finish_reason.clone(),
        };
        let Ok(raw) = serde_json::to_string(&stored) else { return };
        if let Err(err) = self.redis.set_string(key, &raw, self.ttl).await {
            tracing::debug!(error = %err, "answer not cached (redis unavailable)");
        }
    }
}
