//! `ultra bench sse`: how many event-stream subscribers one api process holds, with
//! what memory and delivery latency. It starts an `ultra api` child process on its own
//! database, queue prefix and Redis prefix; submits jobs (still queued); opens the
//! subscribers, spread over the jobs; only then starts an `ultra worker` child, so
//! every event after `queued` is delivered live. Delivery latency is the time from an
//! event's commit (`created_at`) to its arrival at a subscriber.

use std::{
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use common::{apikey, db, Config};
use futures::StreamExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Streams per benchmark user (the enterprise tier allows 1,000).
const STREAMS_PER_USER: usize = 500;

#[derive(Debug, Args)]
pub struct SseBench {
    /// Event streams to hold open at once.
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,
    /// Jobs the subscribers are spread over (at least one per 500 subscribers).
    #[arg(long, default_value_t = 20)]
    jobs: usize,
    /// Models per job (each adds step and token events).
    #[arg(long, default_value_t = 2)]
    models: usize,
    /// Mock provider latency per call.
    #[arg(long, default_value_t = 500)]
    mock_latency_ms: u64,
    /// Address for the api under test.
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: std::net::SocketAddr,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn sse(config: &Config, args: SseBench) -> anyhow::Result<()> {
    if args.subscribers == 0 || args.jobs == 0 || !(1..=3).contains(&args.models) {
        bail!("--subscribers and --jobs must be at least 1, --models 1 to 3");
    }
    let run = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let result = sse_run(config, &args, &run).await;
    // The child processes are gone by now (killed on drop); their queues go too.
    if let Err(err) = common::queue::Topology::new(&format!("{run}.")).delete(&config.amqp_url).await {
        eprintln!("warning: could not delete the benchmark's queues: {err}");
    }
    result
}

async fn sse_run(config: &Config, args: &SseBench, run: &str) -> anyhow::Result<()> {
    let database_url = with_database(&config.database_url, "ultra_bench")?;
    let pool = db::connect_and_prepare(&database_url, &CancellationToken::new()).await?;
    let env = |cmd: &mut Command| {
        cmd.env("DATABASE_URL", &database_url)
            .env("AMQP_URL", &config.amqp_url)
            .env("REDIS_URL", &config.redis_url)
            .env("ULTRA_QUEUE_PREFIX", format!("{run}."))
            .env("ULTRA_REDIS_PREFIX", run)
            .env("ULTRA_LISTEN", args.listen.to_string())
            .env("ULTRA_WORKER_LISTEN", "127.0.0.1:0")
            .env("ULTRA_MOCK_LATENCY_MS", args.mock_latency_ms.to_string())
            .env("ULTRA_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
    };
    let exe = std::env::current_exe().context("locate the ultra binary")?;
    let mut api = Command::new(&exe);
    env(api.arg("api"));
    let mut api = api.spawn().context("start `ultra api`")?;
    let api_pid = api.id().context("api pid")?;
    let base = format!("http://{}", args.listen);
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    wait_for(&http, &format!("{base}/health/live")).await?;

    // Enterprise users, each within its tier's stream limit, so tier limits do not
    // shape the measurement. The first one owns the jobs; each streams its own copy.
    let users_needed = args.subscribers.div_ceil(STREAMS_PER_USER);
    let mut keys = Vec::with_capacity(users_needed);
    for n in 0..users_needed {
        let user = db::users::create(&pool, &format!("{run}-{n}@bench.invalid"), "user").await?;
        db::users::update_admin(&pool, user.id, Some("enterprise"), None).await?;
        let key = apikey::generate();
        db::api_keys::insert(&pool, user.id, "bench", &key.prefix, &key.hash).await?;
        keys.push(key.secret);
    }
    let models: Vec<&str> = ["mock/alpha", "mock/beta", "mock/gamma"][..args.models].to_vec();
    // Jobs belong to their owner: every user submits the same set, and streams its own.
    let mut jobs: Vec<Vec<String>> = Vec::with_capacity(keys.len());
    for key in &keys {
        let mut mine = Vec::with_capacity(args.jobs);
        for _ in 0..args.jobs.div_ceil(keys.len()) {
            let body = serde_json::json!({ "prompt": "Benchmark: why is the sky blue?", "models": models });
            let response = http.post(format!("{base}/v1/analyze")).bearer_auth(key).json(&body).send().await?;
            let accepted: serde_json::Value = response.error_for_status()?.json().await?;
            mine.push(accepted["id"].as_str().context("job id")?.to_owned());
        }
        jobs.push(mine);
    }

    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.subscribers * 8)));
    let events = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..args.subscribers {
        let owner = i / STREAMS_PER_USER;
        let url = format!("{base}/v1/jobs/{}/events", jobs[owner][i % jobs[owner].len()]);
        let (http, key) = (http.clone(), keys[owner].clone());
        let (latencies, events, connected) = (latencies.clone(), events.clone(), connected.clone());
        streams.spawn(async move { subscribe(&http, &url, &key, &latencies, &events, &connected).await });
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await; // a brisk but not abusive ramp
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (connected.load(Ordering::Relaxed) as usize) < args.subscribers {
        if Instant::now() > deadline {
            bail!("only {} of {} subscribers connected", connected.load(Ordering::Relaxed), args.subscribers);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_time = started.elapsed();
    let rss_connected = rss_mb(api_pid, "VmRSS");

    let mut worker = Command::new(&exe);
    env(worker.arg("worker"));
    let mut worker = worker.spawn().context("start `ultra worker`")?;
    let live = Instant::now();
    let mut failures = 0;
    while let Some(done) = streams.join_next().await {
        if !matches!(done, Ok(Ok(()))) {
            failures += 1;
        }
    }
    let live_time = live.elapsed();
    let peak_rss = rss_mb(api_pid, "VmHWM");
    stop(&mut worker).await;
    stop(&mut api).await;

    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    latencies.sort_unstable();
    let pick =
        |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1))).copied();
    let total = events.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "subscribers": args.subscribers,
        "jobs": args.jobs,
        "models": args.models,
        "failed_streams": failures,
        "connect_s": connect_time.as_secs_f64(),
        "api_rss_mb_connected": rss_connected,
        "api_rss_mb_peak": peak_rss,
        "delivery_ms_p50": pick(0.50),
        "delivery_ms_p99": pick(0.99),
        "delivery_ms_max": latencies.last(),
        "events": total,
        "events_per_s": total as f64 / live_time.as_secs_f64(),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("subscribers        {}", args.subscribers);
        println!("failed streams     {failures}");
        println!("connected in       {:.1} s", connect_time.as_secs_f64());
        println!(
            "api RSS            {:.0} MB connected, {:.0} MB peak",
            rss_connected.unwrap_or(0.0),
            peak_rss.unwrap_or(0.0)
        );
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        println!("delivery p50 / p99 {} / {} ms", ms(pick(0.50)), ms(pick(0.99)));
        println!("events delivered   {total} ({:.0}/s)", total as f64 / live_time.as_secs_f64());
    }
    if failures > 0 {
        bail!("{failures} streams failed");
    }
    Ok(())
}

/// One subscriber: reads the stream to its end, timing every lifecycle event.
async fn subscribe(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    latencies: &Mutex<Vec<u64>>,
    events: &AtomicU64,
    connected: &AtomicU64,
) -> anyhow::Result<()> {
    let response = http.get(url).bearer_auth(key).send().await?.error_for_status()?;
    connected.fetch_add(1, Ordering::Relaxed);
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut mine = Vec::new();
    while let Some(chunk) = body.next().await {
        buffer.extend_from_slice(&chunk?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            events.fetch_add(1, Ordering::Relaxed);
            let value: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            // Lifecycle events after `queued` were delivered live: time them.
            if let (Some(created), Some(seq)) = (value["created_at"].as_str(), value["seq"].as_i64()) {
                if seq > 1 {
                    if let Ok(created) = chrono::DateTime::parse_from_rfc3339(created) {
                        let ms = (chrono::Utc::now() - created.with_timezone(&chrono::Utc)).num_milliseconds();
                        mine.push(ms.max(0) as u64);
                    }
                }
            }
        }
    }
    latencies.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
    Ok(())
}

async fn wait_for(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(url).send().await.is_err() {
        if Instant::now() > deadline {
            bail!("{url} did not answer");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// A `/proc/<pid>/status` memory figure in MB (`VmRSS` now, `VmHWM` peak).
fn rss_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The same server URL with another database name.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, _) = url.rsplit_once('/').context("DATABASE_URL has no database name")?;
    Ok(format!("{base}/{database}"))
}
