//! The event hub: one Redis pattern subscription per api process, fanned out to the
//! SSE streams of that process through per-job broadcast channels. Whenever the
//! subscription is (re)established, every stream is told to resynchronise from
//! PostgreSQL, since events published meanwhile were missed.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::events::{channel_pattern, JobEvent, LiveMessage, TokenEvent};
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::stream::frame::Rendered;

/// Events buffered per job for slow streams before they must resynchronise.
const PER_JOB_BUFFER: usize = 256;

/// Messages carry their JSON as it came from Redis: with thousands of streams on one
/// job, each event is serialised once, not once per subscriber.
#[derive(Debug, Clone)]
pub enum HubMessage {
    Event(Arc<Rendered<JobEvent>>),
    /// A piece of a streaming answer (live only).
    Token(Arc<Rendered<TokenEvent>>),
    /// Live events may have been missed: read the database.
    Resync,
}

#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<HashMap<Uuid, broadcast::Sender<HubMessage>>>,
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
        let mut subscribers = self.hub.lock();
        // Our receiver still counts here: the last one out removes the channel.
        if subscribers.get(&self.job_id).is_some_and(|tx| tx.receiver_count() <= 1) {
            subscribers.remove(&self.job_id);
        }
    }
}

impl EventHub {
    pub fn subscribe(self: &Arc<Self>, job_id: Uuid) -> Subscription {
        let receiver = self.lock().entry(job_id).or_insert_with(|| broadcast::channel(PER_JOB_BUFFER).0).subscribe();
        Subscription { hub: self.clone(), job_id, receiver }
    }

    /// Whether live events are flowing now; streams poll the database when not.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, broadcast::Sender<HubMessage>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.subscribers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dispatch(&self, job_id: Uuid, message: HubMessage) {
        if let Some(tx) = self.lock().get(&job_id) {
            let _ = tx.send(message);
        }
    }

    fn resync_all(&self) {
        for tx in self.lock().values() {
            let _ = tx.send(HubMessage::Resync);
        }
    }

    /// Keeps the subscription up until shutdown, reconnecting with back-off.
    pub async fn run(self: Arc<Self>, client: redis::Client, redis_prefix: String, shutdown: CancellationToken) {
        let pattern = channel_pattern(&redis_prefix);
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.subscribe_once(&client, &pattern, &shutdown).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => {
                    tracing::warn!(error = %err, "redis event subscription unavailable; streams poll PostgreSQL")
                }
            }
            self.live.store(false, Ordering::Relaxed);
            self.resync_all();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
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
        self.resync_all();
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
