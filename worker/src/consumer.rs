//! The RabbitMQ consumer: manual acks, prefetch = concurrency, and its own recovery.
//! A lost connection ends the session; the supervisor reconnects with back-off and
//! the broker redelivers whatever was unacked. Each delivery is acked only after its
//! job's terminal commit.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{
    queue::{self, JobMessage, Topology},
    Config,
};
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::FieldTable,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{self, JobContext};

/// Pause before handing back a delivery whose job hit an infrastructure error
/// (database away), so an outage does not spin through the delivery limit.
const INFRA_RETRY_DELAY: Duration = Duration::from_secs(2);

pub struct Consumer {
    pub config: Arc<Config>,
    pub ctx: Arc<JobContext>,
    /// Whether a consumer session is up (worker readiness).
    pub connected: Arc<AtomicBool>,
}

impl Consumer {
    /// Consumes until `shutdown`, reconnecting after any failure.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let result = self.session(&shutdown).await;
            self.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "consumer session ended; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// One connection's life. Returns `Ok` only on shutdown.
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), lapin::Error> {
        let topology = Topology::new(&self.config.queue_prefix);
        let connection = queue::connect(&self.config.amqp_url, "ultra-worker").await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        // At most `concurrency` unacked deliveries: the broker does the bounding.
        channel
            .basic_qos(self.config.concurrency, BasicQosOptions::default())
            .await?;
        let mut deliveries = channel
            .basic_consume(
                topology.analyze_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(queue = %topology.analyze_queue, prefetch = self.config.concurrency, "consuming");

        let mut in_flight = JoinSet::new();
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(err) = joined {
                        tracing::error!(error = %err, "delivery handler panicked; the message will be redelivered");
                    }
                }
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => { in_flight.spawn(handle(self.ctx.clone(), delivery)); }
                    Some(Err(err)) => break Err(err),
                    None => break Err(lapin::Error::from(std::io::Error::other("the broker cancelled the consumer"))),
                },
            }
        };

        // Stop new deliveries, then give in-flight jobs the grace period to finish.
        // Whatever is still unacked when the channel closes is redelivered elsewhere.
        if ended.is_ok() {
            let _ = channel
                .basic_cancel(deliveries.tag(), BasicCancelOptions::default())
                .await;
        }
        let drain = async { while in_flight.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.shutdown_grace(), drain)
            .await
            .is_err()
        {
            tracing::warn!(
                abandoned = in_flight.len(),
                "grace period over; unfinished jobs will be redelivered"
            );
            in_flight.abort_all();
        }
        let _ = channel.close(200, "shutdown".into()).await;
        let _ = connection.close(200, "shutdown".into()).await;
        ended
    }
}

async fn handle(ctx: Arc<JobContext>, delivery: Delivery) {
    let message: JobMessage = match serde_json::from_slice(&delivery.data) {
        Ok(message) => message,
        Err(err) => {
            // Unreadable now means unreadable forever: straight to the dead-letter queue.
            tracing::error!(error = %err, "malformed job message; dead-lettering it");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let job_id = message.job_id();
    match pipeline::run(&ctx, job_id).await {
        Ok(_) => {
            if let Err(err) = delivery.ack(BasicAckOptions::default()).await {
                // The job is committed; the redelivery will find it finished and drop it.
                tracing::warn!(%job_id, error = %err, "ack failed after commit");
            }
        }
        Err(err) => {
            tracing::warn!(%job_id, error = %err, "job interrupted by an infrastructure error; requeueing");
            tokio::time::sleep(INFRA_RETRY_DELAY).await;
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    }
}
