//! `ultra bench chaos`: the delivery guarantees under fire. An `ultra api` and
//! `--workers` worker processes share the jobs; every `--kill-every-s` one worker is
//! SIGKILLed and a fresh one started, and every fourth time all of the run's broker
//! connections are closed as well (`rabbitmqctl close_connection`). When every job has
//! ended, the database is audited: lost jobs, duplicate results, steps recorded twice.
//! Exits non-zero on any.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use common::{db::audit, Config};

use super::{free_address, models, progress, report, Harness, Process};

#[derive(Debug, Args)]
pub struct ChaosBench {
    #[arg(long, default_value_t = 2_000)]
    jobs: usize,
    /// Worker processes running at once.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seconds between SIGKILLs.
    #[arg(long, default_value_t = 2.0)]
    kill_every_s: f64,
    /// Concurrency of each worker.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Models per job.
    #[arg(long, default_value_t = 2)]
    models: usize,
    /// Mock provider latency per call: calls are in flight when a worker dies.
    #[arg(long, default_value_t = 100)]
    mock_latency_ms: u64,
    /// Give up waiting for the jobs to end after this long.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Config, args: ChaosBench) -> anyhow::Result<()> {
    let models = models(args.models)?;
    if args.workers == 0 || !(args.kill_every_s.is_finite() && args.kill_every_s > 0.0 && args.kill_every_s < 86_400.0)
    {
        bail!("--workers must be at least 1, and --kill-every-s between 0 and a day");
    }
    Harness::run(config, args.mock_latency_ms, async |harness| measure(harness, &args, &models).await).await
}

async fn measure(harness: &Harness, args: &ChaosBench, models: &[&str]) -> anyhow::Result<()> {
    let api = harness.spawn(&["api"], free_address().await?, &[]).await?;
    let key = harness.api_key().await?;
    let concurrency = args.concurrency.to_string();
    let spawn_worker = || async {
        harness.spawn(&["worker"], free_address().await?, &[("ULTRA_WORKER_CONCURRENCY", concurrency.as_str())]).await
    };
    let mut workers: Vec<Process> = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        workers.push(spawn_worker().await?);
    }

    // Submitting runs alongside the kills: jobs are accepted while workers die.
    let started = Instant::now();
    let submitter =
        tokio::spawn(submit_all(api.base.clone(), key, models.iter().map(|m| m.to_string()).collect(), args.jobs));
    let bar = progress(args.jobs as u64, "ended");
    let (mut kills, mut broker_closes) = (0_usize, 0_usize);
    let mut next_kill = Instant::now() + Duration::from_secs_f64(args.kill_every_s);
    let deadline = started + Duration::from_secs(args.timeout_s);
    let drained = loop {
        let (unfinished, total): (i64, i64) =
            sqlx::query_as("SELECT count(*) FILTER (WHERE status IN ('queued', 'running')), count(*) FROM jobs")
                .fetch_one(&harness.pool)
                .await?;
        bar.set_position((total - unfinished) as u64);
        bar.set_message(format!("{kills} kills, {broker_closes} broker closes"));
        if unfinished == 0 && submitter.is_finished() {
            break Some(started.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        if Instant::now() >= next_kill {
            next_kill += Duration::from_secs_f64(args.kill_every_s);
            let victim = workers.remove(kills % workers.len());
            let _ = std::process::Command::new("kill").args(["-KILL", &victim.pid.to_string()]).status();
            drop(victim);
            kills += 1;
            if kills % 4 == 0 {
                let prefix = harness.queue_prefix();
                let closed = tokio::task::spawn_blocking(move || common::queue::close_connections(&prefix)).await?;
                closed
                    .context("rabbitmqctl (the broker's own tool) closes connections; run this on the broker's host")?;
                broker_closes += 1;
            }
            workers.push(spawn_worker().await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    let submitted = submitter.await.context("submitter")??;
    for worker in workers {
        worker.stop().await;
    }
    api.stop().await;

    let audit = audit::delivery(&harness.pool).await?;
    let lost = audit.unfinished + audit.not_succeeded + (args.jobs - submitted) as i64;
    let record = serde_json::json!({
        "bench": "chaos", "jobs": args.jobs, "workers": args.workers, "kill_every_s": args.kill_every_s,
        "kills": kills, "broker_closes": broker_closes, "drained_s": drained.map(|d| d.as_secs_f64()),
        "lost": lost, "duplicate_results": audit.duplicate_results, "repeated_steps": audit.repeated_steps,
        "audit": audit,
    });
    let rows = [
        ("jobs", format!("{} ({} models, {} ms mock latency)", args.jobs, args.models, args.mock_latency_ms)),
        ("workers", format!("{} × concurrency {}", args.workers, args.concurrency)),
        (
            "chaos",
            format!("{kills} SIGKILLs (one per {} s), {broker_closes} broker connection closes", args.kill_every_s),
        ),
        (
            "drained in",
            drained.map_or_else(|| format!("not within {} s", args.timeout_s), |d| format!("{:.1} s", d.as_secs_f64())),
        ),
        ("lost jobs", lost.to_string()),
        ("duplicate results", audit.duplicate_results.to_string()),
        ("repeated steps", audit.repeated_steps.to_string()),
    ];
    report(args.json, "ultra bench chaos", &rows, &record);
    if lost > 0 || audit.duplicate_results > 0 || audit.repeated_steps > 0 {
        bail!(
            "delivery guarantees broken: {lost} lost, {} duplicated, {} steps repeated",
            audit.duplicate_results,
            audit.repeated_steps
        );
    }
    Ok(())
}

/// Submits `jobs` jobs with 8 clients; returns how many were accepted. A refused
/// submit is retried (the api may be busy), never counted twice: each carries an
/// `Idempotency-Key`.
async fn submit_all(base: String, key: String, models: Vec<String>, jobs: usize) -> anyhow::Result<usize> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let body = super::analyze_body(&models);
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..8 {
        let (http, url, key, body) = (http.clone(), format!("{base}/v1/analyze"), key.clone(), body.clone());
        clients.spawn(async move {
            let mut accepted = 0;
            for n in (client..jobs).step_by(8) {
                let idempotency_key = format!("chaos-{n}");
                for attempt in 0.. {
                    let sent = http
                        .post(&url)
                        .bearer_auth(&key)
                        .header("idempotency-key", &idempotency_key)
                        .json(&body)
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status().is_success() => {
                            accepted += 1;
                            break;
                        }
                        _ if attempt < 10 => tokio::time::sleep(Duration::from_millis(200)).await,
                        Ok(response) => bail!("submit answered {}", response.status()),
                        Err(err) => return Err(err.into()),
                    }
                }
            }
            anyhow::Ok(accepted)
        });
    }
    let mut accepted = 0;
    while let Some(done) = clients.join_next().await {
        accepted += done??;
    }
    Ok(accepted)
}
