//! `ultra-bench chaos`: the delivery guarantees under fire. An `ultra api` and
//! `--workers` worker processes share the jobs. While the jobs are being submitted,
//! every `--kill-every-s` one worker is SIGKILLed and a fresh one started, and every
//! fourth time all of the run's broker connections are closed as well (`rabbitmqctl
//! close_connection`). `--broker-restarts` and `--db-restarts` take the broker and
//! PostgreSQL down and bring them back, spread evenly over the submit phase. The faults
//! stop once every job is accepted and every restart is done, so the time from the last
//! fault to the last job's end is the recovery time. Then the database is audited: lost
//! jobs, duplicate results, steps recorded twice, jobs created twice. Exits non-zero on
//! any.
//!
//! The restarts are of the whole servers, not of this run's connections: anything else
//! using them (other tests) sees the outages too.

mod outages;
mod submit;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use futures::{future::LocalBoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use outages::{restart_services, schedule, Outage, Restarts, Service};
use sqlx::PgPool;
use submit::{submit_all, SubmitTally, SUBMIT_PATIENCE};
use testkit::audit;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    figure,
    harness::{free_address, Harness, Process, Processes, Services},
    models, progress, report,
};

/// How often progress is read and the kill schedule looked at.
const TICK: Duration = Duration::from_millis(200);
/// Every this many kills, the run's broker connections are closed too.
const CLOSE_EVERY: usize = 4;

#[derive(Debug, Args)]
pub struct ChaosBench {
    #[arg(long, default_value_t = 2_000)]
    jobs: usize,
    /// Worker processes running at once.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seconds between SIGKILLs, until every job is accepted and every restart done.
    #[arg(long, default_value_t = 2.0)]
    kill_every_s: f64,
    /// Restarts of the broker (`rabbitmqctl stop_app`, `--down-s`, `start_app`), spread
    /// evenly over the submit phase together with the database restarts.
    #[arg(long, default_value_t = 0)]
    broker_restarts: usize,
    /// The broker node to restart (`rabbitmqctl -n`), e.g. one node of a cluster; by
    /// default rabbitmqctl's default node.
    #[arg(long)]
    broker_node: Option<String>,
    /// Restarts of PostgreSQL: `pg_ctlcluster <version> main stop`, `--down-s`, `start`,
    /// for the one cluster under /etc/postgresql.
    #[arg(long, default_value_t = 0)]
    db_restarts: usize,
    /// A shell command that restarts PostgreSQL instead (its own stop, wait and start),
    /// e.g. `docker restart postgres`.
    #[arg(long)]
    db_restart_cmd: Option<String>,
    /// Seconds each restarted service stays down.
    #[arg(long, default_value_t = 8.0)]
    down_s: f64,
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

pub async fn run(services: &Services, processes: &Processes, args: ChaosBench) -> anyhow::Result<()> {
    let models = models(args.models)?;
    if args.workers == 0 || !(args.kill_every_s.is_finite() && args.kill_every_s > 0.0 && args.kill_every_s < 86_400.0)
    {
        bail!("--workers must be at least 1, and --kill-every-s between 0 and a day");
    }
    if !(args.down_s.is_finite() && args.down_s > 0.0 && args.down_s <= 60.0) {
        bail!("--down-s must be more than 0 and at most 60 (a submit is retried for {} s)", SUBMIT_PATIENCE.as_secs());
    }
    // Found before anything starts: a missing cluster should not cost a run.
    let restarts = Restarts::new(&args)?;
    Harness::run(services, Some(processes), args.mock_latency_ms, async |harness| {
        measure(harness, &args, &models, &restarts).await
    })
    .await
}

async fn measure(harness: &Harness, args: &ChaosBench, models: &[&str], restarts: &Restarts) -> anyhow::Result<()> {
    let api = harness.spawn(&["api"], free_address().await?, &[]).await?;
    let key = harness.api_key().await?;
    let concurrency = args.concurrency.to_string();
    let mut workers: Vec<Process> = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        workers.push(spawn_worker(harness, &concurrency).await?);
    }

    // Submitting, the restarts and the progress readings run alongside the kills: jobs
    // are accepted while workers die and services go away.
    let started = Instant::now();
    let tally = Arc::new(SubmitTally::default());
    let models = models.iter().map(|m| m.to_string()).collect();
    let submitter = tokio::spawn(submit_all(api.base.clone(), key, models, args.jobs, tally.clone()));
    let (no_more_submits, stop) = (CancellationToken::new(), CancellationToken::new());
    let order = schedule(args.broker_restarts, args.db_restarts);
    let outages = tokio::spawn(restart_services(
        restarts.clone(),
        order,
        args.jobs,
        tally.clone(),
        no_more_submits.clone(),
        stop.clone(),
        started,
    ));
    let (progress_tx, progress_rx) = watch::channel(None);
    let poller = tokio::spawn(poll_progress(harness.pool.clone(), progress_tx, stop.clone()));
    let ran = Chaos {
        harness,
        args,
        concurrency: &concurrency,
        started,
        submitter: &submitter,
        outages: &outages,
        no_more_submits: &no_more_submits,
        progress: &progress_rx,
    }
    .run(&mut workers)
    .await;
    // Whatever happened, no service is left down: no restart starts after this, and
    // the one under way (if any) finishes before the run ends.
    stop.cancel();
    no_more_submits.cancel();
    let outages = outages.await.context("the restart task")?;
    let _ = poller.await;
    let injected = ran?;
    let outages = outages?;
    submitter.abort(); // still retrying only if the run timed out
    let submit_error = match submitter.await {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(format!("{err:#}")),
        Err(err) => Some(format!("submitting did not finish: {err}")),
    };
    for worker in workers {
        worker.stop().await;
    }
    api.stop().await;

    let audit = audit::delivery(&harness.pool).await?;
    let verdict = Verdict::new(args, &tally, &audit);
    let timing = Timing::new(started, &injected, &outages);
    print_report(args, &injected, &outages, &tally, &audit, &verdict, &timing);
    if let Some(err) = submit_error {
        bail!("the benchmark's clients could not submit every job: {err}");
    }
    verdict.check(&audit)
}

/// Starts a worker and waits until it answers, which while the database is down means
/// until the database is back.
async fn spawn_worker(harness: &Harness, concurrency: &str) -> anyhow::Result<Process> {
    harness.spawn(&["worker"], free_address().await?, &[("ULTRA_WORKER_CONCURRENCY", concurrency)]).await
}

/// The fault loop's view of the run.
struct Chaos<'a> {
    harness: &'a Harness,
    args: &'a ChaosBench,
    concurrency: &'a str,
    started: Instant,
    submitter: &'a JoinHandle<anyhow::Result<()>>,
    outages: &'a JoinHandle<anyhow::Result<Vec<Outage>>>,
    no_more_submits: &'a CancellationToken,
    progress: &'a watch::Receiver<Option<Progress>>,
}

/// What the fault loop did, and when the jobs had all ended.
#[derive(Debug, Default)]
struct Injected {
    kills: usize,
    broker_closes: usize,
    /// The last kill or connection close.
    last_fault: Option<Instant>,
    /// When a reading after the last fault found every job ended.
    drained: Option<Instant>,
}

impl Chaos<'_> {
    /// Kills a worker every `--kill-every-s` (closing the run's broker connections every
    /// fourth time) until every job is accepted and every restart done, then waits for
    /// the jobs to end. Replacements start in the background: one started while the
    /// database is down waits for it, and the kills keep their pace meanwhile.
    async fn run(&self, workers: &mut Vec<Process>) -> anyhow::Result<Injected> {
        let bar = progress(self.args.jobs as u64, "ended");
        let interval = Duration::from_secs_f64(self.args.kill_every_s);
        let deadline = self.started + Duration::from_secs(self.args.timeout_s);
        let mut next_kill = self.started + interval;
        let mut injected = Injected::default();
        let mut starting: FuturesUnordered<LocalBoxFuture<'_, anyhow::Result<Process>>> = FuturesUnordered::new();
        let mut closing: Option<JoinHandle<std::io::Result<usize>>> = None;
        let mut faults_over: Option<Instant> = None;
        loop {
            let replacement = tokio::select! {
                Some(started) = starting.next() => Some(started),
                () = tokio::time::sleep(TICK) => None,
            };
            if let Some(started) = replacement {
                workers.push(started?);
            }
            collect_close(&mut closing, &mut injected).await?;
            let now = Instant::now();
            let reading = *self.progress.borrow();
            if let Some(reading) = reading {
                bar.set_position((reading.total - reading.unfinished).max(0) as u64);
            }
            bar.set_message(format!("{} kills, {} broker closes", injected.kills, injected.broker_closes));
            if self.submitter.is_finished() {
                self.no_more_submits.cancel();
                if faults_over.is_none() && self.outages.is_finished() && closing.is_none() {
                    faults_over = Some(now);
                }
            }
            if let Some(drained) = drained_since(faults_over, reading) {
                injected.drained = Some(drained);
                break;
            }
            if now > deadline {
                break;
            }
            if faults_over.is_none() && now >= next_kill {
                next_kill += interval;
                if kill_one(workers, &mut injected) {
                    starting.push(spawn_worker(self.harness, self.concurrency).boxed_local());
                    if injected.kills % CLOSE_EVERY == 0 && closing.is_none() {
                        let prefix = self.harness.queue_prefix();
                        closing = Some(tokio::task::spawn_blocking(move || testkit::queue::close_connections(&prefix)));
                    }
                }
            }
        }
        bar.finish_and_clear();
        Ok(injected)
    }
}

/// SIGKILLs one worker that is up; false when none is (every replacement is still
/// waiting for the database).
fn kill_one(workers: &mut Vec<Process>, injected: &mut Injected) -> bool {
    if workers.is_empty() {
        return false;
    }
    let victim = workers.remove(injected.kills % workers.len());
    let _ = std::process::Command::new("kill").args(["-KILL", &victim.pid.to_string()]).status();
    drop(victim);
    injected.kills += 1;
    injected.last_fault = Some(Instant::now());
    true
}

/// When the jobs were found drained: by a reading taken after the faults were over
/// (an earlier one may predate the last jobs accepted).
fn drained_since(faults_over: Option<Instant>, reading: Option<Progress>) -> Option<Instant> {
    let (over, reading) = (faults_over?, reading?);
    (reading.polled_at > over && reading.unfinished == 0).then_some(reading.polled_at)
}

/// Counts a finished round of broker connection closes. One that found none to close
/// (the broker was down) does not count.
async fn collect_close(
    closing: &mut Option<JoinHandle<std::io::Result<usize>>>,
    injected: &mut Injected,
) -> anyhow::Result<()> {
    let Some(handle) = closing.take_if(|handle| handle.is_finished()) else {
        return Ok(());
    };
    let closed = handle
        .await?
        .context("rabbitmqctl (the broker's own tool) closes connections; run this on the broker's host")?;
    if closed > 0 {
        injected.broker_closes += 1;
        injected.last_fault = Some(Instant::now());
    }
    Ok(())
}

/// One reading of the jobs' progress.
#[derive(Debug, Clone, Copy)]
struct Progress {
    unfinished: i64,
    total: i64,
    /// When the query was sent: everything committed before then is counted.
    polled_at: Instant,
}

/// Reads the jobs' progress every tick until `stop`, in a task of its own so a
/// database outage slows the readings, not the kills. A failed reading is skipped:
/// the last good one stands.
async fn poll_progress(pool: PgPool, progress: watch::Sender<Option<Progress>>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let polled_at = Instant::now();
        let read: Result<(i64, i64), sqlx::Error> =
            sqlx::query_as("SELECT count(*) FILTER (WHERE status IN ('queued', 'running')), count(*) FROM jobs")
                .fetch_one(&pool)
                .await;
        if let Ok((unfinished, total)) = read {
            progress.send_replace(Some(Progress { unfinished, total, polled_at }));
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// The guarantees, from the audit and the clients' count.
struct Verdict {
    accepted: usize,
    /// Not accepted, never ended, or ended other than `succeeded`.
    lost: i64,
    /// Jobs beyond those accepted: a retried submit that made a second job.
    duplicate_jobs: i64,
}

impl Verdict {
    fn new(args: &ChaosBench, tally: &SubmitTally, audit: &audit::DeliveryAudit) -> Self {
        let accepted = tally.accepted();
        let not_accepted = args.jobs.saturating_sub(accepted) as i64;
        Self {
            accepted,
            lost: audit.unfinished + audit.not_succeeded + not_accepted,
            duplicate_jobs: (audit.jobs - accepted as i64).max(0),
        }
    }

    fn check(&self, audit: &audit::DeliveryAudit) -> anyhow::Result<()> {
        if self.lost > 0 || audit.duplicate_results > 0 || audit.repeated_steps > 0 || self.duplicate_jobs > 0 {
            bail!(
                "delivery guarantees broken: {} lost, {} duplicated, {} steps repeated, {} jobs created twice",
                self.lost,
                audit.duplicate_results,
                audit.repeated_steps,
                self.duplicate_jobs
            );
        }
        Ok(())
    }
}

/// When the run drained, from its start and from its last fault.
struct Timing {
    drained: Option<Duration>,
    last_fault: Option<Duration>,
    after_last_fault: Option<Duration>,
}

impl Timing {
    fn new(started: Instant, injected: &Injected, outages: &[Outage]) -> Self {
        let last_fault = outages.iter().map(|o| o.back).chain(injected.last_fault).max();
        let since_start = |at: Instant| at.saturating_duration_since(started);
        Self {
            drained: injected.drained.map(since_start),
            last_fault: last_fault.map(since_start),
            after_last_fault: injected.drained.zip(last_fault).map(|(d, f)| d.saturating_duration_since(f)),
        }
    }
}

fn print_report(
    args: &ChaosBench,
    injected: &Injected,
    outages: &[Outage],
    tally: &SubmitTally,
    audit: &audit::DeliveryAudit,
    verdict: &Verdict,
    timing: &Timing,
) {
    let restarted = |service: Service| outages.iter().filter(|o| o.service == service).count();
    let (broker_restarts, db_restarts) = (restarted(Service::Broker), restarted(Service::Database));
    let seconds = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let record = serde_json::json!({
        "bench": "chaos", "jobs": args.jobs, "workers": args.workers, "kill_every_s": args.kill_every_s,
        "kills": injected.kills, "broker_closes": injected.broker_closes,
        "broker_restarts": broker_restarts, "db_restarts": db_restarts, "down_s": args.down_s, "outages": outages,
        "drained_s": seconds(timing.drained), "last_fault_s": seconds(timing.last_fault),
        "drained_after_last_fault_s": seconds(timing.after_last_fault),
        "accepted": verdict.accepted, "submits": tally,
        "lost": verdict.lost, "duplicate_results": audit.duplicate_results, "repeated_steps": audit.repeated_steps,
        "duplicate_jobs": verdict.duplicate_jobs, "audit": audit,
    });
    let mut chaos = format!(
        "{} SIGKILLs (one per {} s), {} broker connection closes",
        injected.kills, args.kill_every_s, injected.broker_closes
    );
    if args.broker_restarts + args.db_restarts > 0 {
        chaos += &format!(
            ", {}, {} ({} s down each)",
            counted(broker_restarts, "broker restart"),
            counted(db_restarts, "database restart"),
            args.down_s
        );
    }
    let mut rows = vec![
        ("jobs", format!("{} ({} models, {} ms mock latency)", args.jobs, args.models, args.mock_latency_ms)),
        ("workers", format!("{} × concurrency {}", args.workers, args.concurrency)),
        ("chaos", chaos),
    ];
    if !outages.is_empty() {
        let each = outages.iter().map(|o| format!("{} at {:.1} s for {:.1} s", o.service.name(), o.at_s, o.down_s));
        rows.push(("restarts", each.collect::<Vec<_>>().join("; ")));
    }
    rows.extend([
        ("submit retries", tally.retries()),
        (
            "drained in",
            timing
                .drained
                .map_or_else(|| format!("not within {} s", args.timeout_s), |d| format!("{:.1} s", d.as_secs_f64())),
        ),
        ("after last fault", figure(seconds(timing.after_last_fault), 1, " s")),
        ("lost jobs", verdict.lost.to_string()),
        ("duplicate results", audit.duplicate_results.to_string()),
        ("repeated steps", audit.repeated_steps.to_string()),
        ("jobs created twice", verdict.duplicate_jobs.to_string()),
    ]);
    report(args.json, "ultra-bench chaos", &rows, &record);
}

/// "1 broker restart", "2 broker restarts".
fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_only_by_a_reading_after_the_faults() {
        let over = Instant::now();
        let reading = |unfinished, polled_at| Some(Progress { unfinished, total: 10, polled_at });
        let later = over + Duration::from_millis(200);
        assert_eq!(drained_since(Some(over), reading(0, later)), Some(later));
        assert_eq!(drained_since(Some(over), reading(1, later)), None);
        assert_eq!(drained_since(Some(later), reading(0, over)), None);
        assert_eq!(drained_since(None, reading(0, later)), None);
    }
}
