//! Logging and tracing: JSON lines for machines, pretty lines for a terminal, and —
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set — spans exported over OTLP/HTTP (protobuf) in batches, configured by the
//! standard `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`, …).

use std::io::IsTerminal;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

use crate::{config::LogFormat, trace::TraceContext};

/// Flushes exported spans when the process ends (`shutdown`).
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(err) = provider.shutdown() {
                eprintln!("warning: could not flush traces: {err}");
            }
        }
    }
}

/// Installs the global subscriber; `RUST_LOG` filters (default `info`). Calling it
/// twice is harmless (the second call is ignored), which tests rely on.
pub fn init(format: Option<LogFormat>) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=warn"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() { LogFormat::Pretty } else { LogFormat::Json });
    let json =
        (format == LogFormat::Json).then(|| fmt::layer().json().flatten_event(true).with_writer(std::io::stderr));
    let pretty = (format == LogFormat::Pretty).then(|| fmt::layer().with_writer(std::io::stderr));
    let provider = match otlp_provider() {
        Ok(provider) => provider,
        Err(err) => {
            eprintln!("warning: OTLP export is off: {err}");
            None
        }
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("ultra")));
    let installed = tracing_subscriber::registry().with(filter).with(json).with(pretty).with(otel).try_init();
    // Another subscriber is already global (a test harness): ours would export nothing.
    Telemetry { provider: provider.filter(|_| installed.is_ok()) }
}

/// A tracer provider exporting over OTLP/HTTP, if an endpoint is configured.
fn otlp_provider() -> Result<Option<SdkTracerProvider>, String> {
    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()));
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if !configured || disabled {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|err| format!("cannot build the OTLP exporter: {err}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "ultra".into());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()))
}

/// Makes `span` continue `parent` (the caller's `traceparent`, or the job message's),
/// records its `trace_id` and `span_id` fields (declared empty by the caller), and
/// returns the context that names `span` — what is handed on downstream. With
/// OTLP export on, that is the exported span's own id, so the trace's links hold;
/// without it, a fresh span id in the same trace.
pub fn continue_trace(span: &tracing::Span, parent: Option<TraceContext>) -> TraceContext {
    let context = span_context(span, parent);
    span.record("trace_id", context.trace_id_hex());
    span.record("span_id", context.span_id_hex());
    context
}

fn span_context(span: &tracing::Span, parent: Option<TraceContext>) -> TraceContext {
    if let Some(parent) = parent {
        // Fails only without the OpenTelemetry layer, where there is nothing to link.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.into()));
    }
    let exported = span.context().span().span_context().clone();
    if exported.is_valid() {
        return TraceContext::from(&exported);
    }
    parent.map_or_else(TraceContext::root, |p| p.child())
}
