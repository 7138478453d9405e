//! A job's event stream, gapless and without duplicates: subscribe to live events
//! first, then replay from PostgreSQL after the client's last id, then follow the
//! hub's events (live from Redis, or re-read by the hub from PostgreSQL, once per job),
//! dropping any sequence number already sent. A gap in the sequence or a lagging
//! subscriber fall back to reading the database, so a lost Redis message delays an
//! event but never loses it.
//!
//! Token events (live only) are forwarded as they come. A client that joins while
//! steps are running first gets a `snapshot` of each running step's text so far (from
//! Redis), then only the deltas after it; a client that falls behind loses token
//! events, never lifecycle ones, and gets a fresh snapshot when it catches up.

pub mod frame;
pub mod limit;
mod response;
mod tokens;
pub mod views;

pub use response::{event_stream, job_items, stream_permit};

use std::{collections::VecDeque, sync::Arc, time::Duration};

use common::{
    db,
    domain::Stage,
    events::{partial_key, JobEvent, TokenEvent},
    redis::RedisHandle,
};
use futures::{stream::BoxStream, StreamExt};
use sqlx::PgPool;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::{frame::Rendered, tokens::TokenTracker};
use crate::hub::{EventHub, HubMessage, Subscription};

/// What a stream sends.
#[derive(Debug, Clone)]
pub enum StreamItem {
    /// A persisted lifecycle event (with its JSON).
    Event(Arc<Rendered<JobEvent>>),
    /// A piece of a running step's answer (with its JSON).
    Token(Arc<Rendered<TokenEvent>>),
    /// A running step's text so far, for a client that joined mid-step.
    Snapshot { stage: Stage, model: String, text: String },
}

/// What every stream of a process reads from.
pub struct Sources {
    pub pool: PgPool,
    pub hub: Arc<EventHub>,
    pub partials: Partials,
    pub shutdown: CancellationToken,
    /// A stream with nothing to send for this long is closed.
    pub idle_limit: Duration,
}

/// Where running steps' texts so far are kept.
#[derive(Clone)]
pub struct Partials {
    pub redis: RedisHandle,
    pub prefix: String,
}

/// Rows read from the database per replay query.
const REPLAY_BATCH: i64 = 500;
/// How long a stream waits before retrying a replay the database refused.
const REPLAY_RETRY: Duration = Duration::from_millis(500);

pub struct JobEventStream {
    pool: PgPool,
    subscription: Subscription,
    job_id: Uuid,
    /// The last sequence number sent to the client.
    last_seq: i64,
    pending: VecDeque<Arc<Rendered<JobEvent>>>,
    /// Tokens and snapshots ready to send (they go before waiting for more).
    ready: VecDeque<StreamItem>,
    tokens: TokenTracker,
    partials: Partials,
    /// A snapshot of running steps is owed (on joining, and after falling behind).
    snapshot_due: bool,
    /// A stream with nothing to send for this long is closed (the client may resume
    /// with `Last-Event-ID`); heartbeats do not count.
    idle_limit: Duration,
    idle_since: tokio::time::Instant,
    /// Replay must run before waiting for live events.
    needs_replay: bool,
    /// The job had ended when the stream opened: once the database has nothing more
    /// to replay, the client has everything (its terminal event included).
    job_ended: bool,
    finished: bool,
    shutdown: CancellationToken,
}

impl JobEventStream {
    /// Subscribes at once, before any replay, so nothing published in between is missed.
    pub fn new(sources: Sources, job_id: Uuid, after_seq: i64, job_ended: bool) -> Self {
        let Sources { pool, hub, partials, shutdown, idle_limit } = sources;
        let subscription = hub.subscribe(job_id, after_seq);
        Self {
            pool,
            subscription,
            job_id,
            last_seq: after_seq,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            tokens: TokenTracker::default(),
            partials,
            snapshot_due: true,
            idle_limit,
            idle_since: tokio::time::Instant::now(),
            needs_replay: true,
            job_ended,
            finished: false,
            shutdown,
        }
    }

    pub fn into_stream(self) -> BoxStream<'static, StreamItem> {
        futures::stream::unfold(self, |mut s| async move {
            let item = s.next_event().await?;
            s.idle_since = tokio::time::Instant::now();
            Some((item, s))
        })
        .boxed()
    }

    /// The next item to send, or `None` once the terminal event is sent or the
    /// server shuts down.
    pub async fn next_event(&mut self) -> Option<StreamItem> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            while let Some(rendered) = self.pending.pop_front() {
                let event = &rendered.value;
                if event.seq <= self.last_seq {
                    if event.kind.is_terminal() {
                        return None; // the client already has the end of the story
                    }
                    continue; // already sent: replay and live overlapped
                }
                if event.seq != self.last_seq + 1 {
                    self.pending.clear();
                    self.needs_replay = true; // a gap: the database has what is missing
                    break;
                }
                self.last_seq = event.seq;
                self.finished = event.kind.is_terminal();
                self.tokens.observe(event);
                return Some(StreamItem::Event(rendered));
            }
            if self.needs_replay {
                self.needs_replay = false;
                // Boxed, like the snapshot below: their futures are large and short-lived,
                // and would otherwise be part of every open stream for its whole life.
                if !Box::pin(self.replay()).await {
                    self.needs_replay = true;
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(REPLAY_RETRY) => {}
                    }
                } else if self.pending.is_empty() && self.job_ended {
                    return None;
                }
                continue;
            }
            if self.snapshot_due {
                self.snapshot_due = false;
                Box::pin(self.take_snapshots()).await;
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep_until(self.idle_since + self.idle_limit) => return None,
                message = self.subscription.receiver.recv() => match message {
                    Ok(HubMessage::Event(event)) => self.pending.push_back(event),
                    Ok(HubMessage::Token(token)) => {
                        if let Some(admitted) = self.tokens.admit(&token.value) {
                            // Untrimmed, it keeps the JSON rendered once for every stream.
                            let item = if admitted.index == token.value.index { token } else { Arc::new(Rendered::token(admitted)) };
                            self.ready.push_back(StreamItem::Token(item));
                        }
                    }
                    // Fell behind: lifecycle events come back from the database, and the
                    // dropped tokens are covered by a fresh snapshot.
                    Err(RecvError::Lagged(_)) => {
                        self.needs_replay = true;
                        self.snapshot_due = true;
                    }
                    // The hub never drops a sender that has receivers; treat it as a resync.
                    Err(RecvError::Closed) => self.needs_replay = true,
                },
            }
        }
    }

    /// Queues the text so far of every running step.
    async fn take_snapshots(&mut self) {
        let running = self.tokens.running();
        let keys: Vec<String> = running
            .iter()
            .map(|(stage, model)| partial_key(&self.partials.prefix, self.job_id, *stage, model))
            .collect();
        let texts = self.partials.redis.get_strings(&keys).await;
        for ((stage, model), text) in running.into_iter().zip(texts) {
            let Some(text) = text.filter(|t| !t.is_empty()) else { continue };
            self.tokens.snapshot_sent(stage, &model, text.len());
            self.ready.push_back(StreamItem::Snapshot { stage, model, text });
        }
    }

    /// Reads everything after `last_seq` into `pending`. Returns false if the
    /// database could not be read (the stream stays open and retries).
    async fn replay(&mut self) -> bool {
        let mut after = self.pending.back().map_or(self.last_seq, |e| e.value.seq.max(self.last_seq));
        loop {
            match db::events::after(&self.pool, self.job_id, after, REPLAY_BATCH).await {
                Ok(events) => {
                    // The database itself lacks the events before the first it has (purged
                    // past their retention): waiting for them would replay forever.
                    if let Some(first) = events.first().filter(|first| after == self.last_seq && first.seq > after + 1)
                    {
                        self.last_seq = first.seq - 1;
                    }
                    let full = events.len() as i64 == REPLAY_BATCH;
                    if let Some(last) = events.last() {
                        after = last.seq;
                    }
                    self.pending.extend(events.into_iter().map(|e| Arc::new(Rendered::event(e))));
                    if !full {
                        return true;
                    }
                }
                Err(err) => {
                    tracing::warn!(job_id = %self.job_id, error = %err, "cannot replay events; retrying");
                    return false;
                }
            }
        }
    }
}
