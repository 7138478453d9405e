//! What the api and the workers share: settings, domain types, database access,
//! queue topology, the event bus, health probes, telemetry and the SSE parser.
//!
//! Error policy: functions here return typed errors (`sqlx::Error`, `lapin::Error`,
//! the `thiserror` enums beside them); `anyhow` belongs only to binaries and start-up.

pub mod apikey;
pub mod backoff;
pub mod catalog;
pub mod cidr;
pub mod config;
pub mod db;
pub mod domain;
pub mod events;
pub mod health;
pub mod job;
pub mod metrics;
pub mod patterns;
pub mod queue;
pub mod redis;
pub mod settings;
pub mod shutdown;
pub mod sse;
pub mod telemetry;
pub mod tiers;
pub mod trace;
pub mod webhooks;

pub use config::Config;
pub use settings::Settings;
