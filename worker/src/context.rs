//! What a worker process builds from its settings before it consumes: the providers
//! and the job context every delivery runs in.

use std::sync::Arc;

use anyhow::Context;
use common::{catalog::ProviderKind, events::EventPublisher, redis::RedisHandle, Settings};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    cache::ResponseCache,
    pipeline::{JobContext, RunningJobs},
    providers::{guard::CircuitBoard, mock::MockBehaviour, MockProvider, Providers},
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
/// mirrored in Redis. The mock behaves as its provider table says, or waits
/// `ULTRA_MOCK_LATENCY_MS`.
pub fn configured_providers(settings: &Settings, redis: &RedisHandle) -> anyhow::Result<Providers> {
    let (config, catalog) = (&settings.config, &settings.catalog);
    let mock_spec = catalog.providers().find(|(_, p)| p.kind == ProviderKind::Mock).map(|(_, p)| p);
    let behaviour = mock_spec.map_or_else(
        || MockBehaviour { latency: config.mock_latency(), ..MockBehaviour::default() },
        |spec| MockBehaviour::from_spec(spec, config.mock_latency()),
    );
    let board = CircuitBoard { redis: redis.clone(), prefix: config.redis_prefix.clone() };
    Providers::from_catalog(catalog, Arc::new(MockProvider::with_behaviour(behaviour)), Some(board))
        .context("cannot build the providers' HTTP clients")
}
