//! Stream tickets: a browser's `EventSource` cannot send an `Authorization` header, and
//! a long-lived token must never go in a URL. So a client trades its credential for a
//! ticket — random, bound to one job and one user, to be used within 60 seconds — and
//! opens `/v1/jobs/{id}/events?ticket=…`. Tickets live in Redis as a hash only.
//!
//! An `EventSource` reconnects to the same URL (after a dropped connection, or a
//! stream closed while idle), so a ticket that has opened a stream stays good for its
//! job and user until the job's deadline plus 60 seconds: the reconnection resumes
//! with `Last-Event-ID`, and one after the job's end gets `204` (which stops it).

use std::time::Duration;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use common::redis::{RedisHandle, RedisUnavailable};
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How long a ticket may wait to be used.
pub const TICKET_TTL: Duration = Duration::from_secs(60);

fn key(prefix: &str, ticket: &str) -> String {
    let digest = Sha256::digest(ticket.as_bytes());
    format!("{prefix}:ticket:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Issues a ticket for `user_id` to stream `job_id`.
pub async fn issue(redis: &RedisHandle, prefix: &str, user_id: Uuid, job_id: Uuid) -> Result<String, RedisUnavailable> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let ticket = URL_SAFE_NO_PAD.encode(bytes);
    redis.set_string(&key(prefix, &ticket), &format!("{user_id}:{job_id}"), TICKET_TTL).await?;
    Ok(ticket)
}

/// The user a ticket was issued to, if it is valid for `job_id`.
pub async fn redeem(
    redis: &RedisHandle,
    prefix: &str,
    ticket: &str,
    job_id: Uuid,
) -> Result<Option<Uuid>, RedisUnavailable> {
    if ticket.len() > 64 {
        return Ok(None);
    }
    let stored = redis.get_string(&key(prefix, ticket)).await?;
    Ok(stored.as_deref().and_then(|stored| {
        let (user, job) = stored.split_once(':')?;
        (job.parse::<Uuid>().ok()? == job_id).then(|| user.parse().ok()).flatten()
    }))
}

/// Keeps a ticket that opened a stream good for reconnections: until the job's
/// deadline (when its stream can have nothing more to say) plus [`TICKET_TTL`] — a
/// fixed moment, so using the ticket again never pushes it further.
pub async fn keep_for_reconnects(
    redis: &RedisHandle,
    prefix: &str,
    ticket: &str,
    deadline: Option<chrono::DateTime<chrono::Utc>>,
) {
    let Some(until) = deadline.map(|at| at + TICKET_TTL) else { return };
    if until <= chrono::Utc::now() {
        return; // the ticket keeps what is left of its first minute
    }
    if let Err(err) = redis.expire_at(&key(prefix, ticket), until.timestamp_millis()).await {
        tracing::debug!(error = %err, "stream ticket not extended (redis unavailable)");
    }
}
