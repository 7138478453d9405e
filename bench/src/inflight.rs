//! `ultra-bench inflight`: how many provider calls one worker process holds in flight
//! at once, and its memory meanwhile. The jobs are queued first, with no worker
//! running; then one `ultra worker` starts with room for all of them and takes them
//! at once. Its `ultra_steps_in_flight` gauge is read from its `/metrics` every 50 ms.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::{
    analyze_body, figure,
    harness::{free_address, Harness, Processes, Services},
    models, progress, report,
};

#[derive(Debug, Args)]
pub struct InflightBench {
    /// Mock provider latency per call: long enough for calls to pile up.
    #[arg(long, default_value_t = 2_000)]
    mock_latency_ms: u64,
    /// Jobs queued before the worker starts (also its concurrency).
    #[arg(long, default_value_t = 2_000)]
    jobs: usize,
    /// Models per job: calls = jobs × models.
    #[arg(long, default_value_t = 3)]
    models: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(services: &Services, processes: &Processes, args: InflightBench) -> anyhow::Result<()> {
    let models = models(args.models)?;
    let concurrency = u16::try_from(args.jobs).context("--jobs is at most 65535 (the worker's concurrency)")?;
    Harness::run(services, Some(processes), args.mock_latency_ms, async |harness| {
        measure(harness, &args, &models, concurrency).await
    })
    .await
}

async fn measure(harness: &Harness, args: &InflightBench, models: &[&str], concurrency: u16) -> anyhow::Result<()> {
    let api = harness.spawn(&["api"], free_address().await?, &[]).await?;
    let key = harness.api_key().await?;
    let http = reqwest::Client::new();
    let body = analyze_body(models);
    let bar = progress(args.jobs as u64, "queue");
    let mut submits = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (http, url, key, body, bar) =
            (http.clone(), format!("{}/v1/analyze", api.base), key.clone(), body.clone(), bar.clone());
        let share = args.jobs / 32 + usize::from(submits.len() < args.jobs % 32);
        submits.spawn(async move {
            for _ in 0..share {
                http.post(&url).bearer_auth(&key).json(&body).send().await?.error_for_status()?;
                bar.inc(1);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = submits.join_next().await {
        done??;
    }
    bar.finish_and_clear();

    let concurrency = concurrency.to_string();
    let worker =
        harness.spawn(&["worker"], free_address().await?, &[("ULTRA_WORKER_CONCURRENCY", &concurrency)]).await?;
    let metrics_url = format!("{}/metrics", worker.base);
    let calls = (args.jobs * args.models) as u64;
    let bar = progress(calls, "in flight");
    let started = Instant::now();
    let (mut peak, mut peak_at, mut rss_at_peak) = (0.0_f64, Duration::ZERO, None);
    loop {
        let text = http.get(&metrics_url).send().await?.text().await?;
        let in_flight = gauge(&text, "ultra_steps_in_flight{provider=\"mock\"}").unwrap_or(0.0);
        let finished =
            gauge(&text, "ultra_jobs_finished_total{pattern=\"direct\",status=\"succeeded\"}").unwrap_or(0.0);
        bar.set_position(in_flight as u64);
        if in_flight > peak {
            (peak, peak_at, rss_at_peak) = (in_flight, started.elapsed(), worker.rss().now_mb);
        }
        if finished as usize >= args.jobs {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the worker did not finish {} jobs in 10 minutes", args.jobs);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = started.elapsed();
    bar.finish_and_clear();
    let rss_peak = worker.rss().peak_mb;
    worker.stop().await;
    api.stop().await;

    let record = serde_json::json!({
        "bench": "inflight", "jobs": args.jobs, "models": args.models, "calls": calls,
        "mock_latency_ms": args.mock_latency_ms, "peak_in_flight": peak, "peak_after_s": peak_at.as_secs_f64(),
        "worker_rss_mb_at_peak": rss_at_peak, "worker_rss_mb_peak": rss_peak, "drained_s": drained.as_secs_f64(),
    });
    let rows = [
        ("calls", format!("{calls} ({} jobs × {} models)", args.jobs, args.models)),
        ("mock latency", format!("{} ms", args.mock_latency_ms)),
        ("peak in flight", format!("{peak:.0} calls, {:.1} s after the worker started", peak_at.as_secs_f64())),
        (
            "worker RSS",
            format!("{} at the peak, {} at most", figure(rss_at_peak, 1, " MB"), figure(rss_peak, 1, " MB")),
        ),
        ("all done after", format!("{:.1} s", drained.as_secs_f64())),
    ];
    report(args.json, "ultra-bench inflight", &rows, &record);
    Ok(())
}

/// A sample's value in the Prometheus text format.
fn gauge(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}
