//! The RabbitMQ consumer: manual acks, prefetch = concurrency, and its own recovery.
//! A lost connection ends the session: its jobs are aborted and their leases released,
//! the supervisor reconnects with back-off, and the broker redelivers whatever was
//! unacked. Each delivery is acked only after its job's terminal commit.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{
    backoff::Backoff,
    queue::{self, JobMessage, Topology},
    trace::{AmqpHeaders, TraceContext},
    Settings,
};
use futures::{FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::pipeline::{self, JobContext};

/// Longest a session set-up, cancel or close may take before the broker counts as
/// unresponsive.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest releasing abandoned jobs' leases may hold up a reconnection (or shutdown);
/// leases it did not release expire unrenewed.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Consumer {
    pub settings: Arc<Settings>,
    pub ctx: Arc<JobContext>,
    /// Whether a consumer session is up (worker readiness).
    pub connected: Arc<AtomicBool>,
}

impl Consumer {
    /// Consumes until `shutdown`, reconnecting after any failure.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while !shutdown.is_cancelled() {
            let result = self.session(&shutdown).await;
            // A session that got going was a success: the next loss starts the back-off
            // afresh, rather than waiting as long as after a run of failed connects.
            if self.connected.swap(false, Ordering::Relaxed) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            match result {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "consumer session ended; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection's life. Returns `Ok` only on shutdown.
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), lapin::Error> {
        let topology = Topology::new(&self.settings.config.queue_prefix);
        // A broker that accepts TCP but stalls must not hang the worker.
        let setup = async {
            // Named after the topology, so an operator (or a test) can find this one.
            let name = format!("ultra-worker {}", topology.jobs_exchange);
            let connection = queue::connect(&self.settings.config.amqp_url, &name).await?;
            let channel = connection.create_channel().await?;
            topology.declare(&channel).await?;
            // At most `concurrency` unacked deliveries: the broker does the bounding.
            channel.basic_qos(self.settings.config.concurrency, BasicQosOptions::default()).await?;
            let deliveries = queue::consume(&channel, &topology.analyze_queue).await?;
            // Dead letters are few: the same channel records their jobs as failed.
            let dead = queue::consume(&channel, &topology.dead_queue).await?;
            Ok::<_, lapin::Error>((connection, channel, deliveries, dead))
        };
        let (connection, channel, mut deliveries, mut dead) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            setup = tokio::time::timeout(SETUP_TIMEOUT, setup) => {
                setup.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "RabbitMQ session set-up timed out"))??
            }
        };
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(queue = %topology.analyze_queue, prefetch = self.settings.config.concurrency, "consuming");

        let mut in_flight = JoinSet::new();
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(err) = joined {
                        tracing::error!(error = %err, "delivery handler failed");
                    }
                }
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => { in_flight.spawn(handle(self.ctx.clone(), delivery, shutdown.clone())); }
                    Some(Err(err)) => break Err(err),
                    None => break Err(lapin::Error::from(std::io::Error::other("the broker cancelled the consumer"))),
                },
                letter = dead.next() => match letter {
                    Some(Ok(letter)) => { in_flight.spawn(handle_dead_letter(self.ctx.clone(), letter)); }
                    Some(Err(err)) => break Err(err),
                    None => break Err(lapin::Error::from(std::io::Error::other("the broker cancelled the dead-letter consumer"))),
                },
            }
        };

        match &ended {
            // Shutdown: stop new deliveries, give in-flight jobs the grace period, and
            // leave whatever is unfinished unacked, for redelivery elsewhere.
            Ok(()) => {
                let cancel = channel.basic_cancel(deliveries.tag(), BasicCancelOptions::default());
                let _ = tokio::time::timeout(SETUP_TIMEOUT, cancel).await;
                let drain = async { while in_flight.join_next().await.is_some() {} };
                if tokio::time::timeout(self.settings.config.shutdown_grace(), drain).await.is_err() {
                    tracing::warn!(
                        abandoned = in_flight.len(),
                        "grace period over; unfinished jobs will be redelivered"
                    );
                }
            }
            // Connection lost: the broker is already redelivering these messages, so
            // finishing them here could run a job twice at once. Stop them now.
            Err(_) => {
                tracing::warn!(abandoned = in_flight.len(), "connection lost; in-flight jobs will be redelivered")
            }
        }
        self.abandon(&mut in_flight).await;
        let close = async {
            let _ = channel.close(200, "shutdown".into()).await;
            let _ = connection.close(200, "shutdown".into()).await;
        };
        let _ = tokio::time::timeout(SETUP_TIMEOUT, close).await;
        ended
    }

    /// Stops the session's unfinished jobs and, once they have all stopped, releases
    /// their leases, so that their redeliveries — to this worker or another — are
    /// claimed at once. Kept, the leases would turn those deliveries away as
    /// duplicates until they expired. Before the channel closes: on shutdown the
    /// messages are redelivered only then, and find their jobs free.
    async fn abandon(&self, in_flight: &mut JoinSet<()>) {
        if in_flight.is_empty() {
            return;
        }
        // Aborted and awaited: no run of this process is left to use a lease.
        in_flight.shutdown().await;
        match tokio::time::timeout(RELEASE_TIMEOUT, pipeline::release_leases(&self.ctx)).await {
            Ok(Ok(released)) => tracing::info!(released = released.len(), "released the leases of abandoned jobs"),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot release the leases of abandoned jobs; they expire unrenewed")
            }
            Err(_) => tracing::warn!("releasing the leases of abandoned jobs timed out; they expire unrenewed"),
        }
    }
}

/// Runs one delivery's job and settles the delivery: ack after the job's terminal
/// commit. While the database is unavailable the job is retried here with back-off
/// rather than requeued, which would spend the message's delivery limit on an outage.
async fn handle(ctx: Arc<JobContext>, delivery: Delivery, shutdown: CancellationToken) {
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
    // This run is a span of the trace the message carries (or of a new one).
    let parent =
        delivery.properties.headers().as_ref().and_then(|headers| TraceContext::extract(&AmqpHeaders(headers)));
    let span = tracing::info_span!(
        "job",
        %job_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = parent.map(|p| p.span_id_hex()),
    );
    let context = common::telemetry::continue_trace(&span, parent);
    settle(&ctx, delivery, job_id, &context, &shutdown).instrument(span).await;
}

async fn settle(
    ctx: &Arc<JobContext>,
    delivery: Delivery,
    job_id: uuid::Uuid,
    context: &TraceContext,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let done = loop {
        let delay = match AssertUnwindSafe(pipeline::run(ctx, job_id, context)).catch_unwind().await {
            // The lease went elsewhere mid-run: another worker holds the job, or the
            // reaper requeued it — and its new message may have been dropped here as
            // a duplicate of this very run. Requeued, this delivery is claimed if the
            // job waits, or dropped if someone runs it: never stranded.
            Ok(Ok(pipeline::Outcome::LeaseLost)) => break false,
            // Ended, retried, or a duplicate: this delivery is done.
            Ok(Ok(_)) => break true,
            // A stored row this version cannot read is a bug, not an outage: retrying
            // here would claim the job again and again. Handed back, the delivery
            // limit dead-letters it.
            Ok(Err(err)) if err.is_undecodable() => {
                tracing::error!(%job_id, error = %err, "job's stored data cannot be read; requeueing");
                break false;
            }
            Ok(Err(err)) => {
                let delay = backoff.next_delay();
                tracing::warn!(%job_id, error = %err, retry_in_ms = delay.as_millis() as u64, "job interrupted by an infrastructure error");
                delay
            }
            Err(_) => {
                // A bug, not an outage: hand the message back; the delivery limit
                // dead-letters it if it keeps failing.
                tracing::error!(%job_id, "job handler panicked; requeueing");
                break false;
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break false,
            _ = tokio::time::sleep(delay) => {}
        }
    };
    let settled = if done {
        // If the ack is lost, the redelivery finds the job finished and drops it.
        delivery.ack(BasicAckOptions::default()).await
    } else {
        delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
    };
    if let Err(err) = settled {
        tracing::warn!(%job_id, error = %err, "could not settle the delivery; the broker will redeliver it");
    }
}

/// A dead letter: a message the broker gave up on (past its delivery limit, or
/// rejected as unreadable). Its job ends `failed` with code `dead_lettered`, so the
/// client is told, the budget is released, and an admin can replay it.
async fn handle_dead_letter(ctx: Arc<JobContext>, delivery: Delivery) {
    match serde_json::from_slice::<JobMessage>(&delivery.data) {
        Ok(message) => {
            let job_id = message.job_id();
            match pipeline::dead_lettered(&ctx, job_id).await {
                Ok(outcome) => {
                    if matches!(outcome, pipeline::Outcome::Finished(_)) {
                        metrics::counter!(common::metrics::DEAD_LETTERS).increment(1);
                    }
                    tracing::error!(%job_id, "job dead-lettered; it is failed and can be replayed")
                }
                Err(err) => {
                    tracing::warn!(%job_id, error = %err, "cannot record a dead letter yet; it stays queued");
                    let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    return;
                }
            }
        }
        Err(err) => tracing::error!(error = %err, "unreadable dead letter dropped"),
    }
    if let Err(err) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %err, "could not ack a dead letter; it will come back");
    }
}
