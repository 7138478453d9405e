//! W3C Trace Context (`traceparent`, https://www.w3.org/TR/trace-context/): the api
//! continues a caller's trace or starts one, stores it with the job's outbox row, the
//! publisher puts it in the AMQP message's headers, and the worker continues it, so
//! one trace id ties submit → steps → result together in every log line.

use std::fmt;

/// AMQP header and HTTP header name.
pub const HEADER: &str = "traceparent";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The span this context names: the parent of whatever continues it.
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceContext {
    /// A new trace (the caller sent none, or an invalid one).
    pub fn root() -> Self {
        Self { trace_id: nonzero(rand::random()), span_id: nonzero(rand::random()), sampled: true }
    }

    /// A span within this trace: same trace id, new span id.
    pub fn child(&self) -> Self {
        Self { span_id: nonzero(rand::random()), ..*self }
    }

    /// Parses a `traceparent` value; `None` for anything the spec says to ignore
    /// (bad length or hex, version `ff`, all-zero ids). Later versions are read by
    /// their version-00 prefix, as the spec asks.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.splitn(4, '-');
        let (version, trace, span, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let flags = if version == "00" { (rest.len() == 2).then_some(rest)? } else { rest.get(..2)? };
        let lower_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !lower_hex(version, 2)
            || version == "ff"
            || !lower_hex(trace, 32)
            || !lower_hex(span, 16)
            || !lower_hex(flags, 2)
        {
            return None;
        }
        if version != "00" && rest.len() > 2 && !rest[2..].starts_with('-') {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|id| *id != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|id| *id != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// The `traceparent` header value (version 00).
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }
}

fn nonzero<T: PartialEq + From<u8>>(id: T) -> T {
    if id == T::from(0) {
        T::from(1)
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_the_spec_example() {
        let context = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id_hex(), "00f067aa0ba902b7");
        assert!(context.sampled);
        assert_eq!(context.to_string(), EXAMPLE);
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let parent = TraceContext::parse(EXAMPLE).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(TraceContext::parse(&child.to_string()), Some(child));
    }

    #[test]
    fn invalid_values_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        assert!(TraceContext::parse(future).is_some_and(|c| !c.sampled));
    }
}
