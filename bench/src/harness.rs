//! One isolated benchmark run — its own database, queue prefix and Redis prefix — and
//! the `ultra` processes it starts; with the command-line arguments that say where
//! the services and the `ultra` binary are.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use common::{apikey, db, queue::Topology};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::figure;

/// The services every benchmark uses. Deliberately not `Debug`: the URLs carry
/// passwords.
#[derive(Args)]
#[command(next_help_heading = "Services")]
pub struct Services {
    /// PostgreSQL: each run creates a database of its own on this server and drops it
    /// at the end (the URL's own database is not touched).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/ultra"
    )]
    database_url: String,
    /// RabbitMQ: one URL, or a cluster's nodes separated by commas.
    #[arg(long, env = "AMQP_URL", hide_env_values = true, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
}

/// What a benchmark that starts `ultra` processes needs besides. Deliberately not
/// `Debug`: the URL may carry a password.
#[derive(Args)]
#[command(next_help_heading = "Services")]
pub struct Processes {
    /// Redis, for the processes started.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The `ultra` binary to start [default: `ultra` beside this binary, where
    /// `cargo build` puts it].
    #[arg(long, env = "ULTRA_BIN")]
    ultra_bin: Option<PathBuf>,
}

/// How this run starts `ultra`.
struct Ultra {
    exe: PathBuf,
    redis_url: String,
}

impl Ultra {
    /// Finds the binary now, so a missing one does not cost a run.
    fn new(processes: &Processes) -> anyhow::Result<Self> {
        let exe = match &processes.ultra_bin {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().context("locate ultra-bench")?.with_file_name("ultra"),
        };
        if !exe.is_file() {
            bail!(
                "no ultra binary at {}: build it (`cargo build --release` builds both) or pass --ultra-bin",
                exe.display()
            );
        }
        Ok(Self { exe, redis_url: processes.redis_url.clone() })
    }
}

/// One isolated benchmark run and the processes it starts.
pub struct Harness {
    /// The run's name (`bench` and eight hex digits): its Redis prefix, and the
    /// stem of its database's name and queue prefix.
    pub run: String,
    /// The run's own database.
    pub pool: PgPool,
    pub amqp_url: String,
    database_url: String,
    config_file: PathBuf,
    mock_latency_ms: u64,
    /// `None` for a benchmark that starts no process (`raw`).
    ultra: Option<Ultra>,
}

impl Harness {
    /// Runs `bench` on a new isolated run, and cleans up after it whatever it returns.
    /// `processes` is what starting `ultra` needs, for a benchmark that does.
    pub async fn run<T>(
        services: &Services,
        processes: Option<&Processes>,
        mock_latency_ms: u64,
        bench: impl AsyncFnOnce(&Harness) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let harness = Self::new(services, processes, mock_latency_ms).await?;
        let result = bench(&harness).await;
        harness.finish().await;
        result
    }

    async fn new(services: &Services, processes: Option<&Processes>, mock_latency_ms: u64) -> anyhow::Result<Self> {
        let ultra = processes.map(Ultra::new).transpose()?;
        let run = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let database_url = with_database(&services.database_url, &format!("ultra_{run}"))?;
        let pool =
            db::connect_and_prepare(&database_url, common::config::DEFAULT_DB_POOL_SIZE, &CancellationToken::new())
                .await
                .context("cannot prepare the benchmark database")?;
        let config_file = std::env::temp_dir().join(format!("ultra-{run}.toml"));
        std::fs::write(&config_file, BENCH_CONFIG).context("write the benchmark's configuration file")?;
        Ok(Self { run, pool, database_url, amqp_url: services.amqp_url.clone(), config_file, mock_latency_ms, ultra })
    }

    /// The queue prefix the run's processes share.
    pub fn queue_prefix(&self) -> String {
        format!("{}.", self.run)
    }

    /// `ultra <args>` configured for this run; killed when dropped.
    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let ultra = self.ultra.as_ref().context("this benchmark was set up to start no ultra process")?;
        let mut command = Command::new(&ultra.exe);
        command
            .args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("REDIS_URL", &ultra.redis_url)
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
        Ok(command)
    }

    /// Starts `ultra <args>` with `ULTRA_LISTEN` or `ULTRA_WORKER_LISTEN` on `listen`
    /// (and `env`), and waits until it answers `/health/live` there.
    pub async fn spawn(
        &self,
        args: &[&str],
        listen: std::net::SocketAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        let mut command = self.command(args)?;
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
        self.api_key_in_tier(BENCH_TIER).await
    }

    /// A user in `tier` and its API key: for a benchmark that measures a tier's
    /// limits at work (`batch`: the share of a user's job slots a batch may take).
    pub async fn api_key_in_tier(&self, tier: &str) -> anyhow::Result<String> {
        let user = db::users::create(&self.pool, &format!("{}@bench.invalid", uuid::Uuid::new_v4()), "user").await?;
        db::users::update_admin(&self.pool, user.id, Some(tier), None).await?;
        let key = apikey::generate();
        db::api_keys::insert(&self.pool, user.id, "bench", &key.prefix, &key.hash).await?;
        Ok(key.secret)
    }

    /// Deletes what the run created: its queues, its configuration file, its database.
    async fn finish(self) {
        let topology = Topology::new(&self.queue_prefix());
        if let Err(err) = testkit::queue::delete_topology(&topology, &self.amqp_url).await {
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

/// The tier `limitless.toml` defines, besides the built-in ones.
pub const BENCH_TIER: &str = "bench";

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
    fn the_services_and_the_binary_come_from_the_command_line() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            services: Services,
            #[command(flatten)]
            processes: Processes,
        }
        let cli = Cli::try_parse_from(["b", "--database-url", "postgres://h/x", "--ultra-bin", "/opt/ultra"])
            .expect("parses");
        assert_eq!(cli.services.database_url, "postgres://h/x");
        assert_eq!(cli.processes.ultra_bin, Some(PathBuf::from("/opt/ultra")));
        let Err(missing) = Ultra::new(&cli.processes) else { panic!("there is no binary at /opt/ultra") };
        assert!(missing.to_string().contains("/opt/ultra"), "{missing}");
    }
}
