//! The event hub: one Redis pattern subscription per api process, fanned out to the
//! SSE streams of that process through per-job broadcast channels.
//!
//! The hub is also the streams' safety net: for every job that has streams here it
//! re-reads the job's new events from PostgreSQL — every 10 s while live events flow
//! (a lost Redis message), every 500 ms while Redis is away, and at once whenever the
//! subscription is (re)established — and sends them down the same channel. That is
//! one query per job, jittered, however many streams watch it: 10,000 quiet streams
//! on 400 jobs cost 40 queries a second, not 1,000 (or 800, not 20,000, without
//! Redis).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::{
    backoff::Backoff,
    db,
    events::{channel_pattern, JobEvent, LiveMessage, TokenEvent},
};
use futures::StreamExt;
use sqlx::PgPool;
use tokio::{sync::broadcast, time::Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::stream::frame::Rendered;

/// Events buffered per job for slow streams before they must resynchronise.
const PER_JOB_BUFFER: usize = 256;
/// How often each watched job's events are re-read while live events flow.
const LIVE_RECHECK: Duration = Duration::from_secs(10);
/// How often each watched job's events are re-read while Redis is unavailable.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often the hub looks for jobs whose re-check is due.
const RECHECK_TICK: Duration = Duration::from_millis(100);
/// Re-checks run at once (each is one query on the shared pool).
const RECHECKS_AT_ONCE: usize = 4;
/// Rows read per re-check; a job with more new events than this is read again at once.
const RECHECK_BATCH: i64 = 500;

/// Messages carry their JSON as it came from Redis: with thousands of streams on one
/// job, each event is serialised once, not once per subscriber.
#[derive(Debug, Clone)]
pub enum HubMessage {
    Event(Arc<Rendered<JobEvent>>),
    /// A piece of a streaming answer (live only).
    Token(Arc<Rendered<TokenEvent>>),
}

/// One watched job: its channel, the newest event the hub has seen of it, and when
/// its events are next re-read from the database.
struct Watched {
    sender: broadcast::Sender<HubMessage>,
    last_seq: i64,
    next_check: Instant,
}

#[derive(Default)]
pub struct EventHub {
    jobs: Mutex<HashMap<Uuid, Watched>>,
    live: AtomicBool,
}

/// A stream's registration for one job's live events; unregisters on drop.
pub struct Subscription {
    hub: Arc<EventHub>,
    job_id: Uuid,
    pub receiver: broadcast::Receiver<HubMessage>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut jobs = self.hub.lock();
        // Our receiver still counts here: the last one out removes the channel.
        if jobs.get(&self.job_id).is_some_and(|job| job.sender.receiver_count() <= 1) {
            jobs.remove(&self.job_id);
        }
    }
}

impl EventHub {
    /// Registers a stream that has sent everything up to `after_seq` (at most the
    /// job's newest event: the handler sees to that).
    pub fn subscribe(self: &Arc<Self>, job_id: Uuid, after_seq: i64) -> Subscription {
        let interval = self.recheck_interval();
        let receiver = self
            .lock()
            .entry(job_id)
            .or_insert_with(|| Watched {
                sender: broadcast::channel(PER_JOB_BUFFER).0,
                last_seq: after_seq,
                next_check: jittered(interval),
            })
            .sender
            .subscribe();
        Subscription { hub: self.clone(), job_id, receiver }
    }

    /// Whether live events are flowing now.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    fn recheck_interval(&self) -> Duration {
        if self.is_live() {
            LIVE_RECHECK
        } else {
            POLL_INTERVAL
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Watched>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dispatch(&self, job_id: Uuid, message: HubMessage) {
        if let Some(job) = self.lock().get_mut(&job_id) {
            if let HubMessage::Event(event) = &message {
                job.last_seq = job.last_seq.max(event.value.seq);
            }
            let _ = job.sender.send(message);
        }
    }

    /// Every watched job's events are re-read at once: some may have been missed.
    fn recheck_all_now(&self) {
        let now = Instant::now();
        for job in self.lock().values_mut() {
            job.next_check = now;
        }
    }

    /// The jobs whose re-check is due, each with the newest event seen; their next
    /// re-check is scheduled.
    fn take_due(&self) -> Vec<(Uuid, i64)> {
        let (now, interval) = (Instant::now(), self.recheck_interval());
        let mut due = Vec::new();
        for (job_id, job) in self.lock().iter_mut() {
            if job.next_check <= now {
                job.next_check = jittered(interval);
                due.push((*job_id, job.last_seq));
            }
        }
        due
    }

    /// Re-reads watched jobs' events from PostgreSQL as they fall due, until
    /// shutdown, and sends what is new down each job's channel.
    pub async fn run_rechecks(self: Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RECHECK_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let due = self.take_due();
            futures::stream::iter(due)
                .for_each_concurrent(RECHECKS_AT_ONCE, |(job_id, last_seq)| self.recheck(&pool, job_id, last_seq))
                .await;
        }
    }

    async fn recheck(&self, pool: &PgPool, job_id: Uuid, last_seq: i64) {
        metrics::counter!(common::metrics::EVENT_RECHECKS).increment(1);
        match db::events::after(pool, job_id, last_seq, RECHECK_BATCH).await {
            Ok(events) => {
                if events.len() as i64 == RECHECK_BATCH {
                    if let Some(job) = self.lock().get_mut(&job_id) {
                        job.next_check = Instant::now(); // more to read: next tick
                    }
                }
                for event in events {
                    self.dispatch(job_id, HubMessage::Event(Arc::new(Rendered::event(event))));
                }
            }
            Err(err) => tracing::warn!(%job_id, error = %err, "cannot re-check a job's events; will retry"),
        }
    }

    /// Keeps the subscription up until shutdown, reconnecting with back-off.
    pub async fn run(self: Arc<Self>, client: redis::Client, redis_prefix: String, shutdown: CancellationToken) {
        let pattern = channel_pattern(&redis_prefix);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !shutdown.is_cancelled() {
            match self.subscribe_once(&client, &pattern, &shutdown).await {
                Ok(()) => backoff.reset(),
                Err(err) => {
                    tracing::warn!(error = %err, "redis event subscription unavailable; streams poll PostgreSQL")
                }
            }
            self.live.store(false, Ordering::Relaxed);
            self.recheck_all_now();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn subscribe_once(
        &self,
        client: &redis::Client,
        pattern: &str,
        shutdown: &CancellationToken,
    ) -> redis::RedisResult<()> {
        let connect = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub());
        let mut pubsub = connect
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out connecting to redis")))??;
        pubsub.psubscribe(pattern).await?;
        self.live.store(true, Ordering::Relaxed);
        self.recheck_all_now();
        tracing::info!(pattern, "subscribed to live job events");
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                message = messages.next() => {
                    let Some(message) = message else { return Ok(()) };
                    let payload = message.get_payload_bytes();
                    let json = String::from_utf8_lossy(payload);
                    match serde_json::from_slice::<LiveMessage>(payload) {
                        Ok(LiveMessage::Lifecycle(event)) => {
                            self.dispatch(event.job_id, HubMessage::Event(Arc::new(Rendered::event_with_json(event, &json))))
                        }
                        Ok(LiveMessage::Token(token)) => {
                            self.dispatch(token.job_id, HubMessage::Token(Arc::new(Rendered::token_with_json(token, &json))))
                        }
                        Err(err) => tracing::warn!(error = %err, channel = message.get_channel_name(), "ignoring malformed live event"),
                    }
                }
            }
        }
    }
}

/// A moment `interval` from now, give or take a fifth, so the jobs' re-checks spread
/// out instead of falling due together.
fn jittered(interval: Duration) -> Instant {
    Instant::now() + interval.mul_f64(rand::random_range(0.8..1.2))
}
