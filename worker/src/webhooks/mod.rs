//! The webhook delivery task, one per worker process: claims due deliveries from the
//! outbox (`webhook_deliveries`), sends each once, and records what happened — a
//! success, the next attempt on the schedule, or the end.
//!
//! **Decision — in the worker process.** Workers are what operators scale, they
//! already make outbound HTTP calls, and a crash of one only lets its claims lapse:
//! another worker's task takes them over. The api stays free of outbound calls to
//! addresses users choose.
//!
//! At least once: a delivery is sent, then recorded; a process that dies in between
//! sends it again (the same `webhook-id`) once its claim lapses. Once a 2xx is
//! recorded, it is never sent again.

mod sender;

use std::{sync::Arc, time::Duration};

use common::{
    db::{
        self,
        webhooks::{Claimed, Next, Recorded},
    },
    webhooks::{address::Policy, schedule::Schedule},
    Config,
};
use sqlx::PgPool;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

pub use self::sender::Sender;

/// How often the task looks for due deliveries when nothing wakes it sooner.
const POLL: Duration = Duration::from_millis(200);
/// How long an attempt's result is retried against the database before the claim is
/// left to lapse (the delivery is then sent again).
const RECORD_PATIENCE: Duration = Duration::from_secs(10);

/// The delivery task and what it needs.
pub struct Deliveries {
    pool: PgPool,
    sender: Sender,
    schedule: Schedule,
    /// A claim outlives the longest attempt.
    lease: Duration,
    per_endpoint: i64,
    concurrency: usize,
    disable_after: Duration,
}

impl Deliveries {
    pub fn new(pool: PgPool, config: &Config) -> Result<Self, reqwest::Error> {
        let timeout = Duration::from_secs(config.webhook_timeout_secs);
        Ok(Self {
            pool,
            sender: Sender::new(Policy::from_config(config), timeout)?,
            schedule: config.webhook_schedule(),
            lease: timeout + Duration::from_secs(10),
            per_endpoint: i64::from(config.webhook_endpoint_concurrency),
            concurrency: config.webhook_concurrency as usize,
            disable_after: Duration::from_secs(config.webhook_disable_after_secs),
        })
    }

    /// Delivers until `shutdown`, then lets the attempts under way end (each is
    /// bounded by the timeout).
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.concurrency));
        // An attempt that ends frees a slot of its endpoint: look again at once.
        let ended = Arc::new(Notify::new());
        let mut attempts = JoinSet::new();
        let mut backoff = common::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        while !shutdown.is_cancelled() {
            let free = slots.available_permits();
            let mut full = false;
            if free > 0 {
                match db::webhooks::claim(&this.pool, free as i64, this.per_endpoint, this.lease).await {
                    Ok(claimed) => {
                        backoff.reset();
                        full = claimed.len() == free;
                        for delivery in claimed {
                            let Ok(slot) = slots.clone().try_acquire_owned() else { break };
                            attempts.spawn(this.clone().attempt(delivery, slot, ended.clone()));
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot claim webhook deliveries; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                            () = shutdown.cancelled() => {}
                        }
                        continue;
                    }
                }
            }
            while attempts.try_join_next().is_some() {}
            if !full {
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    () = ended.notified() => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
        while attempts.join_next().await.is_some() {}
    }

    /// Sends `delivery` once and records the outcome.
    async fn attempt(self: Arc<Self>, delivery: Claimed, _slot: OwnedSemaphorePermit, ended: Arc<Notify>) {
        let sent = self.sender.send(&delivery).await;
        let next = if sent.succeeded {
            Next::Succeeded
        } else {
            self.schedule.next(delivery.attempts, sent.retry_after).map_or(Next::Failed, Next::RetryAfter)
        };
        let outcome = match next {
            Next::Succeeded => "succeeded",
            Next::RetryAfter(_) => "retrying",
            Next::Failed => "failed",
        };
        common::metrics::webhook_attempt(outcome, sent.attempt.latency);
        if let Some(error) = &sent.attempt.error {
            tracing::info!(delivery_id = %delivery.id, endpoint_id = %delivery.endpoint_id,
                attempt = delivery.attempts, outcome, %error, "webhook attempt failed");
        }
        let started = tokio::time::Instant::now();
        let mut backoff = common::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match db::webhooks::record(&self.pool, &delivery, &sent.attempt, next, self.disable_after).await {
                Ok(Recorded::EndpointDisabled) => {
                    common::metrics::webhook_endpoint_disabled();
                    tracing::warn!(endpoint_id = %delivery.endpoint_id,
                        "webhook endpoint disabled: every delivery has failed for too long");
                    break;
                }
                Ok(Recorded::Written) => break,
                Ok(Recorded::Lost) => {
                    tracing::info!(delivery_id = %delivery.id, "webhook claim lapsed during the attempt; not recorded");
                    break;
                }
                Err(err) if started.elapsed() < RECORD_PATIENCE => {
                    tracing::warn!(delivery_id = %delivery.id, error = %err, "cannot record a webhook attempt; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(err) => {
                    tracing::error!(delivery_id = %delivery.id, error = %err,
                        "cannot record a webhook attempt; it will be sent again when its claim lapses");
                    break;
                }
            }
        }
        ended.notify_one();
    }
}
