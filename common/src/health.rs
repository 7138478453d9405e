//! Readiness: each dependency probed with a short timeout and reported with its
//! latency. PostgreSQL down means `down` (nothing can be accepted); RabbitMQ or
//! Redis down means `degraded` (jobs still land in the outbox; streams poll).

use std::{
    future::Future,
    time::{Duration, Instant},
};

use poem_openapi::{Enum, Object};
use serde::Serialize;
use sqlx::PgPool;

/// Longest a single dependency probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Enum)]
#[serde(rename_all = "lowercase")]
#[oai(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Degraded,
    Down,
}

#[derive(Debug, Clone, Serialize, Object)]
pub struct Check {
    /// `ok` or `down`.
    pub status: Status,
    /// How long the probe took.
    pub latency_ms: u64,
    /// Why the probe failed, in a few words (never a connection string).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Object)]
pub struct Checks {
    pub postgres: Check,
    pub rabbitmq: Check,
    pub redis: Check,
}

#[derive(Debug, Clone, Serialize, Object)]
#[oai(example)]
pub struct Readiness {
    /// `ok`, `degraded` (RabbitMQ or Redis down, or a provider's circuit open) or
    /// `down` (PostgreSQL down).
    pub status: Status,
    pub checks: Checks,
    /// Providers whose circuit breaker is open: their models are unavailable for now
    /// (empty when none is).
    pub open_circuits: Vec<String>,
}

impl poem_openapi::types::Example for Readiness {
    fn example() -> Self {
        let up = |latency_ms| Check { status: Status::Ok, latency_ms, error: None };
        let down = Check { status: Status::Down, latency_ms: 2, error: Some("unavailable".to_owned()) };
        readiness(up(1), down, up(0))
    }
}

impl Readiness {
    /// Whether this process can accept work (the probe answers 503 otherwise).
    pub fn can_accept_work(&self) -> bool {
        self.status != Status::Down
    }
}

/// Runs a probe under `PROBE_TIMEOUT` and times it.
pub async fn probe<E: std::fmt::Display>(check: impl Future<Output = Result<(), E>>) -> Check {
    let start = Instant::now();
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, check).await;
    let latency_ms = start.elapsed().as_millis() as u64;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "readiness probe failed");
            Some("unavailable".to_owned())
        }
        Err(_) => Some("timed out".to_owned()),
    };
    Check { status: if error.is_none() { Status::Ok } else { Status::Down }, latency_ms, error }
}

pub async fn probe_postgres(pool: &PgPool) -> Check {
    probe(async { sqlx::query("SELECT 1").execute(pool).await.map(drop) }).await
}

/// Combines the three checks into one verdict.
pub fn readiness(postgres: Check, rabbitmq: Check, redis: Check) -> Readiness {
    let status = if postgres.status != Status::Ok {
        Status::Down
    } else if rabbitmq.status != Status::Ok || redis.status != Status::Ok {
        Status::Degraded
    } else {
        Status::Ok
    };
    Readiness { status, checks: Checks { postgres, rabbitmq, redis }, open_circuits: Vec::new() }
}

impl Readiness {
    /// Notes providers whose circuit is open; that degrades an otherwise healthy api.
    pub fn with_open_circuits(mut self, open: Vec<String>) -> Self {
        if !open.is_empty() && self.status == Status::Ok {
            self.status = Status::Degraded;
        }
        self.open_circuits = open;
        self
    }
}
