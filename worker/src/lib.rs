//! The Ultra worker: consumes analyze jobs from RabbitMQ, runs them through the
//! providers, and records every step and result in PostgreSQL. Workers are
//! stateless: run as many as the queue needs.

pub mod cache;
pub mod consumer;
pub mod health;
pub mod pipeline;
pub mod providers;

use std::sync::{atomic::AtomicBool, Arc};

use anyhow::Context;
use common::{
    catalog::{Catalog, ProviderKind},
    db,
    events::EventPublisher,
    redis::RedisHandle,
    Config,
};
use poem::{listener::TcpAcceptor, Server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    consumer::Consumer,
    pipeline::JobContext,
    providers::{guard::CircuitBoard, mock::MockBehaviour, MockProvider, Providers},
};

/// A worker with its providers, ready to run.
pub struct Worker {
    config: Arc<Config>,
    /// Replaces the configured providers (tests keep a handle on the mock).
    providers: Option<Providers>,
}

impl Worker {
    /// A worker with the providers the configuration names.
    pub fn new(config: Arc<Config>) -> Self {
        Self { config, providers: None }
    }

    /// Replaces the providers (tests keep a handle on the mock to count its calls).
    pub fn with_providers(mut self, providers: Providers) -> Self {
        self.providers = Some(providers);
        self
    }

    /// Consumes until `shutdown`; serves health on `health_listener` if given (in
    /// `ultra all` the api's health endpoints cover the process).
    pub async fn run(self, health_listener: Option<TcpListener>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = self.config;
        common::metrics::install();
        let pool = db::connect_and_prepare(&config.database_url, &shutdown).await?;
        let redis = RedisHandle::new(&config.redis_url).context("invalid REDIS_URL")?;
        let catalog = Catalog::load(config.config_file.as_deref()).map_err(anyhow::Error::msg)?;
        let providers = match self.providers {
            Some(providers) => providers,
            None => {
                let mock_spec = catalog.providers().find(|(_, p)| p.kind == ProviderKind::Mock).map(|(_, p)| p.clone());
                let behaviour = mock_spec.map_or_else(
                    || MockBehaviour { latency: config.mock_latency(), ..MockBehaviour::default() },
                    |spec| MockBehaviour::from_spec(&spec, config.mock_latency()),
                );
                let board = CircuitBoard { redis: redis.clone(), prefix: config.redis_prefix.clone() };
                Providers::from_catalog(&catalog, Arc::new(MockProvider::with_behaviour(behaviour)), Some(board))
                    .context("cannot build the providers' HTTP clients")?
            }
        };
        let connected = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(JobContext {
            pool: pool.clone(),
            events: EventPublisher::new(redis.clone(), config.redis_prefix.clone()),
            providers,
            catalog: catalog.clone(),
            cache: cache::ResponseCache::new(redis.clone(), &config.redis_prefix, config.cache_ttl()),
            patterns: common::patterns::Patterns::load(config.config_file.as_deref()).map_err(anyhow::Error::msg)?,
            worker_id: Uuid::new_v4(),
            max_attempts: config.max_attempts.max(1),
            default_min_models: config.min_models.max(1),
            running: pipeline::RunningJobs::default(),
            log_prompts: config.log_prompts,
        });
        // Runs until the consumer has drained, so jobs finishing after shutdown keep their
        // leases and still see cancellations.
        let watcher_stop = CancellationToken::new();
        let watcher = tokio::spawn(pipeline::watch(ctx.clone(), watcher_stop.clone()));
        let consumer = Consumer { config: config.clone(), ctx, connected: connected.clone() };

        let health = match health_listener {
            Some(listener) => {
                let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(%address, "worker health listening");
                let routes = health::routes(health::HealthState {
                    pool: pool.clone(),
                    redis,
                    consuming: connected,
                    metrics_token: config.metrics_token.clone(),
                });
                let server = Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?);
                let stop = shutdown.clone();
                Some(tokio::spawn(async move {
                    server.run_with_graceful_shutdown(routes, stop.cancelled_owned(), None).await
                }))
            }
            None => None,
        };

        consumer.run(shutdown.clone()).await;
        watcher_stop.cancel();
        watcher.await.context("job watcher task")?;
        if let Some(health) = health {
            health.await.context("health server task")?.context("health server")?;
        }
        pool.close().await;
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Runs a worker with the configured providers.
pub async fn run(
    config: Arc<Config>,
    health_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Worker::new(config).run(health_listener, shutdown).await
}
