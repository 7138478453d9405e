//! `ultra-bench throughput`: jobs through the whole system. Each job is submitted with
//! `Accept: text/event-stream` (submit and stream in one request), so its latency is
//! what a client sees: from sending the submit to receiving the terminal event.
//!
//! Three phases in one invocation: the `raw` ceiling at the same concurrency; a
//! saturated phase (`concurrency` clients submitting back to back) that gives
//! completed jobs/s; and a paced phase at a fraction of that rate (`--paced-load`,
//! default one half) that gives latency under a load the system is not struggling
//! with.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;

use crate::{
    analyze_body, figure,
    harness::{free_address, Harness, Process, Processes, Rss, Services},
    models, progress, quantile, raw, report, sse_events,
};

#[derive(Debug, Args)]
pub struct ThroughputBench {
    /// Jobs per phase.
    #[arg(long, default_value_t = 2_000)]
    jobs: usize,
    /// Clients submitting at once in the saturated phase; also the worker's
    /// concurrency (and the `raw` phase's) when the system is started here.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Models per job.
    #[arg(long, default_value_t = 1)]
    models: usize,
    /// Mock provider latency per call (a system started here).
    #[arg(long, default_value_t = 0)]
    mock_latency_ms: u64,
    /// The paced phase's rate as a fraction of the saturated phase's completed
    /// jobs/s; 0 skips it.
    #[arg(long, default_value_t = 0.5)]
    paced_load: f64,
    /// Run against this running api instead of starting `ultra all` (with `--api-key`).
    #[arg(long, requires = "api_key")]
    url: Option<String>,
    /// An API key of the running system (its tier's limits apply).
    #[arg(long, env = "ULTRA_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Start `ultra api` and `ultra worker` as two processes instead of `ultra all`.
    #[arg(long, conflicts_with = "url")]
    split: bool,
    /// Skip the `raw` phase (and the ratio to it); always skipped with `--url`.
    #[arg(long)]
    no_raw: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// One phase's figures.
#[derive(Debug, Default, serde::Serialize)]
struct Phase {
    jobs: usize,
    failed: usize,
    accepted_per_s: f64,
    completed_per_s: f64,
    latency_ms_p50: Option<f64>,
    latency_ms_p95: Option<f64>,
    latency_ms_p99: Option<f64>,
}

pub async fn run(services: &Services, processes: &Processes, args: ThroughputBench) -> anyhow::Result<()> {
    let models = models(args.models)?;
    if !(0.0..=1.0).contains(&args.paced_load) {
        bail!("--paced-load is a fraction, 0 to 1");
    }
    // Against a running system (`--url`) nothing is started: no `ultra` binary is needed.
    let processes = args.url.is_none().then_some(processes);
    Harness::run(services, processes, args.mock_latency_ms, async |harness| measure(harness, &args, &models).await)
        .await
}

async fn measure(harness: &Harness, args: &ThroughputBench, models: &[&str]) -> anyhow::Result<()> {
    // `raw` measures this machine: against another system the ratio would mean nothing.
    let raw = if args.no_raw || args.url.is_some() {
        None
    } else {
        Some(raw::measure(harness, args.jobs, args.concurrency).await?)
    };

    let concurrency = args.concurrency.to_string();
    let mut processes: Vec<(&str, Process)> = Vec::new();
    let (base, keys) = match (&args.url, &args.api_key) {
        (Some(url), Some(key)) => (url.trim_end_matches('/').to_owned(), vec![key.clone()]),
        _ => {
            let api = free_address().await?;
            let worker_concurrency = [("ULTRA_WORKER_CONCURRENCY", concurrency.as_str())];
            if args.split {
                processes.push(("api", harness.spawn(&["api"], api, &[]).await?));
                let worker = free_address().await?;
                processes.push(("worker", harness.spawn(&["worker"], worker, &worker_concurrency).await?));
            } else {
                processes.push(("all", harness.spawn(&["all"], api, &worker_concurrency).await?));
            }
            // A user per client: one user's submissions serialise on its budget (its
            // row lock), which would measure one user's ceiling, not the system's.
            let mut keys = Vec::with_capacity(usize::from(args.concurrency));
            for _ in 0..args.concurrency.max(1) {
                keys.push(harness.api_key().await?);
            }
            (format!("http://{api}"), keys)
        }
    };
    let client = Client::new(&base, keys, models)?;

    // Warm-up: connections, caches and the JIT-free but cold paths of every process.
    run_phase(&client, usize::from(args.concurrency) * 2, Pacing::Closed(args.concurrency), "warm-up").await?;
    let saturated = run_phase(&client, args.jobs, Pacing::Closed(args.concurrency), "saturated").await?;
    let paced = if args.paced_load > 0.0 && saturated.completed_per_s > 0.0 {
        let rate = saturated.completed_per_s * args.paced_load;
        Some((rate, run_phase(&client, args.jobs, Pacing::Rate(rate), "paced").await?))
    } else {
        None
    };
    let rss: Vec<(&str, Rss)> = processes.iter().map(|(name, process)| (*name, process.rss())).collect();
    for (_, process) in processes {
        process.stop().await;
    }

    let ratio = raw.map(|raw| saturated.completed_per_s / raw);
    let record = serde_json::json!({
        "bench": "throughput",
        "jobs": args.jobs, "concurrency": args.concurrency, "models": args.models,
        "mock_latency_ms": args.mock_latency_ms,
        "raw_jobs_per_s": raw, "ratio_to_raw": ratio,
        "saturated": saturated,
        "paced": paced.as_ref().map(|(rate, phase)| serde_json::json!({ "rate": rate, "phase": phase })),
        "rss_mb": rss.iter().map(|(name, rss)| (name.to_string(), serde_json::json!(rss))).collect::<serde_json::Map<_, _>>(),
    });
    let ms = |v: Option<f64>| figure(v, 1, " ms");
    let mut rows = vec![
        ("jobs per phase", args.jobs.to_string()),
        ("concurrency", args.concurrency.to_string()),
        ("models / mock latency", format!("{} / {} ms", args.models, args.mock_latency_ms)),
        ("raw ceiling", figure(raw, 0, " jobs/s")),
        ("accepted", figure(Some(saturated.accepted_per_s), 0, " jobs/s")),
        ("completed", figure(Some(saturated.completed_per_s), 0, " jobs/s")),
        ("ratio to raw", figure(ratio, 2, "")),
        (
            "latency saturated",
            format!(
                "p50 {} / p95 {} / p99 {}",
                ms(saturated.latency_ms_p50),
                ms(saturated.latency_ms_p95),
                ms(saturated.latency_ms_p99)
            ),
        ),
    ];
    if let Some((rate, phase)) = &paced {
        rows.push(("paced at", format!("{rate:.0} jobs/s")));
        rows.push((
            "latency paced",
            format!(
                "p50 {} / p95 {} / p99 {}",
                ms(phase.latency_ms_p50),
                ms(phase.latency_ms_p95),
                ms(phase.latency_ms_p99)
            ),
        ));
    }
    let failed = saturated.failed + paced.as_ref().map_or(0, |(_, p)| p.failed);
    rows.push(("failed jobs", failed.to_string()));
    for (name, rss) in &rss {
        rows.push((name, rss.to_string()));
    }
    report(args.json, "ultra-bench throughput", &rows, &record);
    if failed > 0 {
        bail!("{failed} jobs did not succeed");
    }
    Ok(())
}

/// Submits jobs and follows each to its end over its own event stream (`batch`
/// measures its interactive jobs with it too).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    /// Job `n` is submitted with key `n % keys.len()`.
    keys: Vec<String>,
    body: serde_json::Value,
}

impl Client {
    pub fn new(base: &str, keys: Vec<String>, models: &[&str]) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        let body = analyze_body(models);
        Ok(Self { http, url: format!("{base}/v1/analyze"), keys, body })
    }

    /// One job: when it was submitted, accepted (the answer's headers) and ended (its
    /// terminal event); an error if it did not succeed.
    pub async fn job(&self, n: usize) -> anyhow::Result<[Instant; 3]> {
        let started = Instant::now();
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.keys[n % self.keys.len()])
            .header("accept", "text/event-stream")
            .json(&self.body)
            .send()
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("submit answered {status}: {}", response.text().await.unwrap_or_default());
        }
        let accepted = Instant::now();
        let mut events = sse_events(response);
        while let Some(event) = events.next().await {
            let event = event?;
            match event.event.as_deref() {
                Some("succeeded") => return Ok([started, accepted, Instant::now()]),
                Some("failed" | "cancelled") => bail!("job ended {}", event.data),
                _ => {}
            }
        }
        bail!("the stream ended before the job did")
    }
}

enum Pacing {
    /// This many clients, each submitting its next job when the last one ends.
    Closed(u16),
    /// Jobs started at this many per second, whatever is still running.
    Rate(f64),
}

async fn run_phase(client: &Client, jobs: usize, pacing: Pacing, label: &str) -> anyhow::Result<Phase> {
    let client = Arc::new(client.clone());
    let bar = progress(jobs as u64, label);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match pacing {
        Pacing::Closed(clients) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..clients.max(1) {
                let (client, next, bar) = (client.clone(), next.clone(), bar.clone());
                tasks.spawn(async move {
                    let mut results = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= jobs {
                            break;
                        }
                        results.push(client.job(n).await);
                        bar.inc(1);
                    }
                    results
                });
            }
        }
        Pacing::Rate(rate) => {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in 0..jobs {
                ticker.tick().await;
                let (client, bar) = (client.clone(), bar.clone());
                tasks.spawn(async move {
                    let result = client.job(n).await;
                    bar.inc(1);
                    vec![result]
                });
            }
        }
    }
    let (mut last_accept, mut last_end) = (started, started);
    let mut latencies = Vec::with_capacity(jobs);
    let mut failed = 0;
    let mut last_error = None;
    while let Some(results) = tasks.join_next().await {
        for result in results.context("a benchmark client panicked")? {
            match result {
                Ok([submitted, accepted, ended]) => {
                    last_accept = last_accept.max(accepted);
                    last_end = last_end.max(ended);
                    latencies.push((ended - submitted).as_secs_f64() * 1_000.0);
                }
                Err(err) => {
                    failed += 1;
                    last_error = Some(err);
                }
            }
        }
    }
    bar.finish_and_clear();
    if let Some(err) = last_error {
        eprintln!("{label}: {failed} jobs failed; the last: {err:#}");
    }
    latencies.sort_by(f64::total_cmp);
    let per_second = |until: Instant| latencies.len() as f64 / (until - started).as_secs_f64().max(f64::EPSILON);
    Ok(Phase {
        jobs,
        failed,
        accepted_per_s: per_second(last_accept),
        completed_per_s: per_second(last_end),
        latency_ms_p50: quantile(&latencies, 0.50),
        latency_ms_p95: quantile(&latencies, 0.95),
        latency_ms_p99: quantile(&latencies, 0.99),
    })
}
