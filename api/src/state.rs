//! Everything a request handler needs, built once per process.

use std::sync::Arc;

use anyhow::Context;
use common::{
    catalog::Catalog,
    events::EventPublisher,
    queue::{Publisher, Topology},
    redis::RedisHandle,
    tiers::Tiers,
    Config, Settings,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{jwt::JwtService, password::Passwords},
    hub::EventHub,
    limits::RateLimiter,
};

/// Password hashes computed at once (each holds ~19 MiB for a moment).
const PASSWORD_HASHES_AT_ONCE: usize = 4;

/// What handlers share. `config`, `catalog`, `tiers` and `patterns` are copies of the
/// process's `Settings`, made once in `build`: fields of their own, as every handler
/// reads them.
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
    /// Confirmed RabbitMQ publisher, shared by the submit fast path and the relay.
    pub publisher: Publisher,
    pub redis: RedisHandle,
    /// Publishes the `queued` event live.
    pub events: EventPublisher,
    /// This process's one Redis subscription, fanned out to its SSE streams.
    pub hub: Arc<EventHub>,
    pub catalog: Catalog,
    pub tiers: Tiers,
    pub patterns: common::patterns::Patterns,
    /// What a `ultra/<pattern>` chat completion runs over when it names no models:
    /// `ULTRA_DEFAULT_MODELS`, else the catalog's models that have a key.
    pub default_models: Vec<String>,
    pub jwt: JwtService,
    pub passwords: Passwords,
    pub limiter: RateLimiter,
    /// Open event streams per user in this process.
    pub streams: Arc<crate::stream::limit::StreamCounter>,
    /// Cancelled on shutdown: open streams end so the server can stop.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Connects to PostgreSQL (creating and migrating the database if needed) and sets
    /// up Redis and the RabbitMQ publisher, which connect on first use.
    pub async fn build(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let config = &settings.config;
        // What cannot work is refused before waiting for the database.
        let jwt_keys = config.jwt_keys().map_err(anyhow::Error::msg)?;
        let redis = RedisHandle::new(&config.redis_url).context("invalid REDIS_URL")?;
        let pool = common::db::connect_and_prepare(&config.database_url, config.db_pool_size, &shutdown).await?;
        let configured: Vec<String> =
            config.default_models.iter().map(|m| m.trim().to_owned()).filter(|m| !m.is_empty()).collect();
        let catalog = &settings.catalog;
        let default_models = if configured.is_empty() {
            catalog.models().filter(|m| catalog.has_key(&m.provider)).map(|m| m.id.clone()).collect()
        } else {
            configured
        };
        Ok(Self {
            pool,
            default_models,
            publisher: Publisher::new(config.amqp_url.clone(), Topology::new(&config.queue_prefix)),
            events: EventPublisher::new(redis.clone(), config.redis_prefix.clone()),
            hub: Arc::new(EventHub::default()),
            catalog: settings.catalog.clone(),
            tiers: settings.tiers.clone(),
            patterns: settings.patterns.clone(),
            jwt: JwtService::new(&jwt_keys, &config.jwt_issuer, &config.jwt_audience, config.access_token_ttl()),
            passwords: Passwords::new(PASSWORD_HASHES_AT_ONCE),
            limiter: RateLimiter::new(redis.clone(), &config.redis_prefix),
            streams: Arc::default(),
            redis,
            shutdown,
            config: Arc::new(config.clone()),
        })
    }
}
