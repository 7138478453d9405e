//! A minimal Server-Sent Events reader for tests.

use futures::StreamExt;
use serde_json::Value;

use crate::support::PATIENCE;

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

/// Something read from the stream: an event, a comment (heartbeat), or a `retry:` hint.
#[derive(Debug, Clone)]
pub enum Frame {
    Event(SseEvent),
    Comment,
    Retry(u64),
}

pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(content_type.starts_with("text/event-stream"), "content-type {content_type}");
        Self { body: response.bytes_stream().boxed(), buffer: String::new() }
    }

    /// The next frame, `None` when the server ends the stream.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_block(&block));
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.next()).await.expect("stream stalled")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        }
    }

    /// Every event until the server closes the stream.
    pub async fn collect_events(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(frame) = self.next_frame().await {
            if let Frame::Event(event) = frame {
                events.push(event);
            }
        }
        events
    }
}

fn parse_block(block: &str) -> Frame {
    let (mut id, mut event, mut data) = (None, None, String::new());
    let mut comment = true;
    let mut retry = None;
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        comment = false;
        let (field, value) = line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => event = Some(value.to_owned()),
            "data" => data.push_str(value),
            "retry" => retry = value.parse().ok(),
            _ => {}
        }
    }
    if comment {
        return Frame::Comment;
    }
    if let (Some(retry), true) = (retry, data.is_empty()) {
        return Frame::Retry(retry);
    }
    Frame::Event(SseEvent { id, event, data: serde_json::from_str(&data).unwrap_or(Value::Null) })
}
