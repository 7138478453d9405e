//! `ultra-bench sse`: how many event-stream subscribers one api process holds, with
//! what memory and delivery latency. It starts an `ultra api`; submits jobs (still
//! queued, no worker yet); opens the subscribers, spread over the jobs; only then
//! starts an `ultra worker`, so every event after `queued` is delivered live. Delivery
//! latency is the time from an event's commit (`created_at`) to its arrival at a
//! subscriber.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;

use crate::{
    analyze_body, figure,
    harness::{free_address, Harness, Processes, Services},
    models, progress, quantile, report,
    sse_client::EventStreamReader,
};

#[derive(Debug, Args)]
pub struct SseBench {
    /// Event streams to hold open at once.
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,
    /// Jobs the subscribers are spread over [default: one per 25 subscribers].
    #[arg(long)]
    jobs: Option<usize>,
    /// Models per job (each adds step and token events).
    #[arg(long, default_value_t = 2)]
    models: usize,
    /// Mock provider latency per call.
    #[arg(long, default_value_t = 500)]
    mock_latency_ms: u64,
    /// Jobs the worker runs at once (its concurrency): how many jobs' events, and so
    /// how many subscribers' frames, come in one burst.
    #[arg(long, default_value_t = 16)]
    jobs_at_once: u16,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Subscribers per job unless `--jobs` says otherwise: a job watched by a handful of
/// clients (its owner's tabs, a team's dashboard), not by a crowd.
const SUBSCRIBERS_PER_JOB: usize = 25;

pub async fn run(services: &Services, processes: &Processes, args: SseBench) -> anyhow::Result<()> {
    let models = models(args.models)?;
    let jobs = args.jobs.unwrap_or(args.subscribers.div_ceil(SUBSCRIBERS_PER_JOB));
    if args.subscribers == 0 || jobs == 0 || args.jobs_at_once == 0 {
        bail!("--subscribers, --jobs and --jobs-at-once must be at least 1");
    }
    Harness::run(services, Some(processes), args.mock_latency_ms, async |harness| {
        measure(harness, &args, jobs, &models).await
    })
    .await
}

async fn measure(harness: &Harness, args: &SseBench, job_count: usize, models: &[&str]) -> anyhow::Result<()> {
    let api = harness.spawn(&["api"], free_address().await?, &[]).await?;
    let key = harness.api_key().await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let mut jobs = Vec::with_capacity(job_count);
    for _ in 0..job_count {
        let body = analyze_body(models);
        let response = http.post(format!("{}/v1/analyze", api.base)).bearer_auth(&key).json(&body).send().await?;
        let accepted: serde_json::Value = response.error_for_status()?.json().await?;
        jobs.push(accepted["id"].as_str().context("job id")?.to_owned());
    }

    let address = api.base.trim_start_matches("http://").to_owned();
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let events = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let bar = progress(args.subscribers as u64, "connected");
    let started = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..args.subscribers {
        let path = format!("/v1/jobs/{}/events", jobs[i % jobs.len()]);
        let (address, key) = (address.clone(), key.clone());
        let (latencies, events, connected) = (latencies.clone(), events.clone(), connected.clone());
        streams.spawn(async move { subscribe(&address, &path, &key, &latencies, &events, &connected).await });
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await; // a brisk but not abusive ramp
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (connected.load(Ordering::Relaxed) as usize) < args.subscribers {
        bar.set_position(connected.load(Ordering::Relaxed));
        if Instant::now() > deadline {
            bail!("only {} of {} subscribers connected", connected.load(Ordering::Relaxed), args.subscribers);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    let connect_time = started.elapsed();
    let rss_connected = api.rss().now_mb;

    let concurrency = args.jobs_at_once.to_string();
    let worker = harness.spawn(&["worker", "--concurrency", &concurrency], free_address().await?, &[]).await?;
    let live = Instant::now();
    let mut failures = 0;
    while let Some(done) = streams.join_next().await {
        if !matches!(done, Ok(Ok(()))) {
            failures += 1;
        }
    }
    let live_time = live.elapsed();
    let peak_rss = api.rss().peak_mb;
    worker.stop().await;
    api.stop().await;

    let by_kind = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    let mut latencies: Vec<f64> = by_kind.values().flatten().copied().collect();
    latencies.sort_by(f64::total_cmp);
    let by_kind: serde_json::Map<String, serde_json::Value> = by_kind
        .into_iter()
        .map(|(kind, mut ms)| {
            ms.sort_by(f64::total_cmp);
            (kind, serde_json::json!({ "p50": quantile(&ms, 0.50), "p99": quantile(&ms, 0.99) }))
        })
        .collect();
    let total = events.load(Ordering::Relaxed);
    let events_per_s = total as f64 / live_time.as_secs_f64();
    let record = serde_json::json!({
        "bench": "sse", "subscribers": args.subscribers, "jobs": job_count, "models": args.models,
        "jobs_at_once": args.jobs_at_once,
        "failed_streams": failures, "connect_s": connect_time.as_secs_f64(),
        "api_rss_mb_connected": rss_connected, "api_rss_mb_peak": peak_rss,
        "delivery_ms_p50": quantile(&latencies, 0.50), "delivery_ms_p99": quantile(&latencies, 0.99),
        "delivery_ms_max": latencies.last(), "delivery_ms_by_kind": by_kind, "events": total, "events_per_s": events_per_s,
    });
    let rows = [
        ("subscribers", format!("{} over {job_count} jobs, {} at once", args.subscribers, args.jobs_at_once)),
        ("failed streams", failures.to_string()),
        ("connected in", format!("{:.1} s", connect_time.as_secs_f64())),
        ("api RSS", format!("{} connected, {} peak", figure(rss_connected, 1, " MB"), figure(peak_rss, 1, " MB"))),
        (
            "delivery",
            format!(
                "p50 {} / p99 {}",
                figure(quantile(&latencies, 0.50), 0, " ms"),
                figure(quantile(&latencies, 0.99), 0, " ms")
            ),
        ),
        ("events delivered", format!("{total} ({events_per_s:.0}/s)")),
    ];
    report(args.json, "ultra-bench sse", &rows, &record);
    if failures > 0 {
        bail!("{failures} streams failed");
    }
    Ok(())
}

/// Delivery latencies (ms) by event kind.
type Latencies = std::collections::BTreeMap<String, Vec<f64>>;

/// What a subscriber reads of an event.
#[derive(serde::Deserialize)]
struct Stamp<'a> {
    seq: Option<i64>,
    kind: Option<&'a str>,
    created_at: Option<&'a str>,
}

/// One subscriber: reads the stream to its end, timing every lifecycle event.
async fn subscribe(
    address: &str,
    path: &str,
    key: &str,
    latencies: &Mutex<Latencies>,
    events: &AtomicU64,
    connected: &AtomicU64,
) -> anyhow::Result<()> {
    let mut stream = EventStreamReader::open(address, path, key).await?;
    connected.fetch_add(1, Ordering::Relaxed);
    let mut mine = Latencies::new();
    while let Some(data) = stream.next_data().await? {
        events.fetch_add(1, Ordering::Relaxed);
        // Lifecycle events after `queued` were delivered live: time them. (Only the
        // two fields are read: the client shares the machine with what it measures.)
        if let Ok(Stamp { seq: Some(seq), kind: Some(kind), created_at: Some(created) }) = serde_json::from_str(&data) {
            if seq > 1 {
                if let Ok(created) = chrono::DateTime::parse_from_rfc3339(created) {
                    let ms = (chrono::Utc::now() - created.with_timezone(&chrono::Utc)).num_microseconds();
                    let ms = ms.unwrap_or(0).max(0) as f64 / 1_000.0;
                    match mine.get_mut(kind) {
                        Some(all) => all.push(ms),
                        None => drop(mine.insert(kind.to_owned(), vec![ms])),
                    }
                }
            }
        }
    }
    let mut latencies = latencies.lock().unwrap_or_else(|p| p.into_inner());
    for (kind, ms) in mine {
        latencies.entry(kind).or_default().extend(ms);
    }
    Ok(())
}
