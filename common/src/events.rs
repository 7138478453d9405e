//! Job events and their live fan-out. Every event is first committed to PostgreSQL
//! (`db::events`); only then is a copy published on Redis pub/sub, so any api replica
//! can push it to its SSE subscribers at once. Redis is a fast path, never the record:
//! a lost publish is caught up from the database.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{
    domain::{EventKind, Stage},
    job::EventData,
    redis::RedisHandle,
};

/// One lifecycle event of a job, as stored and as streamed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredEvent")]
pub struct JobEvent {
    pub job_id: Uuid,
    /// 1, 2, 3, … per job with no gaps: the SSE `id:`.
    pub seq: i64,
    /// Always `data.kind()`; written out for clients, who read it before `data`.
    pub kind: EventKind,
    pub data: EventData,
    pub created_at: DateTime<Utc>,
}

impl JobEvent {
    /// The event just written with `data`, numbered `seq`.
    pub fn new(job_id: Uuid, seq: i64, data: EventData, created_at: DateTime<Utc>) -> Self {
        Self { job_id, seq, kind: data.kind(), data, created_at }
    }
}

/// An event as a row or a bus message has it: the payload still untyped, since only
/// its kind says which type it is.
#[derive(Deserialize, sqlx::FromRow)]
pub(crate) struct StoredEvent {
    pub job_id: Uuid,
    pub seq: i64,
    pub kind: EventKind,
    pub data: Value,
    pub created_at: DateTime<Utc>,
}

impl TryFrom<StoredEvent> for JobEvent {
    type Error = serde_json::Error;

    fn try_from(stored: StoredEvent) -> Result<Self, Self::Error> {
        let data = EventData::decode(stored.kind, stored.data)?;
        Ok(Self { job_id: stored.job_id, seq: stored.seq, kind: stored.kind, data, created_at: stored.created_at })
    }
}

impl StoredEvent {
    /// The event, for a database read: a payload that does not fit its kind is a decode error.
    pub(crate) fn decode(self) -> Result<JobEvent, sqlx::Error> {
        self.try_into().map_err(|e: serde_json::Error| sqlx::Error::Decode(Box::new(e)))
    }
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for JobEvent {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        StoredEvent::from_row(row)?.decode()
    }
}

/// A piece of a model's answer as it streams: live only, never persisted. `index` is
/// the byte offset of `delta` in the step's text, so a client that got a snapshot of
/// the first N bytes knows which deltas it already has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    pub job_id: Uuid,
    pub stage: Stage,
    pub model: String,
    pub delta: String,
    pub index: usize,
}

/// What travels on a job's Redis channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LiveMessage {
    Lifecycle(JobEvent),
    Token(TokenEvent),
}

/// The Redis key holding a running step's text so far (for snapshots).
pub fn partial_key(redis_prefix: &str, job_id: Uuid, stage: Stage, model: &str) -> String {
    format!("{redis_prefix}:partial:{job_id}:{stage}:{model}")
}

/// The Redis channel carrying one job's live events.
pub fn channel(redis_prefix: &str, job_id: Uuid) -> String {
    format!("{redis_prefix}:events:{job_id}")
}

/// The pattern matching every job's channel: one subscription serves a whole process.
pub fn channel_pattern(redis_prefix: &str) -> String {
    format!("{redis_prefix}:events:*")
}

/// How long a step's snapshot outlives its last token.
const PARTIAL_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Publishes committed events to Redis. Failures are logged and dropped: subscribers
/// recover anything missed from PostgreSQL.
#[derive(Clone)]
pub struct EventPublisher {
    redis: RedisHandle,
    prefix: String,
}

impl EventPublisher {
    pub fn new(redis: RedisHandle, prefix: impl Into<String>) -> Self {
        Self { redis, prefix: prefix.into() }
    }

    pub async fn publish(&self, event: &JobEvent) {
        let payload = match serde_json::to_string(event) {
            Ok(payload) => payload,
            Err(err) => {
                tracing::error!(error = %err, "cannot serialise event");
                return;
            }
        };
        let channel = channel(&self.prefix, event.job_id);
        if let Err(err) = self.redis.publish(&channel, &payload).await {
            tracing::debug!(job_id = %event.job_id, seq = event.seq, error = %err, "live event not published; subscribers will read it from PostgreSQL");
        }
    }

    /// Publishes a token event and appends it to the step's snapshot, which lives as
    /// long as a step may run.
    pub async fn publish_token(&self, token: &TokenEvent) {
        let Ok(payload) = serde_json::to_string(token) else { return };
        let channel = channel(&self.prefix, token.job_id);
        let partial = partial_key(&self.prefix, token.job_id, token.stage, &token.model);
        if let Err(err) = self.redis.append_and_publish(&partial, &token.delta, PARTIAL_TTL, &channel, &payload).await {
            tracing::debug!(job_id = %token.job_id, error = %err, "token not published (redis unavailable)");
        }
    }

    /// Forgets a finished step's snapshot (its `step.completed` carries the full text).
    pub async fn forget_partial(&self, job_id: Uuid, stage: Stage, model: &str) {
        let _ = self.redis.clear_flag(&partial_key(&self.prefix, job_id, stage, model)).await;
    }

    pub async fn publish_all(&self, events: &[JobEvent]) {
        for event in events {
            self.publish(event).await;
        }
    }
}
