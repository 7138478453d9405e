//! The broker's and PostgreSQL's restarts: whole servers taken down and brought back,
//! spread evenly over the submit phase.

use std::{
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use super::{submit::SubmitTally, ChaosBench};

/// The PostgreSQL cluster the default database restart acts on (Debian's layout).
const CLUSTERS: &str = "/etc/postgresql";
const CLUSTER: &str = "main";

/// A service the run takes down and brings back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Service {
    Broker,
    Database,
}

impl Service {
    pub(super) fn name(self) -> &'static str {
        match self {
            Service::Broker => "broker",
            Service::Database => "database",
        }
    }
}

/// `broker` and `database` restarts in one order, the fewer kind spread evenly among
/// the other (2 and 1: broker, database, broker).
pub(super) fn schedule(broker: usize, database: usize) -> Vec<Service> {
    let total = broker + database;
    let mut order = vec![Service::Broker; total];
    for j in 0..database {
        order[(2 * j + 1) * total / (2 * database)] = Service::Database;
    }
    order
}

/// One restart done.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(super) struct Outage {
    pub(super) service: Service,
    /// Seconds from the start of the run to the stop.
    pub(super) at_s: f64,
    /// Seconds from the stop until the start command returned (the service was back).
    pub(super) down_s: f64,
    #[serde(skip)]
    pub(super) back: Instant,
}

/// How the services are taken down and brought back.
#[derive(Debug, Clone)]
pub(super) struct Restarts {
    broker_node: Option<String>,
    /// `None` when the run restarts no database.
    database: Option<DbRestart>,
    down: Duration,
}

#[derive(Debug, Clone)]
enum DbRestart {
    /// `pg_ctlcluster` on the local cluster `main` of this version.
    Cluster(String),
    /// The operator's shell command, which does the whole restart.
    Command(String),
}

impl Restarts {
    /// Finds the database cluster now, so a missing one does not cost a run.
    pub(super) fn new(args: &ChaosBench) -> anyhow::Result<Self> {
        let database = match (&args.db_restart_cmd, args.db_restarts) {
            (_, 0) => None,
            (Some(command), _) => Some(DbRestart::Command(command.clone())),
            (None, _) => Some(DbRestart::Cluster(local_cluster_version()?)),
        };
        Ok(Self { broker_node: args.broker_node.clone(), database, down: Duration::from_secs_f64(args.down_s) })
    }

    async fn restart(&self, service: Service) -> anyhow::Result<()> {
        match (service, &self.database) {
            (Service::Broker, _) => self.outage(&self.rabbitmqctl("stop_app"), &self.rabbitmqctl("start_app")).await,
            (Service::Database, Some(DbRestart::Cluster(version))) => {
                self.outage(&pg_ctlcluster(version, "stop"), &pg_ctlcluster(version, "start")).await
            }
            (Service::Database, Some(DbRestart::Command(command))) => {
                run_command(&["sh".to_owned(), "-c".to_owned(), command.clone()]).await
            }
            (Service::Database, None) => bail!("no database restart was set up"),
        }
    }

    /// Stops, waits `down`, starts. The start runs even if the stop failed, so a
    /// failure never leaves the service down.
    async fn outage(&self, stop: &[String], start: &[String]) -> anyhow::Result<()> {
        let stopped = run_command(stop).await;
        if stopped.is_ok() {
            tokio::time::sleep(self.down).await;
        }
        let started = run_command(start).await;
        stopped.and(started)
    }

    fn rabbitmqctl(&self, action: &str) -> Vec<String> {
        let mut argv = vec!["rabbitmqctl".to_owned()];
        if let Some(node) = &self.broker_node {
            argv.extend(["-n".to_owned(), node.clone()]);
        }
        argv.push(action.to_owned());
        argv
    }
}

/// `pg_ctlcluster` straight to the cluster (not through systemd, which may not run here).
fn pg_ctlcluster(version: &str, action: &str) -> Vec<String> {
    ["pg_ctlcluster", "--skip-systemctl-redirect", version, CLUSTER, action].map(str::to_owned).to_vec()
}

/// The version of the one PostgreSQL cluster `main` under /etc/postgresql. With
/// several, which one the run uses would be a guess: the operator names the restart.
fn local_cluster_version() -> anyhow::Result<String> {
    let entries = std::fs::read_dir(CLUSTERS)
        .with_context(|| format!("cannot list {CLUSTERS} to find the PostgreSQL cluster; pass --db-restart-cmd"))?;
    let mut versions: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join(CLUSTER).is_dir())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    versions.sort();
    match versions.as_slice() {
        [version] => Ok(version.clone()),
        [] => bail!("no PostgreSQL cluster `{CLUSTER}` under {CLUSTERS}; pass --db-restart-cmd"),
        several => {
            bail!("PostgreSQL clusters of versions {} under {CLUSTERS}; pass --db-restart-cmd", several.join(", "))
        }
    }
}

/// Runs a command line to completion; what it printed is shown only if it fails.
async fn run_command(argv: &[String]) -> anyhow::Result<()> {
    let (program, args) = argv.split_first().context("an empty command line")?;
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run `{}`", argv.join(" ")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said = if stderr.trim().is_empty() { String::from_utf8_lossy(&output.stdout) } else { stderr };
        bail!("`{}` failed ({}): {}", argv.join(" "), output.status, said.trim());
    }
    Ok(())
}

/// Runs the restarts in `order`, the k-th of n when k/(n+1) of the jobs have been
/// accepted: spread evenly over the submit phase whatever its length. One restart
/// ends before the next begins. Stops waiting for a turn when no more jobs will be
/// accepted (the clients failed) or the run is stopping; a restart under way always
/// finishes, so no service is left down.
pub(super) async fn restart_services(
    restarts: Restarts,
    order: Vec<Service>,
    jobs: usize,
    tally: Arc<SubmitTally>,
    no_more_submits: CancellationToken,
    stop: CancellationToken,
    started: Instant,
) -> anyhow::Result<Vec<Outage>> {
    let mut done = Vec::with_capacity(order.len());
    for (i, &service) in order.iter().enumerate() {
        let due = jobs * (i + 1) / (order.len() + 1);
        if !turn_comes(&tally.accepted, due, &no_more_submits, &stop).await {
            break;
        }
        let down_at = Instant::now();
        restarts.restart(service).await?;
        let back = Instant::now();
        done.push(Outage {
            service,
            at_s: down_at.saturating_duration_since(started).as_secs_f64(),
            down_s: back.saturating_duration_since(down_at).as_secs_f64(),
            back,
        });
    }
    Ok(done)
}

/// Waits until `due` jobs are accepted; false if that will not happen.
async fn turn_comes(
    accepted: &AtomicUsize,
    due: usize,
    no_more_submits: &CancellationToken,
    stop: &CancellationToken,
) -> bool {
    loop {
        if stop.is_cancelled() {
            return false;
        }
        if accepted.load(Ordering::Relaxed) >= due {
            return true;
        }
        if no_more_submits.is_cancelled() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_of_the_fewer_kind_fall_between_the_others() {
        use super::Service::{Broker as B, Database as D};
        assert_eq!(schedule(2, 1), [B, D, B]);
        assert_eq!(schedule(1, 2), [D, B, D]);
        assert_eq!(schedule(2, 2), [B, D, B, D]);
        assert_eq!(schedule(0, 2), [D, D]);
        assert_eq!(schedule(3, 0), [B, B, B]);
        assert!(schedule(0, 0).is_empty());
    }

    #[test]
    fn the_cluster_commands_bypass_systemd() {
        assert_eq!(
            pg_ctlcluster("15", "stop"),
            ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "stop"].map(str::to_owned)
        );
    }
}
