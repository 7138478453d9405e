//! Stream tickets: a browser's `EventSource` cannot send an `Authorization` header, and
//! a long-lived token must never go in a URL. So a client trades its credential for a
//! ticket — random, single-use, valid 60 seconds, bound to one job and one user — and
//! opens `/v1/jobs/{id}/events?ticket=…`. Tickets live in Redis as a hash only.

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

/// Spends a ticket: the user it was issued to, if it is valid for `job_id`. A ticket
/// works once, whatever the outcome.
pub async fn redeem(redis: &RedisHandle, prefix: &str, ticket: &str, job_id: Uuid) -> Option<Uuid> {
    if ticket.len() > 64 {
        return None;
    }
    let stored = redis.take_string(&key(prefix, ticket)).await.ok()??;
    let (user, job) = stored.split_once(':')?;
    (job.parse::<Uuid>().ok()? == job_id).then(|| user.parse().ok()).flatten()
}
