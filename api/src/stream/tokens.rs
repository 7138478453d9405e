//! Token bookkeeping for one event stream: which steps are running, how much of each
//! step's text the client already has (from a snapshot or earlier deltas), and so
//! which token events to forward, trim or drop.

use std::collections::{HashMap, HashSet};

use common::{
    domain::{EventKind, Stage},
    events::{JobEvent, TokenEvent},
};

type StepKey = (Stage, String);

#[derive(Default)]
pub struct TokenTracker {
    running: HashSet<StepKey>,
    finished: HashSet<StepKey>,
    /// Bytes of each running step's text the client has.
    offsets: HashMap<StepKey, usize>,
}

fn step_of(event: &JobEvent) -> Option<StepKey> {
    event.data.step().map(|(stage, model)| (stage, model.to_owned()))
}

impl TokenTracker {
    /// Follows the lifecycle events the client is sent.
    pub fn observe(&mut self, event: &JobEvent) {
        let Some(step) = step_of(event) else { return };
        match event.kind {
            EventKind::StepStarted => {
                self.finished.remove(&step);
                self.offsets.remove(&step);
                self.running.insert(step);
            }
            EventKind::StepCompleted | EventKind::StepFailed => {
                self.running.remove(&step);
                self.offsets.remove(&step);
                self.finished.insert(step);
            }
            _ => {}
        }
    }

    /// Steps running now, for a snapshot.
    pub fn running(&self) -> Vec<(Stage, String)> {
        self.running.iter().cloned().collect()
    }

    /// The client got the first `len` bytes of a step in a snapshot.
    pub fn snapshot_sent(&mut self, stage: Stage, model: &str, len: usize) {
        self.offsets.insert((stage, model.to_owned()), len);
    }

    /// The part of `token` the client does not have yet, if any. Tokens of finished
    /// steps are dropped: `step.completed` carried the whole text.
    pub fn admit(&mut self, token: &TokenEvent) -> Option<TokenEvent> {
        let step = (token.stage, token.model.clone());
        if self.finished.contains(&step) {
            return None;
        }
        let have = self.offsets.get(&step).copied().unwrap_or(0);
        let end = token.index + token.delta.len();
        if end <= have {
            return None; // already in a snapshot or an earlier delta
        }
        let skip = have.saturating_sub(token.index);
        let delta = token.delta.get(skip..)?.to_owned();
        self.offsets.insert(step, end);
        Some(TokenEvent { index: token.index + skip, delta, ..token.clone() })
    }
}

#[cfg(test)]
mod tests {
    use common::job::{EventData, StepCompletedData, StepStartedData, Usage};
    use uuid::Uuid;

    use super::*;

    fn token(index: usize, delta: &str) -> TokenEvent {
        TokenEvent { job_id: Uuid::nil(), stage: Stage::Initial, model: "m".into(), delta: delta.into(), index }
    }

    fn event(data: EventData) -> JobEvent {
        JobEvent { job_id: Uuid::nil(), seq: 1, kind: data.kind(), data, created_at: chrono::Utc::now() }
    }

    fn started() -> JobEvent {
        event(EventData::StepStarted(StepStartedData { stage: Stage::Initial, model: "m".into() }))
    }

    fn completed() -> JobEvent {
        event(EventData::StepCompleted(StepCompletedData {
            stage: Stage::Initial,
            model: "m".into(),
            output: "Hello, world!".into(),
            usage: Usage::default(),
            cost_usd: 0.0,
            cached: false,
        }))
    }

    #[test]
    fn deltas_overlapping_a_snapshot_are_trimmed_and_repeats_dropped() {
        let mut tracker = TokenTracker::default();
        tracker.observe(&started());
        assert_eq!(tracker.running(), vec![(Stage::Initial, "m".to_owned())]);
        tracker.snapshot_sent(Stage::Initial, "m", 5); // "Hello"
        assert_eq!(tracker.admit(&token(0, "Hello")), None);
        assert_eq!(tracker.admit(&token(3, "lo, wo")).map(|t| (t.index, t.delta)), Some((5, ", wo".into())));
        assert_eq!(tracker.admit(&token(9, "rld")).map(|t| t.delta), Some("rld".into()));
        assert_eq!(tracker.admit(&token(9, "rld")), None, "a repeat is dropped");
        tracker.observe(&completed());
        assert_eq!(tracker.admit(&token(12, "!")), None, "late tokens of a finished step are dropped");
        assert!(tracker.running().is_empty());
    }
}
