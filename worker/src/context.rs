//! What a worker process builds from its settings before it consumes: the providers
//! and the job context every delivery runs in.

use anyhow::Context;
use common::{events::EventPublisher, redis::RedisHandle, Settings};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    cache::ResponseCache,
    pipeline::{JobContext, RunningJobs},
    providers::{guard::CircuitBoard, Providers},
};

impl JobContext {
    /// The context jobs run in, over a connected pool and Redis, with `providers`
    /// (`configured_providers`, or a test's own).
    pub fn build(settings: &Settings, pool: PgPool, redis: &RedisHandle, providers: Providers) -> Self {
        let config = &settings.config;
        Self {
            pool,
            events: EventPublisher::new(redis.clone(), config.redis_prefix.clone()),
            providers,
            catalog: settings.catalog.clone(),
            cache: ResponseCache::new(redis.clone(), &config.redis_prefix, config.cache_ttl()),
            patterns: settings.patterns.clone(),
            worker_id: Uuid::new_v4(),
            max_attempts: config.max_attempts.max(1),
            // At least 1: `JobOptions::quorum` sees to it.
            default_min_models: config.min_models,
            running: RunningJobs::default(),
            log_prompts: config.log_prompts,
        }
    }
}

/// The providers the catalog configures, each behind its guard, with circuit states
/// mirrored in Redis. A mock behaves as its provider table says, or waits
/// `ULTRA_MOCK_LATENCY_MS`.
pub fn configured_providers(settings: &Settings, redis: &RedisHandle) -> anyhow::Result<Providers> {
    let board = CircuitBoard { redis: redis.clone(), prefix: settings.config.redis_prefix.clone() };
    Providers::from_catalog(&settings.catalog, settings.config.mock_latency(), Some(board))
        .context("cannot build the providers' HTTP clients")
}
