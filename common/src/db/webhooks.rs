//! `webhook_endpoints` and `webhook_deliveries`: where a user's webhooks go, and the
//! deliveries owed to them — written in the transaction that ends a job or batch
//! (`insert_deliveries`), claimed and recorded by the workers' delivery task.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::domain::{DeliveryStatus, WebhookEventType};

const ENDPOINT_COLUMNS: &str = "id, user_id, url, events, enabled, secret, previous_secret_expires_at, \
                                failing_since, disabled_at, disabled_reason, created_at, updated_at";

/// Not `Debug`: it holds the signing secret.
#[derive(Clone, sqlx::FromRow)]
pub struct Endpoint {
    pub id: Uuid,
    pub user_id: Uuid,
    pub url: String,
    /// `None`: every event type.
    pub events: Option<Vec<String>>,
    pub enabled: bool,
    pub secret: String,
    /// While the previous secret still signs, after a rotation.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub failing_since: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The SQL that writes the deliveries of one event, for a statement that ends a job or
/// a batch: one row per enabled endpoint of the owner subscribed to the type, and one
/// to a one-off URL, signed with the owner's default endpoint: their oldest enabled
/// one, else their oldest (sent once it is enabled again). `source` is a `FROM` item
/// with one row per event; the other arguments are SQL expressions over it. The
/// endpoints are locked against deletion (`FOR KEY SHARE`), so an endpoint deleted
/// meanwhile is skipped rather than failing the statement that ends the job.
pub fn insert_deliveries(source: &str, user_id: &str, event_type: &str, body: &str, one_off_url: &str) -> String {
    format!(
        "INSERT INTO webhook_deliveries (endpoint_id, url, event_type, body)
         SELECT e.id, NULL, {event_type}, {body}
           FROM {source} CROSS JOIN LATERAL (
                SELECT id FROM webhook_endpoints
                 WHERE user_id = {user_id} AND enabled AND (events IS NULL OR {event_type} = ANY (events))
                   FOR KEY SHARE) e
         UNION ALL
         SELECT d.id, {one_off_url}, {event_type}, {body}
           FROM {source} CROSS JOIN LATERAL (
                SELECT id FROM webhook_endpoints WHERE user_id = {user_id}
                 ORDER BY enabled DESC, created_at, id LIMIT 1 FOR KEY SHARE) d
          WHERE {one_off_url} IS NOT NULL"
    )
}

/// Writes the deliveries of an event of `user_id`'s (a batch's end) in the caller's
/// transaction.
pub async fn enqueue(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    event_type: WebhookEventType,
    body: &str,
) -> Result<u64, sqlx::Error> {
    let sql = insert_deliveries("(SELECT $1::uuid AS user_id) owner", "owner.user_id", "$2", "$3", "NULL::text");
    Ok(sqlx::query(&sql).bind(user_id).bind(event_type).bind(body).execute(ex).await?.rows_affected())
}

pub struct NewEndpoint<'a> {
    pub user_id: Uuid,
    pub url: &'a str,
    pub events: Option<&'a [String]>,
    pub secret: &'a str,
}

pub async fn create(ex: impl PgExecutor<'_>, endpoint: &NewEndpoint<'_>) -> Result<Endpoint, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO webhook_endpoints (id, user_id, url, events, secret) VALUES ($1, $2, $3, $4, $5)
         RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(endpoint.user_id)
    .bind(endpoint.url)
    .bind(endpoint.events)
    .bind(endpoint.secret)
    .fetch_one(ex)
    .await
}

pub async fn count_owned(ex: impl PgExecutor<'_>, user_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE user_id = $1").bind(user_id).fetch_one(ex).await
}

/// The user's endpoints, oldest (the default) first.
pub async fn list_owned(ex: impl PgExecutor<'_>, user_id: Uuid) -> Result<Vec<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE user_id = $1 ORDER BY created_at, id"
    ))
    .bind(user_id)
    .fetch_all(ex)
    .await
}

pub async fn get_owned(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND user_id = $2"))
        .bind(id)
        .bind(user_id)
        .fetch_optional(ex)
        .await
}

/// Whether the user has an enabled endpoint to sign a job's one-off `webhook_url` with.
pub async fn has_default(ex: impl PgExecutor<'_>, user_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE user_id = $1 AND enabled)")
        .bind(user_id)
        .fetch_one(ex)
        .await
}

/// What a PATCH changes; `None` leaves a field as it is (`events: Some(None)`: every type).
pub struct EndpointChange<'a> {
    pub url: Option<&'a str>,
    pub events: Option<Option<&'a [String]>>,
    pub enabled: Option<bool>,
}

/// Applies `change`. Enabling clears the failure record; disabling fails the
/// endpoint's pending deliveries (`disable`).
pub async fn update_owned(
    conn: &mut PgConnection,
    id: Uuid,
    user_id: Uuid,
    change: &EndpointChange<'_>,
) -> Result<Option<Endpoint>, sqlx::Error> {
    let updated: Option<Endpoint> = sqlx::query_as(&format!(
        "UPDATE webhook_endpoints
            SET url = coalesce($3, url),
                events = CASE WHEN $4 THEN $5 ELSE events END,
                enabled = coalesce($6, enabled),
                failing_since = CASE WHEN $6 THEN NULL ELSE failing_since END,
                disabled_at = CASE WHEN $6 THEN NULL WHEN NOT $6 AND enabled THEN now() ELSE disabled_at END,
                disabled_reason = CASE WHEN $6 THEN NULL WHEN NOT $6 AND enabled THEN 'disabled by its owner'
                                       ELSE disabled_reason END,
                updated_at = now()
          WHERE id = $1 AND user_id = $2
         RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(id)
    .bind(user_id)
    .bind(change.url)
    .bind(change.events.is_some())
    .bind(change.events.flatten())
    .bind(change.enabled)
    .fetch_optional(&mut *conn)
    .await?;
    if updated.as_ref().is_some_and(|e| !e.enabled) {
        fail_pending(&mut *conn, id, "the endpoint is disabled").await?;
    }
    Ok(updated)
}

/// A new secret; the previous one signs too for `grace`.
pub async fn rotate_secret(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    user_id: Uuid,
    secret: &str,
    grace: Duration,
) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE webhook_endpoints
            SET previous_secret = secret, previous_secret_expires_at = now() + make_interval(secs => $4),
                secret = $3, updated_at = now()
          WHERE id = $1 AND user_id = $2
         RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(id)
    .bind(user_id)
    .bind(secret)
    .bind(grace.as_secs_f64())
    .fetch_optional(ex)
    .await
}

/// Deletes an endpoint and its deliveries.
pub async fn delete_owned(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user_id)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() == 1)
}

const DELIVERY_COLUMNS: &str = "id, endpoint_id, url, event_type, status, attempts, next_attempt_at, claimed_until, \
                                last_attempt_at, last_status_code, last_latency_ms, last_error, created_at, finished_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Delivery {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    /// A job's one-off `webhook_url`; `None`: the endpoint's.
    pub url: Option<String>,
    pub event_type: WebhookEventType,
    pub status: DeliveryStatus,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    /// Set while an attempt is under way.
    pub claimed_until: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_latency_ms: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A test ping to the endpoint, whatever its event types.
pub async fn enqueue_test(ex: impl PgExecutor<'_>, endpoint_id: Uuid, body: &str) -> Result<Delivery, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO webhook_deliveries (endpoint_id, event_type, body) VALUES ($1, $2, $3) RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(endpoint_id)
    .bind(WebhookEventType::WebhookTest)
    .bind(body)
    .fetch_one(ex)
    .await
}

/// An endpoint's deliveries, newest first, from before the delivery `before`.
pub async fn list_deliveries(
    ex: impl PgExecutor<'_>,
    endpoint_id: Uuid,
    status: Option<DeliveryStatus>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Delivery>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
          WHERE endpoint_id = $1 AND ($2::text IS NULL OR status = $2)
            AND ($3::uuid IS NULL OR (created_at, id) < (SELECT created_at, id FROM webhook_deliveries
                                                           WHERE id = $3 AND endpoint_id = $1))
          ORDER BY created_at DESC, id DESC LIMIT $4"
    ))
    .bind(endpoint_id)
    .bind(status)
    .bind(before)
    .bind(limit)
    .fetch_all(ex)
    .await
}

/// Why a delivery cannot be retried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRetried {
    /// No such delivery of that endpoint.
    Unknown,
    /// An attempt is under way.
    InFlight,
}

/// Sends a delivery again at once: a pending one now rather than at its next
/// attempt, an ended one from the start of its schedule.
pub async fn retry(pool: &PgPool, endpoint_id: Uuid, id: Uuid) -> Result<Result<Delivery, NotRetried>, sqlx::Error> {
    let retried: Option<Delivery> = sqlx::query_as(&format!(
        "UPDATE webhook_deliveries
            SET attempts = CASE WHEN status = 'pending' THEN attempts ELSE 0 END,
                status = 'pending', next_attempt_at = now(), finished_at = NULL
          WHERE id = $1 AND endpoint_id = $2 AND (claimed_until IS NULL OR claimed_until <= now())
         RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(id)
    .bind(endpoint_id)
    .fetch_optional(pool)
    .await?;
    if let Some(delivery) = retried {
        return Ok(Ok(delivery));
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = $1 AND endpoint_id = $2)")
            .bind(id)
            .bind(endpoint_id)
            .fetch_one(pool)
            .await?;
    Ok(Err(if exists { NotRetried::InFlight } else { NotRetried::Unknown }))
}

/// A delivery claimed for one attempt, with what sending it needs (not `Debug`: it
/// holds the signing secrets).
#[derive(Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub url: String,
    pub body: String,
    /// This attempt's number, from 1.
    pub attempts: i32,
    pub secret: String,
    /// The secret before a rotation, while its grace lasts.
    pub previous_secret: Option<String>,
}

/// Serialises claims across processes, so each sees the others' claims when it counts
/// an endpoint's deliveries in flight.
const CLAIM_LOCK: i64 = 0x756c_7472_615f_7768; // "ultra_wh"

/// Claims up to `limit` due deliveries for one attempt each, `lease` long, leaving
/// every endpoint at most `per_endpoint` in flight (counting other processes'). A
/// claim that lapses (its process died) makes the delivery due again.
pub async fn claim(pool: &PgPool, limit: i64, per_endpoint: i64, lease: Duration) -> Result<Vec<Claimed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CLAIM_LOCK).execute(&mut *tx).await?;
    // The clock is read after the lock: time spent waiting for it must not shorten a lease.
    let claimed = sqlx::query_as(
        "WITH clock AS (
            SELECT clock_timestamp() AS now
         ), busy AS (
            SELECT endpoint_id, count(*) AS n FROM webhook_deliveries, clock
             WHERE status = 'pending' AND claimed_until > clock.now GROUP BY endpoint_id
         ), due AS (
            -- The oldest due deliveries of enabled endpoints with room, then at most
            -- the room of each: an endpoint at its limit leaves the window to others.
            SELECT oldest.id, oldest.next_attempt_at, coalesce(busy.n, 0) AS busy,
                   row_number() OVER (PARTITION BY oldest.endpoint_id ORDER BY oldest.next_attempt_at, oldest.id)
                       AS place
              FROM (SELECT d.id, d.endpoint_id, d.next_attempt_at
                      FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled, clock
                     WHERE d.status = 'pending' AND d.next_attempt_at <= clock.now
                       AND (d.claimed_until IS NULL OR d.claimed_until <= clock.now)
                       AND NOT EXISTS (SELECT 1 FROM busy WHERE busy.endpoint_id = d.endpoint_id AND busy.n >= $2)
                     ORDER BY d.next_attempt_at LIMIT 2000) oldest
              LEFT JOIN busy ON busy.endpoint_id = oldest.endpoint_id
         ), chosen AS (
            SELECT id FROM due WHERE place <= $2 - busy ORDER BY next_attempt_at LIMIT $1
         )
         -- Due and unclaimed again here: a row changed since the snapshot is checked
         -- anew (a lapsed claim's owner may just have scheduled its next attempt).
         UPDATE webhook_deliveries d
            SET claimed_until = clock.now + make_interval(secs => $3), attempts = d.attempts + 1,
                last_attempt_at = clock.now
           FROM chosen, webhook_endpoints e, clock
          WHERE d.id = chosen.id AND e.id = d.endpoint_id AND e.enabled AND d.status = 'pending'
            AND d.next_attempt_at <= clock.now AND (d.claimed_until IS NULL OR d.claimed_until <= clock.now)
         RETURNING d.id, d.endpoint_id, coalesce(d.url, e.url) AS url, d.body, d.attempts, e.secret,
                   CASE WHEN e.previous_secret_expires_at > clock.now THEN e.previous_secret END AS previous_secret",
    )
    .bind(limit)
    .bind(per_endpoint)
    .bind(lease.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(claimed)
}

/// What one attempt got.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The response's status, if one came.
    pub status_code: Option<u16>,
    pub latency: Duration,
    /// What went wrong, short: the transport error or an excerpt of the response.
    pub error: Option<String>,
}

/// What happens next to a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Succeeded,
    RetryAfter(Duration),
    Failed,
}

/// What recording an attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The delivery's claim had lapsed and another attempt took it over: nothing written.
    Lost,
    Written,
    /// Written, and the endpoint, failing for longer than allowed, is now disabled.
    EndpointDisabled,
}

/// Records the outcome of the attempt `claimed.attempts`. A success clears the
/// endpoint's failure record; a failure starts it, and disables the endpoint once it
/// has failed for `disable_after` (its pending deliveries fail with it).
pub async fn record(
    pool: &PgPool,
    claimed: &Claimed,
    attempt: &Attempt,
    next: Next,
    disable_after: Duration,
) -> Result<Recorded, sqlx::Error> {
    let (status, wait) = match next {
        Next::Succeeded => (DeliveryStatus::Succeeded, None),
        Next::RetryAfter(wait) => (DeliveryStatus::Pending, Some(wait.as_secs_f64())),
        Next::Failed => (DeliveryStatus::Failed, None),
    };
    let mut tx = pool.begin().await?;
    // A delivery to a one-off URL is its job's, not the endpoint's: it does not count
    // towards the endpoint's failure record.
    let written: Option<(Uuid, bool)> = sqlx::query_as(
        "WITH d AS (
            UPDATE webhook_deliveries d
               -- An endpoint disabled during the attempt gets no further attempt.
               SET status = CASE WHEN $3 = 'pending' AND NOT e.enabled THEN 'failed' ELSE $3 END,
                   claimed_until = NULL,
                   next_attempt_at = coalesce(now() + make_interval(secs => $4), d.next_attempt_at),
                   last_status_code = $5, last_latency_ms = $6, last_error = $7,
                   finished_at = CASE WHEN $3 <> 'pending' OR NOT e.enabled THEN now() END
              FROM webhook_endpoints e
             WHERE d.id = $1 AND d.attempts = $2 AND d.status = 'pending' AND e.id = d.endpoint_id
            RETURNING d.endpoint_id, d.url IS NULL AS own
         ), endpoint AS (
            -- Only a change of state writes the endpoint's row: a busy endpoint's
            -- deliveries do not queue on its lock.
            UPDATE webhook_endpoints e
               SET failing_since = CASE WHEN $8 THEN NULL ELSE now() END
              FROM d
             WHERE d.own AND e.id = d.endpoint_id AND $8 = (e.failing_since IS NOT NULL)
         )
         SELECT endpoint_id, own FROM d",
    )
    .bind(claimed.id)
    .bind(claimed.attempts)
    .bind(status)
    .bind(wait)
    .bind(attempt.status_code.map(i32::from))
    .bind(i32::try_from(attempt.latency.as_millis()).unwrap_or(i32::MAX))
    .bind(attempt.error.as_deref())
    .bind(next == Next::Succeeded)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((endpoint_id, own)) = written else { return Ok(Recorded::Lost) };
    let mut recorded = Recorded::Written;
    if own && next != Next::Succeeded {
        let disabled = sqlx::query(
            "UPDATE webhook_endpoints
                SET enabled = false, disabled_at = now(), updated_at = now(),
                    disabled_reason = 'every delivery has failed since ' || to_char(failing_since AT TIME ZONE 'UTC',
                                      'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
              WHERE id = $1 AND enabled AND failing_since <= now() - make_interval(secs => $2)",
        )
        .bind(endpoint_id)
        .bind(disable_after.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        if disabled.rows_affected() == 1 {
            fail_pending(&mut tx, endpoint_id, "the endpoint was disabled after failing too long").await?;
            recorded = Recorded::EndpointDisabled;
        }
    }
    tx.commit().await?;
    Ok(recorded)
}

/// Fails the endpoint's deliveries that wait for an attempt (in-flight ones end with
/// their attempt).
async fn fail_pending(conn: &mut PgConnection, endpoint_id: Uuid, why: &str) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'failed', finished_at = now(), last_error = $2
          WHERE endpoint_id = $1 AND status = 'pending' AND (claimed_until IS NULL OR claimed_until <= now())",
    )
    .bind(endpoint_id)
    .bind(why)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
