//! Job events and their live fan-out. Every event is first committed to PostgreSQL
//! (`db::events`); only then is a copy published on Redis pub/sub, so any api replica
//! can push it to its SSE subscribers at once. Redis is a fast path, never the record:
//! a lost publish is caught up from the database.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{domain::EventKind, redis::RedisHandle};

/// One lifecycle event of a job, as stored and as streamed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct JobEvent {
    pub job_id: Uuid,
    /// 1, 2, 3, … per job with no gaps: the SSE `id:`.
    pub seq: i64,
    pub kind: EventKind,
    pub data: Value,
    pub created_at: DateTime<Utc>,
}

/// The Redis channel carrying one job's live events.
pub fn channel(redis_prefix: &str, job_id: Uuid) -> String {
    format!("{redis_prefix}:events:{job_id}")
}

/// The pattern matching every job's channel: one subscription serves a whole process.
pub fn channel_pattern(redis_prefix: &str) -> String {
    format!("{redis_prefix}:events:*")
}

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

    pub async fn publish_all(&self, events: &[JobEvent]) {
        for event in events {
            self.publish(event).await;
        }
    }
}
