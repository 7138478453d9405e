//! Getting committed jobs onto RabbitMQ. The submit handler publishes at once (the
//! fast path) and deletes the outbox row on the broker's confirm; this relay, running
//! in every api process, publishes whatever the fast path missed — an api that died
//! between commit and publish, or a broker that was down. Rows are taken with
//! `FOR UPDATE SKIP LOCKED`, so relays in several processes share the work.
//! The relay leaves rows younger than `MIN_AGE_MS` to the fast path, which publishes
//! and then deletes its row in one statement (not a transaction: this is on every
//! submit's path). A job is published twice only if the fast path takes longer than
//! that age from its insert to the broker's confirm, or crashes between the confirm
//! and the deletion; the worker drops a duplicate delivery (the job is leased or
//! finished).

use std::sync::Arc;

use common::{
    db,
    domain::QueuedReason,
    job::{EventData, QueuedData},
    queue::JobMessage,
};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Outbox rows younger than this (counted from their insert) belong to the fast path,
/// which publishes right after the job's commit; this age is the only thing keeping
/// the relay from publishing them too.
const MIN_AGE_MS: i64 = 2_000;
/// How often the reaper looks for running jobs whose lease expired.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// How often rows past their retention are deleted.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);
/// Rows published together, their confirms awaited together.
const BATCH: i64 = 200;
/// How long a relay's claim on rows lasts: longer than a batch's confirms can take.
const CLAIM: std::time::Duration = std::time::Duration::from_secs(30);

/// Publishes one job now and clears its outbox row on confirm. A failure is only
/// logged: the row stays for the relay.
pub async fn publish_now(state: &AppState, outbox_id: i64, message: &JobMessage, traceparent: Option<&str>) {
    if let Err(err) = try_publish_now(state, outbox_id, message, traceparent).await {
        tracing::warn!(job_id = %message.job_id(), error = %err, "fast-path publish failed; the relay will retry");
    }
}

async fn try_publish_now(
    state: &AppState,
    outbox_id: i64,
    message: &JobMessage,
    traceparent: Option<&str>,
) -> Result<(), Box<dyn std::error::Error>> {
    state.publisher.publish(message, traceparent).await?;
    db::outbox::delete(&state.pool, outbox_id).await?;
    Ok(())
}

pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(state.config.relay_interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_purge = tokio::time::Instant::now();
    let mut next_reap = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        if tokio::time::Instant::now() >= next_reap {
            next_reap = tokio::time::Instant::now() + REAP_EVERY;
            match reap(&state).await {
                Ok(0) => {}
                Ok(reaped) => tracing::warn!(reaped, "returned jobs whose worker is gone to the queue"),
                Err(err) => tracing::warn!(error = %err, "reaper pass failed"),
            }
        }
        // Housekeeping rides along: rows past their retention, every few minutes.
        if tokio::time::Instant::now() >= next_purge {
            next_purge += PURGE_EVERY;
            match db::retention::purge(&state.pool, &state.config.retention()).await {
                Ok(purged) if purged != db::retention::Purged::default() => tracing::info!(?purged, "purged old rows"),
                Ok(_) => {}
                Err(err) => tracing::debug!(error = %err, "purge of old rows failed; will retry"),
            }
        }
        match relay_once(&state).await {
            Ok(0) => {}
            Ok(published) => tracing::info!(published, "relay published jobs the fast path missed"),
            Err(err) => tracing::warn!(error = %err, "outbox relay pass failed"),
        }
    }
}

/// One pass: claims batches of rows (a claim, not a held lock), publishes each batch
/// at once and waits for its confirms together, deletes what was confirmed in one
/// statement and gives the rest back — until the backlog is empty or the broker fails.
/// After an outage that is thousands of jobs a second, not one confirm's round trip
/// per job.
pub async fn relay_once(state: &AppState) -> Result<usize, sqlx::Error> {
    let mut published = 0;
    loop {
        let batch = db::outbox::claim_batch(&state.pool, MIN_AGE_MS, BATCH, CLAIM).await?;
        let messages: Vec<_> = batch
            .iter()
            .map(|row| {
                let delay = std::time::Duration::from_millis(row.delay_ms.max(0) as u64);
                (JobMessage::new(row.job_id, row.attempt), delay, row.traceparent.clone())
            })
            .collect();
        let results = state.publisher.publish_many(&messages).await;
        let (mut confirmed, mut failed) = (Vec::new(), Vec::new());
        for (row, result) in batch.iter().zip(results) {
            match result {
                Ok(()) => confirmed.push(row.id),
                Err(err) => {
                    tracing::warn!(job_id = %row.job_id, error = %err, "relay publish failed; will retry");
                    failed.push(row.id);
                }
            }
        }
        db::outbox::delete_many(&state.pool, &confirmed).await?;
        if !failed.is_empty() {
            db::outbox::unclaim(&state.pool, &failed).await?;
        }
        published += confirmed.len();
        if batch.len() < BATCH as usize || !failed.is_empty() {
            return Ok(published);
        }
    }
}

/// Returns jobs whose worker is gone (lease expired) to the queue: status `queued`, a
/// `queued` event, and an outbox row the next relay pass publishes. The new delivery
/// resumes the job, skipping the steps it finished.
pub async fn reap(state: &AppState) -> Result<usize, sqlx::Error> {
    let mut tx = state.pool.begin().await?;
    let reaped = db::jobs::reap_expired(&mut tx, BATCH).await?;
    let mut events = Vec::with_capacity(reaped.len());
    let requeued = EventData::Queued(QueuedData::requeued(Some(QueuedReason::WorkerLost)));
    for job_id in &reaped {
        events.push(db::events::append(&mut tx, *job_id, &requeued).await?);
    }
    tx.commit().await?;
    state.events.publish_all(&events).await;
    Ok(reaped.len())
}
