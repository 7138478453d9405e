//! The Ultra worker: consumes analyze jobs from RabbitMQ, runs them through the
//! providers, and records every step and result in PostgreSQL. Workers are
//! stateless: run as many as the queue needs.

pub mod cache;
pub mod consumer;
pub mod context;
pub mod health;
pub mod pipeline;
pub mod providers;
pub mod webhooks;

use std::sync::{atomic::AtomicBool, Arc};

use anyhow::Context;
use common::{redis::RedisHandle, Settings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{consumer::Consumer, health::HealthState, pipeline::JobContext, providers::Providers};

/// A worker with its providers, ready to run.
pub struct Worker {
    settings: Arc<Settings>,
    /// Replaces the configured providers (tests keep a handle on the mock).
    providers: Option<Providers>,
}

impl Worker {
    /// A worker with the providers the settings configure.
    pub fn new(settings: Arc<Settings>) -> Self {
        Self { settings, providers: None }
    }

    /// Replaces the providers (tests keep a handle on the mock to count its calls).
    pub fn with_providers(mut self, providers: Providers) -> Self {
        self.providers = Some(providers);
        self
    }

    /// Consumes until `shutdown`; serves health on `health_listener` if given (in
    /// `ultra all` the api's health endpoints cover the process).
    pub async fn run(self, health_listener: Option<TcpListener>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { settings, providers } = self;
        let config = &settings.config;
        common::metrics::install();
        let redis = RedisHandle::new(&config.redis_url).context("invalid REDIS_URL")?;
        let providers = match providers {
            Some(providers) => providers,
            None => context::configured_providers(&settings, &redis)?,
        };
        let pool = common::db::connect_and_prepare(&config.database_url, config.db_pool_size, &shutdown).await?;
        let ctx = Arc::new(JobContext::build(&settings, pool.clone(), &redis, providers));
        let connected = Arc::new(AtomicBool::new(false));
        let health = match health_listener {
            Some(listener) => {
                let state = HealthState {
                    pool: pool.clone(),
                    redis,
                    consuming: connected.clone(),
                    metrics_token: config.metrics_token.clone(),
                };
                Some(health::serve(listener, state, shutdown.clone())?)
            }
            None => None,
        };

        // Runs until the consumer has drained, so jobs finishing after shutdown keep their
        // leases and still see cancellations.
        let watcher_stop = CancellationToken::new();
        let watcher = tokio::spawn(pipeline::watch(ctx.clone(), watcher_stop.clone()));
        let deliveries = webhooks::Deliveries::new(pool.clone(), config).context("the webhook client")?;
        let deliveries = tokio::spawn(deliveries.run(shutdown.clone()));
        Consumer { settings: settings.clone(), ctx, connected }.run(shutdown.clone()).await;
        watcher_stop.cancel();
        watcher.await.context("job watcher task")?;
        deliveries.await.context("webhook delivery task")?;
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
    settings: Arc<Settings>,
    health_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Worker::new(settings).run(health_listener, shutdown).await
}
