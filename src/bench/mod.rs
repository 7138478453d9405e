//! `ultra bench …`: benchmarks that prove the numbers in docs/BENCHMARKS.md. Each run
//! is isolated — its own database (dropped afterwards), queue prefix and Redis prefix —
//! and starts the `ultra` processes it measures as children of this one, so their
//! memory is measured alone. A `bench` tier without practical limits and a mock
//! catalog without concurrency caps keep the product's limits out of the measurement.

mod chaos;
mod idle;
mod inflight;
mod raw;
mod sse;
mod sse_client;
mod throughput;

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Subcommand;
use common::{apikey, db, queue::Topology, Config};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The machine's ceiling without Ultra's logic: confirmed publish → consume →
    /// insert a row → ack, in jobs/s.
    Raw(raw::RawBench),
    /// Jobs through a whole system (started here, or `--url`): accepted/s, completed/s,
    /// submit → terminal latency over SSE, RSS, and the ratio to `raw`.
    Throughput(throughput::ThroughputBench),
    /// How many provider calls one worker process keeps in flight, and its RSS.
    Inflight(inflight::InflightBench),
    /// Workers SIGKILLed and restarted, broker connections closed, the broker and
    /// PostgreSQL restarted: lost and duplicated jobs (exits non-zero on any).
    Chaos(chaos::ChaosBench),
    /// Many SSE subscribers on one api process: RSS, delivery latency, events/s.
    Sse(sse::SseBench),
    /// The memory of an idle `ultra all`.
    Idle(idle::IdleBench),
}

pub async fn run(config: &Config, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Raw(args) => raw::run(config, args).await,
        BenchCommand::Throughput(args) => throughput::run(config, args).await,
        BenchCommand::Inflight(args) => inflight::run(config, args).await,
        BenchCommand::Chaos(args) => chaos::run(config, args).await,
        BenchCommand::Sse(args) => sse::run(config, args).await,
        BenchCommand::Idle(args) => idle::run(config, args).await,
    }
}

/// One isolated benchmark run and the processes it starts.
pub struct Harness {
    pub run: String,
    pub pool: PgPool,
    database_url: String,
    amqp_url: String,
    redis_url: String,
    config_file: PathBuf,
    mock_latency_ms: u64,
    exe: PathBuf,
}

impl Harness {
    /// Runs `bench` on a new isolated run, and cleans up after it whatever it returns.
    pub async fn run<T>(
        config: &Config,
        mock_latency_ms: u64,
        bench: impl AsyncFnOnce(&Harness) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let harness = Self::new(config, mock_latency_ms).await?;
        let result = bench(&harness).await;
        harness.finish().await;
        result
    }

    async fn new(config: &Config, mock_latency_ms: u64) -> anyhow::Result<Self> {
        let run = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let database_url = with_database(&config.database_url, &format!("ultra_{run}"))?;
        let pool = db::connect_and_prepare(&database_url, &CancellationToken::new())
            .await
            .context("cannot prepare the benchmark database")?;
        let config_file = std::env::temp_dir().join(format!("ultra-{run}.toml"));
        std::fs::write(&config_file, BENCH_CONFIG).context("write the benchmark's configuration file")?;
        Ok(Self {
            run,
            pool,
            database_url,
            amqp_url: config.amqp_url.clone(),
            redis_url: config.redis_url.clone(),
            config_file,
            mock_latency_ms,
            exe: std::env::current_exe().context("locate the ultra binary")?,
        })
    }

    /// The queue prefix the run's processes share.
    pub fn queue_prefix(&self) -> String {
        format!("{}.", self.run)
    }

    /// `ultra <args>` configured for this run; killed when dropped.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.exe);
        command
            .args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("REDIS_URL", &self.redis_url)
            .env("ULTRA_QUEUE_PREFIX", self.queue_prefix())
            .env("ULTRA_REDIS_PREFIX", &self.run)
            .env("ULTRA_CONFIG_FILE", &self.config_file)
            .env("ULTRA_MOCK_LATENCY_MS", self.mock_latency_ms.to_string())
            .env("ULTRA_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .env_remove("ULTRA_METRICS_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Starts `ultra <args>` with `ULTRA_LISTEN` or `ULTRA_WORKER_LISTEN` on `listen`
    /// (and `env`), and waits until it answers `/health/live` there.
    pub async fn spawn(
        &self,
        args: &[&str],
        listen: std::net::SocketAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let variable = if args.first() == Some(&"worker") { "ULTRA_WORKER_LISTEN" } else { "ULTRA_LISTEN" };
        command.env(variable, listen.to_string());
        let child = command.spawn().with_context(|| format!("start `ultra {}`", args.join(" ")))?;
        let process = Process { pid: child.id().context("child pid")?, child, base: format!("http://{listen}") };
        wait_for(&format!("{}/health/live", process.base)).await?;
        Ok(process)
    }

    /// A user in the `bench` tier and its API key.
    pub async fn api_key(&self) -> anyhow::Result<String> {
        let user = db::users::create(&self.pool, &format!("{}@bench.invalid", uuid::Uuid::new_v4()), "user").await?;
        db::users::update_admin(&self.pool, user.id, Some("bench"), None).await?;
        let key = apikey::generate();
        db::api_keys::insert(&self.pool, user.id, "bench", &key.prefix, &key.hash).await?;
        Ok(key.secret)
    }

    /// Deletes what the run created: its queues, its configuration file, its database.
    async fn finish(self) {
        if let Err(err) = Topology::new(&self.queue_prefix()).delete(&self.amqp_url).await {
            eprintln!("warning: could not delete the benchmark's queues: {err}");
        }
        let _ = std::fs::remove_file(&self.config_file);
        self.pool.close().await;
        use sqlx::migrate::MigrateDatabase;
        if let Err(err) = sqlx::Postgres::force_drop_database(&self.database_url).await {
            eprintln!("warning: could not drop the benchmark database: {err}");
        }
    }
}

/// Limits far above anything a benchmark reaches (tier `bench`), and mock models
/// whose concurrency caps do not bind.
const BENCH_CONFIG: &str = include_str!("limitless.toml");

/// The mock models a job of `count` models names.
pub fn models(count: usize) -> anyhow::Result<Vec<&'static str>> {
    const MODELS: [&str; 3] = ["mock/alpha", "mock/beta", "mock/gamma"];
    if !(1..=MODELS.len()).contains(&count) {
        bail!("--models must be 1 to {}", MODELS.len());
    }
    Ok(MODELS[..count].to_vec())
}

/// A process's resident memory in MB: now, and its peak so far.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rss {
    pub now_mb: Option<f64>,
    pub peak_mb: Option<f64>,
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSS {} (peak {})", figure(self.now_mb, 1, " MB"), figure(self.peak_mb, 1, " MB"))
    }
}

/// The body every benchmark submits: one prompt to `models`.
pub fn analyze_body(models: &[impl serde::Serialize]) -> serde_json::Value {
    serde_json::json!({ "prompt": "Benchmark: why is the sky blue?", "models": models })
}

/// An `ultra` child process.
pub struct Process {
    pub child: Child,
    pub pid: u32,
    /// `http://host:port` it serves.
    pub base: String,
}

impl Process {
    /// Resident memory now, and its peak (one read of `/proc/<pid>/status`).
    pub fn rss(&self) -> Rss {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let mb = |field| common::metrics::status_kb(&status, field).map(|kb| kb as f64 / 1024.0);
        Rss { now_mb: mb("VmRSS"), peak_mb: mb("VmHWM") }
    }

    /// SIGTERM, then SIGKILL if it has not stopped within 30 s.
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// A free local address for a child to listen on.
pub async fn free_address() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

/// Waits until `url` answers with a success (60 s at most).
pub async fn wait_for(url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
        if Instant::now() > deadline {
            bail!("{url} did not answer");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The same server URL (and options, such as `?sslmode=`) with another database name.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (location, query) = url.split_once('?').map_or((url, None), |(l, q)| (l, Some(q)));
    let authority_end = location.find("://").map_or(0, |i| i + 3);
    let base = match location[authority_end..].find('/') {
        Some(slash) => &location[..authority_end + slash],
        None => location,
    };
    Ok(match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    })
}

/// The `q` quantile (0–1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} {per_sec} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// Prints a summary: a two-column table, or with `json` the record as one line.
pub fn report(json: bool, title: &str, rows: &[(&str, String)], record: &serde_json::Value) {
    if json {
        println!("{record}");
        return;
    }
    println!("{title}");
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, value) in rows {
        println!("  {name:<width$}  {value}");
    }
}

/// A response's server-sent events, read with the parser the worker uses for
/// providers' streams. Heartbeats arrive every 10 s, so a minute of silence is an error.
pub fn sse_events(
    response: reqwest::Response,
) -> futures::stream::BoxStream<'static, Result<worker::providers::http::SseMessage, worker::providers::ProviderError>>
{
    worker::providers::http::sse(response, Duration::from_secs(60))
}

/// A figure for the table: fixed decimals, or `-` when there is none.
pub fn figure(value: Option<f64>, decimals: usize, unit: &str) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}{unit}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_database_keeps_the_server_and_its_options() {
        let url = |u: &str| with_database(u, "b").expect("url");
        assert_eq!(url("postgres://u:p@h:5432/a"), "postgres://u:p@h:5432/b");
        assert_eq!(url("postgres://u@h/a?sslmode=require"), "postgres://u@h/b?sslmode=require");
        assert_eq!(url("postgres://h:5432"), "postgres://h:5432/b");
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let samples = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&samples, 0.5), Some(2.0));
        assert_eq!(quantile(&samples, 0.99), Some(4.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
