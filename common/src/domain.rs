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
