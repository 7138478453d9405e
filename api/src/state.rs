//! Everything a request handler needs, built once per process.

use std::sync::Arc;

use common::{catalog::Catalog, events::EventPublisher, queue::Publisher, redis::RedisHandle, tiers::Tiers, Config};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{jwt::JwtService, password::Passwords},
    hub::EventHub,
    limits::RateLimiter,
};

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
    pub jwt: JwtService,
    pub passwords: Passwords,
    pub limiter: RateLimiter,
    /// Open event streams per user in this process.
    pub streams: Arc<crate::stream::limit::StreamCounter>,
    /// Cancelled on shutdown: open streams end so the server can stop.
    pub shutdown: CancellationToken,
}
