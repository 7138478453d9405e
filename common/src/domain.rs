//! The vocabulary shared by the api and the workers: job and step statuses, event
//! kinds, stages and patterns. Each is stored in PostgreSQL as its `as_str` text.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Declares a string-backed enum with one canonical spelling per variant, used for
/// the database, JSON and SSE alike.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident ($human:literal) { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, poem_openapi::Enum)]
        #[sqlx(type_name = "text")]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] #[sqlx(rename = $text)] #[oai(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownVariant { kind: $human, value: s.to_owned() }),
                }
            }
        }
    };
}

/// A string that names no variant of the expected enum.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub value: String,
}

string_enum! {
    /// `queued → running → succeeded | failed | cancelled`; terminal statuses never change.
    JobStatus("job status") {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

string_enum! {
    /// What a webhook tells: a job or a batch ended (the statuses they end with), or a
    /// test ping an endpoint's owner asked for.
    WebhookEventType("webhook event type") {
        JobSucceeded => "job.succeeded",
        JobFailed => "job.failed",
        JobCancelled => "job.cancelled",
        BatchCompleted => "batch.completed",
        BatchFailed => "batch.failed",
        BatchCancelled => "batch.cancelled",
        BatchExpired => "batch.expired",
        WebhookTest => "webhook.test",
    }
}

impl WebhookEventType {
    /// The event of a job that ended with `status`; `None` for a status that is not an end.
    pub fn of_job(status: JobStatus) -> Option<Self> {
        match status {
            JobStatus::Succeeded => Some(Self::JobSucceeded),
            JobStatus::Failed => Some(Self::JobFailed),
            JobStatus::Cancelled => Some(Self::JobCancelled),
            JobStatus::Queued | JobStatus::Running => None,
        }
    }

    /// The event of a batch that ended with `status` (OpenAI's batch statuses).
    pub fn of_batch(status: &str) -> Option<Self> {
        match status {
            "completed" => Some(Self::BatchCompleted),
            "failed" => Some(Self::BatchFailed),
            "cancelled" => Some(Self::BatchCancelled),
            "expired" => Some(Self::BatchExpired),
            _ => None,
        }
    }
}

string_enum! {
    /// A webhook delivery: `pending` until a 2xx (`succeeded`) or its last attempt
    /// (`failed`).
    DeliveryStatus("delivery status") {
        Pending => "pending",
        Succeeded => "succeeded",
        Failed => "failed",
    }
}

string_enum! {
    /// The state of one provider call.
    StepStatus("step status") {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
    }
}

string_enum! {
    /// Pipeline stages, in the order they run.
    Stage("stage") {
        Initial => "initial",
        Meta => "meta",
        Synthesis => "synthesis",
    }
}

string_enum! {
    /// Kinds of job events, as they appear in `job_events.kind` and SSE `event:` lines.
    EventKind("event kind") {
        Queued => "queued",
        Started => "started",
        StepStarted => "step.started",
        StepCompleted => "step.completed",
        StepFailed => "step.failed",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
}

impl EventKind {
    /// A terminal event is the last one of its job: streams end after it.
    pub fn is_terminal(self) -> bool {
        matches!(self, EventKind::Succeeded | EventKind::Failed | EventKind::Cancelled)
    }
}

string_enum! {
    /// Why a step or a job failed: a stable code for clients, metrics and retries.
    ErrorCode("error code") {
        /// The provider refused the call for now (HTTP 429).
        RateLimited => "rate_limited",
        /// The provider is overloaded or failing (HTTP 5xx).
        Overloaded => "overloaded",
        /// The provider did not answer in time.
        Timeout => "timeout",
        /// The provider could not be reached.
        Connection => "connection",
        /// The provider refused the configured credentials.
        Auth => "auth",
        /// The provider refused the request as invalid.
        BadRequest => "bad_request",
        /// The provider's content filter withheld the answer.
        ContentFiltered => "content_filtered",
        /// The prompt does not fit the model's context window.
        ContextTooLong => "context_too_long",
        /// The answer was cut off at the token limit.
        Truncated => "truncated",
        /// The provider's circuit breaker is open after repeated failures.
        CircuitOpen => "circuit_open",
        /// The model is not in the worker's catalog.
        UnknownModel => "unknown_model",
        /// No provider is configured for the model.
        NoProvider => "no_provider",
        /// The worker has no such pattern.
        UnknownPattern => "unknown_pattern",
        /// Someone cancelled the job.
        Cancelled => "cancelled",
        /// The job's deadline passed.
        DeadlineExceeded => "deadline_exceeded",
        /// Fewer models answered than the job's `min_models`.
        TooFewModels => "too_few_models",
        /// Every model that could write the synthesis failed.
        SynthesisFailed => "synthesis_failed",
        /// The job's message was dead-lettered after repeated delivery failures.
        DeadLettered => "dead_lettered",
    }
}

string_enum! {
    /// Why a job is queued again (its first `queued` event has none).
    QueuedReason("queued reason") {
        /// A transient failure: the job runs again after a delay.
        Retry => "retry",
        /// Its worker stopped renewing its lease.
        WorkerLost => "worker lost; requeued",
        /// An administrator replayed a dead letter.
        Replayed => "replayed by an administrator",
    }
}

string_enum! {
    /// Who speaks a chat message.
    ChatRole("chat role") {
        System => "system",
        User => "user",
        Assistant => "assistant",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().ok(), Some(*status));
        }
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().ok(), Some(*kind));
        }
        assert!("nope".parse::<JobStatus>().is_err());
    }

    #[test]
    fn serde_uses_the_canonical_spelling() {
        assert_eq!(serde_json::to_string(&EventKind::StepCompleted).ok().as_deref(), Some("\"step.completed\""));
    }
}
