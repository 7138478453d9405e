//! Server-Sent Events on the wire. A live event is rendered into its SSE frame once,
//! when it arrives, and that frame (reference-counted bytes) is what every stream
//! watching the job sends: fanning an event out to a thousand clients copies no text.

use std::{
    fmt::Write as _,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::events::{JobEvent, TokenEvent};
use futures::{stream::BoxStream, Stream, StreamExt};
use poem::{Body, IntoResponse, Response};
use poem_openapi::{
    payload::Payload,
    registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry},
    types::Type,
    ApiResponse,
};
use serde::Serialize;

/// An event with its SSE frame, rendered once and shared by every stream that sends it.
#[derive(Debug)]
pub struct Rendered<T> {
    pub value: T,
    pub frame: Bytes,
}

impl Rendered<JobEvent> {
    /// A persisted event: its `id:` is its sequence number, its `event:` its kind.
    pub fn event(value: JobEvent) -> Self {
        let json = to_json(&value);
        Self::event_with_json(value, &json)
    }

    /// As [`Rendered::event`], with the JSON already at hand (as received).
    pub fn event_with_json(value: JobEvent, json: &str) -> Self {
        let frame = frame(Some(value.seq), value.kind.as_str(), json);
        Self { value, frame }
    }
}

impl Rendered<TokenEvent> {
    /// A live token event (no `id:`: `Last-Event-ID` always names a persisted event).
    pub fn token(value: TokenEvent) -> Self {
        let json = to_json(&value);
        Self::token_with_json(value, &json)
    }

    pub fn token_with_json(value: TokenEvent, json: &str) -> Self {
        Self { frame: frame(None, "token", json), value }
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// One SSE frame. Every line of `data` gets its own `data:` field, so a newline in it
/// (never in JSON from serde, but the bus is not ours alone) cannot end the frame early.
pub fn frame(id: Option<i64>, event: &str, data: &str) -> Bytes {
    let mut frame = String::with_capacity(data.len() + event.len() + 40);
    if let Some(id) = id {
        let _ = writeln!(frame, "id: {id}");
    }
    let _ = writeln!(frame, "event: {event}");
    // SSE ends a line at `\r\n`, `\n` or a lone `\r`.
    let unified;
    let data = if data.contains('\r') {
        unified = data.replace("\r\n", "\n").replace('\r', "\n");
        unified.as_str()
    } else {
        data
    };
    for line in data.split('\n') {
        let _ = writeln!(frame, "data: {line}");
    }
    frame.push('\n');
    Bytes::from(frame)
}

/// The `retry:` field: how long a disconnected `EventSource` waits to reconnect.
pub fn retry(after: Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", after.as_millis()))
}

/// A comment line, sent while a stream is quiet so proxies keep the connection.
const HEARTBEAT: Bytes = Bytes::from_static(b":\n\n");

/// A `text/event-stream` response of ready frames, with a heartbeat every `heartbeat`.
/// Documented as a stream of `Item`.
pub struct SseBody<Item> {
    frames: BoxStream<'static, Bytes>,
    heartbeat: Duration,
    documented: std::marker::PhantomData<fn() -> Item>,
}

impl<Item> SseBody<Item> {
    pub fn new(frames: BoxStream<'static, Bytes>, heartbeat: Duration) -> Self {
        Self { frames, heartbeat, documented: std::marker::PhantomData }
    }
}

impl<Item: Type> Payload for SseBody<Item> {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            items: Some(Box::new(Item::schema_ref())),
            ..MetaSchema::new_with_format("array", "event-stream")
        }))
    }

    fn register(registry: &mut Registry) {
        Item::register(registry);
    }
}

impl<Item: Type> ApiResponse for SseBody<Item> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType { content_type: Self::CONTENT_TYPE, schema: Self::schema_ref() }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        Item::register(registry);
    }
}

impl<Item: Send + 'static> IntoResponse for SseBody<Item> {
    fn into_response(self) -> Response {
        let frames = Heartbeats::new(self.frames, self.heartbeat).map(Ok::<_, std::io::Error>);
        Response::builder()
            .content_type("text/event-stream")
            // Tells nginx not to buffer the stream.
            .header("x-accel-buffering", "no")
            .body(Body::from_bytes_stream(frames))
    }
}

/// `frames`, with a heartbeat every `every` (on a timer of its own: resetting it at
/// each frame would cost a timer update per frame per stream).
struct Heartbeats {
    frames: BoxStream<'static, Bytes>,
    every: Duration,
    quiet: Pin<Box<tokio::time::Sleep>>,
}

impl Heartbeats {
    fn new(frames: BoxStream<'static, Bytes>, every: Duration) -> Self {
        Self { frames, every, quiet: Box::pin(tokio::time::sleep(every)) }
    }
}

impl Stream for Heartbeats {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let every = self.every;
        if let Poll::Ready(frame) = self.frames.poll_next_unpin(cx) {
            return Poll::Ready(frame);
        }
        if self.quiet.as_mut().poll(cx).is_ready() {
            self.quiet.as_mut().reset(tokio::time::Instant::now() + every);
            return Poll::Ready(Some(HEARTBEAT));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_id_event_and_one_data_field_per_line() {
        assert_eq!(frame(Some(7), "queued", "{\"a\":1}"), "id: 7\nevent: queued\ndata: {\"a\":1}\n\n");
        assert_eq!(frame(None, "token", "one\r\ntwo"), "event: token\ndata: one\ndata: two\n\n");
        assert_eq!(frame(None, "token", "a\rb\n\nc"), "event: token\ndata: a\ndata: b\ndata: \ndata: c\n\n");
        assert_eq!(retry(Duration::from_secs(2)), "retry: 2000\n\n");
    }

    #[tokio::test]
    async fn a_quiet_stream_gets_heartbeats_and_a_busy_one_its_frames() {
        let frames = futures::stream::iter([Bytes::from_static(b"data: 1\n\n")]).chain(futures::stream::pending());
        let mut stream = Heartbeats::new(frames.boxed(), Duration::from_millis(20));
        assert_eq!(stream.next().await, Some(Bytes::from_static(b"data: 1\n\n")));
        assert_eq!(stream.next().await, Some(HEARTBEAT));
        assert_eq!(stream.next().await, Some(HEARTBEAT));
    }
}
