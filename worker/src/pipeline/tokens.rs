//! Token events: a step's streamed deltas, coalesced (every 50 ms or 64 bytes,
//! whichever comes first) so a fast model does not flood the bus, published live on
//! the job's channel and appended to the step's snapshot in Redis. Never persisted:
//! the step's `step.completed` event carries the whole text.

use std::time::Duration;

use common::{
    domain::Stage,
    events::{EventPublisher, TokenEvent},
};
use tokio::{sync::mpsc, time::Instant};
use uuid::Uuid;

/// Longest a delta waits before it is sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Buffered bytes that trigger a send at once.
pub const FLUSH_BYTES: usize = 64;

/// Where coalesced deltas go (Redis in the worker; a vector in tests).
#[async_trait::async_trait]
pub trait TokenSink: Send + Sync {
    async fn send(&self, token: TokenEvent);
}

#[async_trait::async_trait]
impl TokenSink for EventPublisher {
    async fn send(&self, token: TokenEvent) {
        self.publish_token(&token).await;
    }
}

pub struct TokenRelay<S> {
    sink: S,
    job_id: Uuid,
    stage: Stage,
    model: String,
}

impl<S: TokenSink> TokenRelay<S> {
    pub fn new(sink: S, job_id: Uuid, stage: Stage, model: &str) -> Self {
        Self { sink, job_id, stage, model: model.to_owned() }
    }

    /// Relays deltas until the sender is dropped, then sends what is left.
    pub async fn run(self, mut deltas: mpsc::UnboundedReceiver<String>) {
        let mut pending = String::new();
        let mut index = 0;
        let mut deadline: Option<Instant> = None;
        loop {
            let flush_now = tokio::select! {
                delta = deltas.recv() => match delta {
                    Some(delta) => {
                        pending.push_str(&delta);
                        deadline.get_or_insert_with(|| Instant::now() + FLUSH_EVERY);
                        pending.len() >= FLUSH_BYTES
                    }
                    None => {
                        self.flush(&mut pending, &mut index).await;
                        return;
                    }
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => true,
            };
            if flush_now {
                self.flush(&mut pending, &mut index).await;
                deadline = None;
            }
        }
    }

    async fn flush(&self, pending: &mut String, index: &mut usize) {
        if pending.is_empty() {
            return;
        }
        let delta = std::mem::take(pending);
        let token =
            TokenEvent { job_id: self.job_id, stage: self.stage, model: self.model.clone(), index: *index, delta };
        *index += token.delta.len();
        self.sink.send(token).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<TokenEvent>>>);

    #[async_trait::async_trait]
    impl TokenSink for Collected {
        async fn send(&self, token: TokenEvent) {
            self.0.lock().expect("lock").push(token);
        }
    }

    #[tokio::test]
    async fn deltas_are_coalesced_by_size_and_time() {
        let sink = Collected::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let relay = tokio::spawn(TokenRelay::new(sink.clone(), Uuid::nil(), Stage::Initial, "m").run(rx));
        for _ in 0..10 {
            tx.send("0123456789".to_owned()).expect("send"); // 100 bytes at once
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send("tail".to_owned()).expect("send");
        tokio::time::sleep(Duration::from_millis(200)).await; // the timer sends the rest
        drop(tx);
        relay.await.expect("relay");
        let tokens = sink.0.lock().expect("lock").clone();
        let text: String = tokens.iter().map(|t| t.delta.as_str()).collect();
        assert_eq!(text.len(), 104);
        assert!(tokens.len() < 11, "coalesced: {} events for 11 deltas", tokens.len());
        // Each index is where its delta starts in the whole text.
        let mut offset = 0;
        for token in &tokens {
            assert_eq!(token.index, offset);
            offset += token.delta.len();
        }
    }
}
