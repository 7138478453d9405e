//! What an event stream carries, as the OpenAPI document describes it. The frames
//! themselves are rendered by serde from `common::events` (once per event, for every
//! stream); these views give the same JSON a schema — one per event kind, chosen by
//! `kind` — and a test holds the two renderings together.

use chrono::{DateTime, Utc};
use common::{
    domain::{EventKind, Stage},
    events::JobEvent,
    job::{EndedData, EventData, QueuedData, StartedData, StepCompletedData, StepFailedData, StepStartedData},
};
use poem_openapi::{Object, Union};
use uuid::Uuid;

/// Declares the view of one event kind: the event's fields around its typed `data`.
macro_rules! event_views {
    ($($(#[doc = $doc:literal])* $name:ident($data:ty);)+) => {$(
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Object)]
        pub struct $name {
            pub job_id: Uuid,
            /// The SSE `id:`: 1, 2, 3, … per job, without gaps.
            pub seq: i64,
            pub data: $data,
            pub created_at: DateTime<Utc>,
        }
    )+};
}

event_views! {
    /// `queued`: accepted, or back in the queue.
    QueuedEvent(QueuedData);
    /// `started`: a worker took the job for the first time.
    StartedEvent(StartedData);
    /// `step.started`: a model was called.
    StepStartedEvent(StepStartedData);
    /// `step.completed`: a model answered.
    StepCompletedEvent(StepCompletedData);
    /// `step.failed`: a model's call failed.
    StepFailedEvent(StepFailedData);
    /// `succeeded`: the job's last event, with its result.
    SucceededEvent(EndedData);
    /// `failed`: the job's last event, with its error.
    FailedEvent(EndedData);
    /// `cancelled`: the job's last event.
    CancelledEvent(EndedData);
}

/// A job's lifecycle event (SSE `event:` is its `kind`, `id:` its `seq`).
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "kind")]
pub enum EventView {
    #[oai(mapping = "queued")]
    Queued(QueuedEvent),
    #[oai(mapping = "started")]
    Started(StartedEvent),
    #[oai(mapping = "step.started")]
    StepStarted(StepStartedEvent),
    #[oai(mapping = "step.completed")]
    StepCompleted(StepCompletedEvent),
    #[oai(mapping = "step.failed")]
    StepFailed(StepFailedEvent),
    #[oai(mapping = "succeeded")]
    Succeeded(SucceededEvent),
    #[oai(mapping = "failed")]
    Failed(FailedEvent),
    #[oai(mapping = "cancelled")]
    Cancelled(CancelledEvent),
}

impl From<JobEvent> for EventView {
    fn from(event: JobEvent) -> Self {
        let JobEvent { job_id, seq, kind, data, created_at } = event;
        macro_rules! view {
            ($variant:ident, $view:ident, $data:expr) => {
                EventView::$variant($view { job_id, seq, data: $data, created_at })
            };
        }
        match (kind, data) {
            (_, EventData::Queued(data)) => view!(Queued, QueuedEvent, data),
            (_, EventData::Started(data)) => view!(Started, StartedEvent, data),
            (_, EventData::StepStarted(data)) => view!(StepStarted, StepStartedEvent, data),
            (_, EventData::StepCompleted(data)) => view!(StepCompleted, StepCompletedEvent, data),
            (_, EventData::StepFailed(data)) => view!(StepFailed, StepFailedEvent, data),
            (EventKind::Succeeded, EventData::Ended(data)) => view!(Succeeded, SucceededEvent, data),
            (EventKind::Cancelled, EventData::Ended(data)) => view!(Cancelled, CancelledEvent, data),
            (_, EventData::Ended(data)) => view!(Failed, FailedEvent, data),
        }
    }
}

/// A piece of a running step's answer (SSE `event: token`, no `id:`: live only).
#[derive(Debug, Clone, Object)]
pub struct TokenView {
    pub job_id: Uuid,
    pub stage: Stage,
    pub model: String,
    /// The new text.
    pub delta: String,
    /// Byte offset of `delta` in the step's text.
    pub index: u64,
}

/// A running step's text so far, sent to a client that joins mid-step (SSE
/// `event: snapshot`); the `token` events after it continue from its end.
#[derive(Debug, Clone, Object)]
pub struct SnapshotView {
    pub job_id: Uuid,
    pub stage: Stage,
    pub model: String,
    pub text: String,
}

/// The reconnection delay the stream asks for (sent once, as SSE `retry:`).
#[derive(Debug, Clone, Object)]
pub struct RetryView {
    pub retry_ms: u64,
}

/// What an event stream carries.
#[derive(Debug, Clone, Union)]
pub enum StreamItemView {
    Event(EventView),
    Token(TokenView),
    Snapshot(SnapshotView),
    Retry(RetryView),
}

#[cfg(test)]
mod tests {
    use common::{
        domain::{ErrorCode, JobStatus, QueuedReason},
        job::{Answer, JobError, JobResult, StepError, Usage},
    };
    use poem_openapi::types::ToJSON;
    use serde_json::Value;

    use super::*;

    fn event(data: EventData) -> JobEvent {
        let created_at = DateTime::<Utc>::from_timestamp_millis(1_700_000_000_123).expect("a time");
        JobEvent { job_id: Uuid::now_v7(), seq: 3, kind: data.kind(), data, created_at }
    }

    /// Every kind's frame (serde) is what its documented view renders.
    #[test]
    fn each_event_kind_is_sent_as_its_view_describes() {
        let step = |model: &str| StepStartedData { stage: Stage::Initial, model: model.to_owned() };
        let answer = Answer { model: "mock/alpha".to_owned(), output: "yes".to_owned() };
        let events = [
            EventData::Queued(QueuedData::accepted("direct", &["mock/alpha".to_owned()])),
            EventData::Queued(QueuedData::retry(2, 5_000)),
            EventData::Queued(QueuedData::requeued(Some(QueuedReason::Replayed))),
            EventData::Started(StartedData { attempt: 1 }),
            EventData::StepStarted(step("mock/alpha")),
            EventData::StepCompleted(StepCompletedData {
                stage: Stage::Meta,
                model: "mock/alpha".to_owned(),
                output: "yes".to_owned(),
                usage: Usage { input_tokens: 3, output_tokens: 4 },
                cost_usd: 0.5,
                cached: true,
            }),
            EventData::StepFailed(StepFailedData {
                stage: Stage::Synthesis,
                model: "mock/beta".to_owned(),
                error: StepError::permanent(ErrorCode::Auth, "refused"),
            }),
            EventData::ended(
                JobStatus::Succeeded,
                Some(JobResult { answers: vec![answer], ..JobResult::default() }),
                None,
            ),
            EventData::ended(JobStatus::Failed, None, Some(JobError::new(ErrorCode::Timeout, "slow"))),
            EventData::ended(JobStatus::Cancelled, None, Some(JobError::new(ErrorCode::Cancelled, "stop"))),
        ];
        for data in events {
            let event = event(data);
            let mut sent = serde_json::to_value(&event).expect("serde");
            let mut documented = EventView::from(event.clone()).to_json().expect("poem");
            // The same instant, whichever way each spells it.
            let instant = |v: &mut Value| v["created_at"].take().as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
            assert_eq!(instant(&mut sent), Some(event.created_at));
            assert_eq!(instant(&mut documented), Some(event.created_at));
            assert_eq!(sent, documented, "{}", event.kind);
        }
    }
}
