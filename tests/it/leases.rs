//! Leases under load. A worker whose broker connection drops mid-job aborts its jobs
//! while the broker redelivers them; it must not keep their leases while it goes on
//! working, or every other worker drops their redeliveries as duplicates and the jobs
//! stay `running` for as long as it is busy.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::Settings;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::audit::{self, DeliveryAudit};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::providers::{MockProvider, Providers};

use crate::{
    proxy::Proxy,
    support::{Options, TestApp, PATIENCE},
};

/// A new job this often, each one provider call this long: about twenty jobs in flight
/// at any time, so both workers are always busy.
const SUBMIT_EVERY: Duration = Duration::from_millis(150);
const CALL_MS: u64 = 3_000;
/// Running jobs each worker holds before the cut.
const BUSY: i64 = 5;

/// Two workers under continuous load; one loses its broker connection mid-job, and
/// reconnects and keeps receiving work. Every job submitted before the cut must end
/// within a lease (plus the reaper's 5 s) of it, while the load goes on.
#[tokio::test]
async fn jobs_aborted_on_a_lost_broker_connection_end_within_a_lease_under_load() {
    // Prefetch 32: the worker that keeps its connection has room for every redelivery.
    let options = Options { worker: false, mock_latency_ms: CALL_MS, concurrency: 32, ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    // One worker reaches the broker through a proxy: cutting it drops that worker's
    // connection alone.
    let (broker, proxied_url) = Proxy::start_for_url(&app.config.amqp_url).await;
    let mut cut_settings = (*app.settings).clone();
    cut_settings.config.amqp_url = proxied_url;
    let stop_workers = CancellationToken::new();
    let workers =
        [spawn_worker(app.settings.clone(), &stop_workers), spawn_worker(Arc::new(cut_settings), &stop_workers)];
    let (_, key) = app.user_with_key().await;
    let load = Load::start(&app, &key);

    wait_until_both_busy(&app).await;
    let before_cut = load.submitted();
    let cut = Instant::now();
    broker.cut();
    // Only the open connection drops: the worker reconnects and goes on taking jobs.
    broker.restore();

    // The load goes on meanwhile: before the fix, the cut worker's renewals kept the
    // aborted jobs leased, and the other worker dropped their redeliveries.
    let deadline = cut + worker::pipeline::LEASE + Duration::from_secs(5);
    let mut unfinished = unfinished_among(&app, &before_cut).await;
    while !unfinished.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        unfinished = unfinished_among(&app, &before_cut).await;
    }
    let waited = cut.elapsed();
    let all = load.stop().await;
    assert!(
        unfinished.is_empty(),
        "{} of the {} jobs submitted before the cut were unfinished {waited:?} after it: {unfinished:?}",
        unfinished.len(),
        before_cut.len(),
    );
    eprintln!("leases: {} jobs submitted before the cut all ended {waited:?} after it", before_cut.len());

    // The cut did interrupt running jobs (they were claimed again), and the cut worker
    // kept receiving work after it.
    let interrupted: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND attempts > 1")
        .bind(&before_cut[..])
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert!(interrupted > 0, "the cut interrupted no running job");
    wait_until_drained(&app).await;
    let owners: i64 = sqlx::query_scalar("SELECT count(DISTINCT lease_owner) FROM jobs WHERE id = ANY($1)")
        .bind(&all[before_cut.len()..])
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(owners, 2, "both workers ran jobs submitted after the cut");

    // Every job succeeded once, each step recorded once, nothing left unpublished.
    let audit = audit::delivery(&app.pool).await.expect("audit");
    assert_eq!(audit, DeliveryAudit { jobs: all.len() as i64, ..Default::default() });

    stop_workers.cancel();
    for worker in workers {
        match tokio::time::timeout(PATIENCE, worker).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => panic!("a worker failed: {err:#}"),
            Ok(Err(err)) => panic!("a worker panicked: {err}"),
            Err(_) => panic!("a worker did not shut down"),
        }
    }
    drop(broker);
    app.stop().await;
}

/// A worker in this process, with its own mock provider (at the configured latency)
/// and its own worker id.
fn spawn_worker(settings: Arc<Settings>, stop: &CancellationToken) -> JoinHandle<anyhow::Result<()>> {
    let mock = Arc::new(MockProvider::new(settings.config.mock_latency()));
    let worker = worker::Worker::new(settings).with_providers(Providers::new(mock));
    tokio::spawn(worker.run(None, stop.clone()))
}

/// Waits until each of the two workers holds leases on `BUSY` running jobs or more.
async fn wait_until_both_busy(app: &TestApp) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT lease_owner FROM jobs WHERE status = 'running'
                                    GROUP BY lease_owner HAVING count(*) >= $1) busy",
        )
        .bind(BUSY)
        .fetch_one(&app.pool)
        .await
        .expect("count");
        if busy >= 2 {
            return;
        }
        assert!(Instant::now() < deadline, "the two workers never both got busy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Which of `ids` are still queued or running.
async fn unfinished_among(app: &TestApp, ids: &[Uuid]) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM jobs WHERE id = ANY($1) AND status IN ('queued', 'running') ORDER BY id")
        .bind(ids)
        .fetch_all(&app.pool)
        .await
        .expect("unfinished jobs")
}

/// Waits until every job has ended and the outbox is empty (a requeued job's row may
/// be published after the job ended elsewhere; its delivery is then dropped).
async fn wait_until_drained(app: &TestApp) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')) + (SELECT count(*) FROM outbox)",
        )
        .fetch_one(&app.pool)
        .await
        .expect("count");
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} jobs or outbox rows left after the load stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits a one-model job every `SUBMIT_EVERY` until stopped.
struct Load {
    ids: Arc<Mutex<Vec<Uuid>>>,
    halt: CancellationToken,
    task: JoinHandle<()>,
}

impl Load {
    fn start(app: &TestApp, key: &str) -> Self {
        let (http, url, key) = (app.http.clone(), app.url("/v1/analyze"), key.to_owned());
        let ids = Arc::new(Mutex::new(Vec::new()));
        let halt = CancellationToken::new();
        let (submitted, halted) = (ids.clone(), halt.clone());
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(SUBMIT_EVERY);
            loop {
                tokio::select! {
                    _ = halted.cancelled() => return,
                    _ = every.tick() => {}
                }
                let body = json!({ "prompt": "Why is the sky blue?", "models": ["mock/alpha"] });
                let response = http.post(&url).bearer_auth(&key).json(&body).send().await.expect("POST /v1/analyze");
                assert_eq!(response.status(), StatusCode::ACCEPTED);
                let job: Value = response.json().await.expect("JSON body");
                let id: Uuid = job["id"].as_str().and_then(|id| id.parse().ok()).expect("job id");
                submitted.lock().expect("ids").push(id);
            }
        });
        Self { ids, halt, task }
    }

    /// The jobs submitted so far, in order.
    fn submitted(&self) -> Vec<Uuid> {
        self.ids.lock().expect("ids").clone()
    }

    /// Stops submitting; returns every job submitted, in order.
    async fn stop(self) -> Vec<Uuid> {
        let Self { ids, halt, task } = self;
        halt.cancel();
        task.await.expect("every submission was accepted");
        let submitted = ids.lock().expect("ids").clone();
        submitted
    }
}
