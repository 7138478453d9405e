//! W3C Trace Context (`traceparent`, https://www.w3.org/TR/trace-context/): the api
//! continues a caller's trace or starts one, stores it with the job's outbox row, the
//! publisher puts it in the AMQP message's headers, and the worker continues it, so
//! one trace id ties submit → steps → result together in every log line.
//!
//! OpenTelemetry's `TraceContextPropagator` reads and writes the header; this module
//! gives it its carriers (a message's AMQP headers here; the api brings its HTTP
//! headers) and holds values to the spec's field widths, which the propagator does not
//! check (`well_formed`).

use std::fmt;

use lapin::types::FieldTable;
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    Context,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// What the propagator reads a context from: AMQP headers here, HTTP headers in the api.
pub use opentelemetry::propagation::Extractor;

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

    /// The context a carrier's `traceparent` names; `None` for anything the spec says
    /// to ignore (bad length or hex, version `ff`, all-zero ids). Later versions are
    /// read by their version-00 prefix, as the spec asks.
    pub fn extract(carrier: &dyn Extractor) -> Option<Self> {
        if !carrier.get(HEADER).is_some_and(well_formed) {
            return None;
        }
        let context = TraceContextPropagator::new().extract_with_context(&Context::new(), carrier);
        let span = context.span();
        let remote = span.span_context();
        remote.is_valid().then(|| Self::from(remote))
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// The `traceparent` header value (version 00), written directly: it is on every
/// submit's and every delivery's path, and the propagator would build a context and a
/// map to write the same four fields.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }
}

impl From<&SpanContext> for TraceContext {
    fn from(span: &SpanContext) -> Self {
        Self {
            trace_id: u128::from_be_bytes(span.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(span.span_id().to_bytes()),
            sampled: span.is_sampled(),
        }
    }
}

/// The context as a remote parent: what a process that receives it continues.
impl From<TraceContext> for SpanContext {
    fn from(context: TraceContext) -> Self {
        let flags = if context.sampled { TraceFlags::SAMPLED } else { TraceFlags::NOT_SAMPLED };
        SpanContext::new(
            TraceId::from(context.trace_id),
            SpanId::from(context.span_id),
            flags,
            true,
            TraceState::default(),
        )
    }
}

/// A message's AMQP headers as the propagator's carrier; values are long strings,
/// as the publisher writes them.
pub struct AmqpHeaders<'a>(pub &'a FieldTable);

impl Extractor for AmqpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.inner().get(key)?.as_long_string()?;
        std::str::from_utf8(value.as_bytes()).ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|key| key.as_str()).collect()
    }
}

/// Whether `traceparent` has the spec's shape: at least four fields, exactly four in
/// version 00, the first four of 2, 32, 16 and 2 lower-case hex digits. The
/// propagator reads each field as a number, so it would also take `00-1-1-01`, a
/// `+` sign, an upper-case version or a trailing `-`.
fn well_formed(traceparent: &str) -> bool {
    let fields: Vec<&str> = traceparent.trim().split('-').collect();
    let hex =
        |field: &str, len: usize| field.len() == len && field.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    fields.len() >= 4
        && (fields[0] != "00" || fields.len() == 4)
        && fields.iter().zip([2, 32, 16, 2]).all(|(&field, len)| hex(field, len))
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
    use std::collections::HashMap;

    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A `traceparent` value read as a carrier holding only it.
    fn parse(value: &str) -> Option<TraceContext> {
        TraceContext::extract(&HashMap::from([(HEADER.to_owned(), value.to_owned())]))
    }

    #[test]
    fn round_trips_the_spec_example() {
        let context = parse(EXAMPLE).expect("valid");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id_hex(), "00f067aa0ba902b7");
        assert!(context.sampled);
        assert_eq!(context.to_string(), EXAMPLE);
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let parent = parse(EXAMPLE).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(parse(&child.to_string()), Some(child));
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
            // What the propagator alone would take.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-1-2-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        assert!(parse(future).is_some_and(|c| !c.sampled));
    }

    #[test]
    fn a_job_message_carries_its_trace_in_an_amqp_header() {
        let mut headers = FieldTable::default();
        headers.insert(HEADER.into(), lapin::types::AMQPValue::LongString(EXAMPLE.into()));
        let context = TraceContext::extract(&AmqpHeaders(&headers)).expect("valid");
        assert_eq!(context.to_string(), EXAMPLE);
        assert_eq!(TraceContext::extract(&AmqpHeaders(&FieldTable::default())), None);
    }
}
