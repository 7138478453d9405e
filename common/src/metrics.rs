//! Prometheus metrics: one recorder per process (the api and a worker share it in
//! `ultra all`), rendered by `/metrics`. Every name Ultra records is a constant here,
//! so docs/OPERATIONS.md and the code cannot drift apart silently, and every label
//! set is bounded: routes are templates, models come from the catalog, and job or
//! user ids are never labels.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// HTTP (api).
pub const HTTP_REQUESTS: &str = "ultra_http_requests_total";
pub const HTTP_DURATION: &str = "ultra_http_request_duration_seconds";
pub const RATE_LIMITED: &str = "ultra_rate_limit_rejections_total";
pub const SSE_SUBSCRIBERS: &str = "ultra_sse_subscribers";
pub const EVENT_RECHECKS: &str = "ultra_event_rechecks_total";

// Jobs: submitted by the api; finished (by status) by a worker, or by the api when a
// queued job is cancelled.
pub const JOBS_SUBMITTED: &str = "ultra_jobs_submitted_total";
pub const JOBS_FINISHED: &str = "ultra_jobs_finished_total";
pub const JOB_DURATION: &str = "ultra_job_duration_seconds";
pub const JOB_RETRIES: &str = "ultra_job_retries_total";
pub const DEAD_LETTERS: &str = "ultra_dead_letters_total";

// Steps and providers (worker).
pub const STEP_DURATION: &str = "ultra_step_duration_seconds";
pub const STEPS_IN_FLIGHT: &str = "ultra_steps_in_flight";
pub const PROVIDER_ERRORS: &str = "ultra_provider_errors_total";
pub const TOKENS: &str = "ultra_tokens_total";
pub const COST: &str = "ultra_cost_usd_micros_total";

// Webhooks (worker): attempts by outcome (`succeeded`, `retrying`, `failed` for the
// last), their latency, endpoints disabled for failing too long.
pub const WEBHOOK_ATTEMPTS: &str = "ultra_webhook_attempts_total";
pub const WEBHOOK_DURATION: &str = "ultra_webhook_attempt_duration_seconds";
pub const WEBHOOK_ENDPOINTS_DISABLED: &str = "ultra_webhook_endpoints_disabled_total";

// Sampled at scrape time (api).
pub const QUEUE_MESSAGES: &str = "ultra_queue_messages";
pub const QUEUE_CONSUMERS: &str = "ultra_queue_consumers";
pub const OUTBOX_BACKLOG: &str = "ultra_outbox_backlog";
pub const JOBS_ACTIVE: &str = "ultra_jobs_active";
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";

/// Latency buckets, 1 ms to an hour: HTTP requests sit at the low end, provider calls
/// and jobs (whose deadlines a tier may set long) at the high end.
const SECONDS_BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scrape may read the metrics: always when no token is configured,
/// otherwise only with `Authorization: Bearer <token>`. Digests are compared, so the
/// comparison's time says nothing about the token.
pub fn authorized(token: Option<&str>, authorization: Option<&str>) -> bool {
    use sha2::{Digest, Sha256};
    let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else { return true };
    let presented = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    Sha256::digest(presented.trim().as_bytes()) == Sha256::digest(token.as_bytes())
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same handle) and,
/// inside a tokio runtime, the task that keeps its histograms compact.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .unwrap_or_else(|_| unreachable!("the bucket list is not empty"));
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be global (a test harness's); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let upkeep = handle.clone();
                runtime.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        upkeep.run_upkeep();
                    }
                });
            }
            describe();
            handle
        })
        .clone()
}

/// Renders every metric in the Prometheus text format, with the process's memory.
pub fn render() -> String {
    let handle = install();
    if let Some(bytes) = resident_memory_bytes() {
        metrics::gauge!(RESIDENT_MEMORY).set(bytes as f64);
    }
    handle.render()
}

/// This process's resident memory (Linux); `None` elsewhere.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(status_kb(&status, "VmRSS")? * 1024)
}

/// A kilobyte figure (`VmRSS`, `VmHWM`, …) from the text of a `/proc/<pid>/status`.
pub fn status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?.split_whitespace().next()?.parse().ok()
}

/// `# HELP` lines: what each metric means.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by method, route template and status");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "Time to answer an HTTP request (streams: to their headers)");
    describe_counter!(RATE_LIMITED, "Requests refused with 429, by rate-limit policy");
    describe_gauge!(SSE_SUBSCRIBERS, "Event streams open in this process");
    describe_counter!(
        EVENT_RECHECKS,
        "Reads of a watched job's new events from PostgreSQL (one per job, not per stream)"
    );
    describe_counter!(JOBS_SUBMITTED, "Analyze jobs accepted, by pattern");
    describe_counter!(JOBS_FINISHED, "Jobs that reached a terminal status, by pattern and status");
    describe_histogram!(JOB_DURATION, Unit::Seconds, "Submit to terminal status, by pattern and status");
    describe_counter!(JOB_RETRIES, "Jobs sent back to the queue after a transient failure, by pattern");
    describe_counter!(DEAD_LETTERS, "Job messages the broker dead-lettered");
    describe_histogram!(STEP_DURATION, Unit::Seconds, "Provider calls, by stage, model, provider and outcome");
    describe_gauge!(STEPS_IN_FLIGHT, "Provider calls in flight in this process, by provider");
    describe_counter!(PROVIDER_ERRORS, "Failed provider calls, by provider, model and error kind");
    describe_counter!(TOKENS, "Tokens used, by model, provider and direction (input or output)");
    describe_counter!(COST, "Provider cost in millionths of a US dollar, by model and provider");
    describe_counter!(WEBHOOK_ATTEMPTS, "Webhook delivery attempts, by outcome (succeeded, retrying, failed)");
    describe_histogram!(WEBHOOK_DURATION, Unit::Seconds, "Webhook delivery attempts' latency, by outcome");
    describe_counter!(WEBHOOK_ENDPOINTS_DISABLED, "Webhook endpoints disabled after failing for too long");
    describe_gauge!(QUEUE_MESSAGES, "Messages ready in each RabbitMQ queue (sampled at scrape)");
    describe_gauge!(QUEUE_CONSUMERS, "Consumers of each RabbitMQ queue (sampled at scrape)");
    describe_gauge!(OUTBOX_BACKLOG, "Committed jobs not yet confirmed by RabbitMQ (sampled at scrape)");
    describe_gauge!(JOBS_ACTIVE, "Jobs queued or running, by status (sampled at scrape)");
    describe_gauge!(RESIDENT_MEMORY, Unit::Bytes, "Resident memory of this process");
}

/// A job reached a terminal status (recorded by whichever process ended it).
pub fn job_finished(finished: &crate::db::jobs::Finished, status: crate::domain::JobStatus) {
    let labels = [("pattern", finished.pattern.clone()), ("status", status.to_string())];
    metrics::counter!(JOBS_FINISHED, &labels).increment(1);
    metrics::histogram!(JOB_DURATION, &labels).record(finished.duration().as_secs_f64());
}

/// Counts one more while alive (an in-flight gauge that cannot leak on early return
/// or task abort).
pub struct InFlight(metrics::Gauge);

impl InFlight {
    pub fn enter(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A webhook attempt ended with `outcome`.
pub fn webhook_attempt(outcome: &'static str, latency: Duration) {
    metrics::counter!(WEBHOOK_ATTEMPTS, "outcome" => outcome).increment(1);
    metrics::histogram!(WEBHOOK_DURATION, "outcome" => outcome).record(latency.as_secs_f64());
}

/// An endpoint was disabled for failing too long.
pub fn webhook_endpoint_disabled() {
    metrics::counter!(WEBHOOK_ENDPOINTS_DISABLED).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_figures_are_read_by_field() {
        let status = "Name:\tultra\nVmHWM:\t  51200 kB\nVmRSS:\t  40960 kB\n";
        assert_eq!(status_kb(status, "VmRSS"), Some(40_960));
        assert_eq!(status_kb(status, "VmHWM"), Some(51_200));
        assert_eq!(status_kb(status, "VmSwap"), None);
    }

    #[test]
    fn histograms_render_with_buckets_and_gauges_fall_back() {
        install();
        metrics::histogram!(HTTP_DURATION, "method" => "GET", "route" => "/unit-test").record(0.003);
        {
            let _guard = InFlight::enter(metrics::gauge!(STEPS_IN_FLIGHT, "provider" => "unit-test"));
            assert!(render().contains(r#"ultra_steps_in_flight{provider="unit-test"} 1"#));
        }
        let text = render();
        assert!(text.contains(r#"ultra_steps_in_flight{provider="unit-test"} 0"#), "{text}");
        assert!(
            text.contains(
                r#"ultra_http_request_duration_seconds_bucket{method="GET",route="/unit-test",le="0.005"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
    }
}
