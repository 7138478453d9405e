//! `ultra-bench batch`: OpenAI's Batch API (`/openai/v1/files`, `/openai/v1/batches`)
//! at size, and what a running batch costs interactive work. It starts `ultra api` and
//! `ultra worker` (or one `ultra all`), measures the p50 of interactive jobs submitted
//! one after another while the system is idle, uploads a `--lines` JSONL file and
//! creates a batch of it, measures the interactive p50 again while the batch runs, and
//! follows the batch to its end: lines/s from its creation to `completed`, its
//! `request_counts`, each process's peak RSS, and the ratio of the two p50s (target:
//! at most 2). Exits non-zero unless the batch completed with every line completed.
//!
//! The batch's owner is in a real tier (`--tier`, `enterprise` by default): the feeder
//! admits at most half the owner's `concurrent_jobs` lines at once, and that share is
//! what keeps the batch from standing in front of interactive work. In the `bench` tier
//! (100,000,000 jobs at once) every line would be admitted in one pass. The interactive
//! jobs are another user's, in the `bench` tier, measured as `throughput` measures a
//! job: submitted with `Accept: text/event-stream`, from sending the submit to the
//! `succeeded` event.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use common::config::{DEFAULT_BATCH_MAX_LINES, DEFAULT_FILE_MAX_BYTES};
use indicatif::ProgressBar;
use serde_json::{json, Value};

use crate::{
    figure,
    harness::{free_address, Harness, Process, Processes, Rss, Services, BENCH_TIER},
    progress, quantile, report,
    throughput::Client,
};

#[derive(Debug, Args)]
pub struct BatchBench {
    /// Requests (JSONL lines) in the batch.
    #[arg(long, default_value_t = 10_000)]
    lines: usize,
    /// Interactive jobs, one after another, measured while idle and again while the
    /// batch runs (fewer then if the batch ends first).
    #[arg(long, default_value_t = 30)]
    interactive: usize,
    /// The batch owner's tier: the feeder runs at most half its `concurrent_jobs`
    /// lines at once. A built-in tier, or `bench` (no practical limit).
    #[arg(long, default_value = "enterprise")]
    tier: String,
    /// Jobs the worker runs at once (`ULTRA_WORKER_CONCURRENCY`; the api's feeder
    /// admits batch lines only while fewer interactive jobs than this wait).
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Mock provider latency per call.
    #[arg(long, default_value_t = 0)]
    mock_latency_ms: u64,
    /// Start one `ultra all` instead of `ultra api` and `ultra worker` (one RSS for both).
    #[arg(long)]
    all: bool,
    /// Give up when the batch has not ended after this many seconds.
    #[arg(long, default_value_t = 1_800)]
    timeout_s: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The model of every line and every interactive job.
const MODEL: &str = "mock/alpha";
/// Interactive jobs run, unmeasured, before the idle phase: connections and cold paths.
const WARM_UP: usize = 5;
/// How often the batch is read while it runs.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Failed reads of the batch in a row that end the run.
const MOST_POLL_ERRORS: u32 = 10;
/// The statuses a batch ends in.
const TERMINAL: [&str; 4] = ["completed", "failed", "cancelled", "expired"];

/// One phase of interactive jobs.
#[derive(Debug, serde::Serialize)]
struct Interactive {
    jobs: usize,
    failed: usize,
    latency_ms_p50: Option<f64>,
    latency_ms_p95: Option<f64>,
}

pub async fn run(services: &Services, processes: &Processes, args: BatchBench) -> anyhow::Result<()> {
    if args.lines == 0 || args.interactive == 0 || args.concurrency == 0 {
        bail!("--lines, --interactive and --concurrency must be at least 1");
    }
    // An unknown tier would silently be the default one (two jobs at once).
    let tiers = common::tiers::Tiers::builtin();
    if args.tier != BENCH_TIER && tiers.get(&args.tier).is_none() {
        let builtin: Vec<&str> = tiers.names().collect();
        bail!("--tier: no tier `{}` (built in: {}; or `{BENCH_TIER}`)", args.tier, builtin.join(", "));
    }
    Harness::run(services, Some(processes), args.mock_latency_ms, async |harness| measure(harness, &args).await).await
}

async fn measure(harness: &Harness, args: &BatchBench) -> anyhow::Result<()> {
    let jsonl = input_file(args.lines);
    let concurrency = args.concurrency.to_string();
    let max_lines = args.lines.max(DEFAULT_BATCH_MAX_LINES).to_string();
    let max_bytes = jsonl.len().max(DEFAULT_FILE_MAX_BYTES).to_string();
    let env = [
        ("ULTRA_WORKER_CONCURRENCY", concurrency.as_str()),
        ("ULTRA_BATCH_MAX_LINES", max_lines.as_str()),
        ("ULTRA_FILE_MAX_BYTES", max_bytes.as_str()),
    ];
    let api = free_address().await?;
    // (key in the JSON record, row label) and the process.
    let mut processes: Vec<((&str, &str), Process)> = Vec::new();
    if args.all {
        processes.push((("all", "ultra all RSS (api + worker)"), harness.spawn(&["all"], api, &env).await?));
    } else {
        processes.push((("api", "api RSS"), harness.spawn(&["api"], api, &env).await?));
        let worker = harness.spawn(&["worker"], free_address().await?, &env[..1]).await?;
        processes.push((("worker", "worker RSS"), worker));
    }
    let base = format!("http://{api}");
    let interactive = Client::new(&base, vec![harness.api_key().await?], &[MODEL])?;
    let owner = harness.api_key_in_tier(&args.tier).await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;

    // Interactive work alone.
    let bar = progress(WARM_UP.min(args.interactive) as u64, "warm-up");
    sequential(&interactive, WARM_UP.min(args.interactive), None, &|n: usize| bar.set_position(n as u64), "warm-up")
        .await;
    bar.finish_and_clear();
    let bar = progress(args.interactive as u64, "idle");
    let idle = sequential(&interactive, args.interactive, None, &|n: usize| bar.set_position(n as u64), "idle").await;
    bar.finish_and_clear();

    // The batch: its file, then the batch itself.
    let file = reqwest::multipart::Part::text(jsonl).file_name("bench.jsonl");
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", file);
    let upload = http.post(format!("{base}/openai/v1/files")).bearer_auth(&owner).multipart(form).send().await;
    let uploaded = ok_json(upload.context("upload the input file")?).await.context("upload the input file")?;
    let file_id = uploaded["id"].as_str().context("the upload's answer has no `id`")?.to_owned();
    let rss_before: Vec<Rss> = processes.iter().map(|(_, process)| process.rss()).collect();

    let create = json!({ "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h" });
    let created_at = Instant::now();
    let sent = http.post(format!("{base}/openai/v1/batches")).bearer_auth(&owner).json(&create).send().await;
    let created = ok_json(sent.context("create the batch")?).await.context("create the batch")?;
    if created["status"] == "failed" {
        bail!("the batch failed its input's checks: {}", created["errors"]);
    }
    let batch_id = created["id"].as_str().context("the batch has no `id`")?.to_owned();

    // The batch runs; interactive work goes on meanwhile.
    let batch_bar = progress(args.lines as u64, "batch");
    let (progressing, ended) = (AtomicBool::new(false), AtomicBool::new(false));
    let url = format!("{base}/openai/v1/batches/{batch_id}");
    let follow_batch = async {
        let followed = follow(&http, &url, &owner, Duration::from_secs(args.timeout_s), &batch_bar, &progressing).await;
        ended.store(true, Ordering::Relaxed);
        followed
    };
    let during_batch = async {
        // From the batch's first finished line: until then the feeder may not have
        // admitted any.
        while !progressing.load(Ordering::Relaxed) && !ended.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let tick = |n: usize| batch_bar.set_message(format!("{n} interactive jobs"));
        sequential(&interactive, args.interactive, Some(&ended), &tick, "during the batch").await
    };
    let (followed, during) = tokio::join!(follow_batch, during_batch);
    batch_bar.finish_and_clear();
    let (batch, ended_at) = followed?;

    let rss_after: Vec<Rss> = processes.iter().map(|(_, process)| process.rss()).collect();
    let mut rss_record = serde_json::Map::new();
    for (((key, _), _), (before, after)) in processes.iter().zip(rss_before.iter().zip(&rss_after)) {
        rss_record.insert((*key).to_owned(), json!({ "before_batch": before, "after_batch": after }));
    }
    let names: Vec<&str> = processes.iter().map(|((_, name), _)| *name).collect();
    for (_, process) in processes {
        process.stop().await;
    }

    let status = batch["status"].as_str().unwrap_or_default().to_owned();
    let counts = &batch["request_counts"];
    let count = |field: &str| counts[field].as_u64().unwrap_or(0);
    let (total, completed, failed) = (count("total"), count("completed"), count("failed"));
    let batch_s = (ended_at - created_at).as_secs_f64();
    let lines_per_s = total as f64 / batch_s.max(f64::EPSILON);
    let ratio = match (during.latency_ms_p50, idle.latency_ms_p50) {
        (Some(during), Some(idle)) if idle > 0.0 => Some(during / idle),
        _ => None,
    };

    let started = if args.all { "all" } else { "api+worker" };
    let record = json!({
        "bench": "batch",
        "lines": args.lines, "interactive": args.interactive, "tier": args.tier,
        "concurrency": args.concurrency, "mock_latency_ms": args.mock_latency_ms,
        "processes": started,
        "status": status, "request_counts": counts,
        "batch_s": batch_s, "lines_per_s": lines_per_s,
        "interactive_idle": idle, "interactive_during_batch": during,
        "p50_ratio_during_to_idle": ratio,
        "rss_mb": rss_record,
    });
    let ms = |v: Option<f64>| figure(v, 1, " ms");
    let phase =
        |p: &Interactive| format!("p50 {} / p95 {} ({} jobs)", ms(p.latency_ms_p50), ms(p.latency_ms_p95), p.jobs);
    let mut rows = vec![
        ("lines", format!("{} (owner's tier `{}`)", args.lines, args.tier)),
        ("worker concurrency / mock latency", format!("{} / {} ms", args.concurrency, args.mock_latency_ms)),
        ("batch status", status.clone()),
        ("request_counts", format!("total {total} / completed {completed} / failed {failed}")),
        ("creation to end", format!("{batch_s:.1} s")),
        ("lines/s", figure(Some(lines_per_s), 0, " lines/s")),
        ("interactive idle", phase(&idle)),
        ("interactive during batch", phase(&during)),
        ("p50 during / idle", format!("{} (target ≤ 2)", figure(ratio, 2, "×"))),
        ("interactive failed", (idle.failed + during.failed).to_string()),
    ];
    for ((name, before), after) in names.iter().zip(&rss_before).zip(&rss_after) {
        rows.push((
            *name,
            format!("peak {} ({} before the batch)", figure(after.peak_mb, 1, " MB"), figure(before.now_mb, 1, " MB")),
        ));
    }
    report(args.json, "ultra-bench batch", &rows, &record);

    if during.jobs == 0 {
        eprintln!("warning: the batch ended before an interactive job ran alongside it; use more --lines");
    }
    let lines = args.lines as u64;
    if status != "completed" || total != lines || completed != lines || failed != 0 {
        bail!("the batch did not complete every line: {status}, {completed} of {lines} completed, {failed} failed");
    }
    let interactive_failed = idle.failed + during.failed;
    if interactive_failed > 0 {
        bail!("{interactive_failed} interactive jobs did not succeed");
    }
    Ok(())
}

/// The batch's input: `lines` chat completions of `MODEL`, each its own prompt.
fn input_file(lines: usize) -> String {
    let mut jsonl = String::with_capacity(lines * 200);
    for i in 0..lines {
        let line = json!({
            "custom_id": format!("line-{i}"),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{ "role": "user", "content": format!("Benchmark line {i}: why is the sky blue?") }],
            },
        });
        jsonl.push_str(&line.to_string());
        jsonl.push('\n');
    }
    jsonl
}

/// Up to `count` interactive jobs, one after another; before each, stops if `stop` is
/// set. `tick` is told how many have ended.
async fn sequential(
    client: &Client,
    count: usize,
    stop: Option<&AtomicBool>,
    tick: &dyn Fn(usize),
    label: &str,
) -> Interactive {
    let mut latencies = Vec::with_capacity(count);
    let (mut failed, mut last_error) = (0, None);
    for n in 0..count {
        if stop.is_some_and(|stop| stop.load(Ordering::Relaxed)) {
            break;
        }
        match client.job(n).await {
            Ok([submitted, _accepted, ended]) => latencies.push((ended - submitted).as_secs_f64() * 1_000.0),
            Err(err) => {
                failed += 1;
                last_error = Some(err);
            }
        }
        tick(n + 1);
    }
    if let Some(err) = last_error {
        eprintln!("{label}: {failed} interactive jobs failed; the last: {err:#}");
    }
    latencies.sort_by(f64::total_cmp);
    Interactive {
        jobs: latencies.len() + failed,
        failed,
        latency_ms_p50: quantile(&latencies, 0.50),
        latency_ms_p95: quantile(&latencies, 0.95),
    }
}

/// Reads the batch at `url` every `POLL_EVERY` until it ends: the batch as it ended,
/// and when that read was answered. Sets `progressing` once a line has finished.
async fn follow(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    timeout: Duration,
    bar: &ProgressBar,
    progressing: &AtomicBool,
) -> anyhow::Result<(Value, Instant)> {
    let deadline = Instant::now() + timeout;
    let mut errors = 0;
    loop {
        let answer = match http.get(url).bearer_auth(key).send().await {
            Ok(response) => ok_json(response).await,
            Err(err) => Err(anyhow::Error::new(err)),
        };
        let now = Instant::now();
        match answer {
            Ok(batch) => {
                errors = 0;
                let counts = &batch["request_counts"];
                let done = counts["completed"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0);
                bar.set_position(done);
                if done > 0 {
                    progressing.store(true, Ordering::Relaxed);
                }
                if TERMINAL.iter().any(|end| batch["status"] == *end) {
                    return Ok((batch, now));
                }
            }
            Err(err) => {
                errors += 1;
                if errors >= MOST_POLL_ERRORS {
                    return Err(err.context(format!("{errors} reads of the batch in a row failed")));
                }
            }
        }
        if now > deadline {
            bail!("the batch did not end within {} s", timeout.as_secs());
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// A successful answer's JSON body; otherwise an error with its status and body.
async fn ok_json(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    if !status.is_success() {
        bail!("answered {status}: {}", response.text().await.unwrap_or_default());
    }
    Ok(response.json().await?)
}
