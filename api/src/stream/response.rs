//! A job's event stream as an HTTP response: the caller's stream slot, then a
//! `retry:` hint, the stream's frames, and heartbeats while it is quiet.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use poem_openapi::types::ToJSON;
use uuid::Uuid;

use super::{
    frame::{self, SseBody},
    limit::StreamPermit,
    views::{SnapshotView, StreamItemView},
    JobEventStream, Partials, Sources, StreamItem,
};
use crate::{auth::Principal, error::ApiError, state::AppState};

/// How long a disconnected `EventSource` waits before reconnecting (SSE `retry:`).
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

/// The SSE response for one job's events after `after`.
pub fn event_stream(
    state: &AppState,
    permit: StreamPermit,
    job_id: Uuid,
    after: i64,
    job_ended: bool,
) -> SseBody<StreamItemView> {
    let stream = job_items(state, job_id, after, job_ended);
    let retry = futures::stream::once(async { frame::retry(RECONNECT_AFTER) });
    // The permit lives as long as the stream, which ends when it is done, idle, or its
    // client is found gone (at the next write).
    let items = retry
        .chain(stream.into_stream().map(move |item| {
            let _open = &permit;
            frame_of(job_id, item)
        }))
        .boxed();
    let heartbeat = state.config.sse_heartbeat();
    SseBody::new(items, heartbeat)
}

/// A job's events after `after` (with its tokens and snapshots), as every stream
/// reads them: until the terminal event, `ULTRA_SSE_IDLE_SECS` of quiet, or shutdown.
pub fn job_items(state: &AppState, job_id: Uuid, after: i64, job_ended: bool) -> JobEventStream {
    let sources = Sources {
        pool: state.pool.clone(),
        hub: state.hub.clone(),
        partials: Partials { redis: state.redis.clone(), prefix: state.config.redis_prefix.clone() },
        shutdown: state.shutdown.clone(),
        idle_limit: state.config.sse_idle(),
    };
    JobEventStream::new(sources, job_id, after, job_ended)
}

/// A slot for one more open stream of this caller, within their tier's limit.
pub fn stream_permit(state: &AppState, principal: &Principal) -> Result<StreamPermit, ApiError> {
    let limit = state.tiers.for_user(&principal.tier).concurrent_streams;
    state.streams.acquire(principal.user_id, limit).ok_or_else(|| {
        ApiError::TooManyStreams(format!("{limit} event streams are open; close one or wait for a job to end"))
    })
}

/// The SSE frame of a stream item. Lifecycle events and tokens come rendered (once for
/// every stream); a snapshot is one stream's own.
fn frame_of(job_id: Uuid, item: StreamItem) -> Bytes {
    match item {
        StreamItem::Event(event) => event.frame.clone(),
        StreamItem::Token(token) => token.frame.clone(),
        StreamItem::Snapshot { stage, model, text } => {
            frame::frame(None, "snapshot", &SnapshotView { job_id, stage, model, text }.to_json_string())
        }
    }
}
