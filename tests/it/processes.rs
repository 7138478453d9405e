//! Separate `ultra worker` processes share one queue, and an SSE subscriber on the
//! api sees events that workers in other processes publish.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::support::{Options, TestApp, PATIENCE};

struct WorkerProcess {
    child: Child,
    health: String,
    log: tokio::task::JoinHandle<Vec<String>>,
}

async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address").port()
}

async fn spawn_worker(app: &TestApp) -> WorkerProcess {
    let port = free_port().await;
    let config = &app.config;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ultra"))
        .args(["worker", "--concurrency", "1"])
        .env_clear()
        .env("DATABASE_URL", &config.database_url)
        .env("AMQP_URL", &config.amqp_url)
        .env("REDIS_URL", &config.redis_url)
        .env("ULTRA_QUEUE_PREFIX", &config.queue_prefix)
        .env("ULTRA_REDIS_PREFIX", &config.redis_prefix)
        .env("ULTRA_WORKER_LISTEN", format!("127.0.0.1:{port}"))
        .env("ULTRA_MOCK_LATENCY_MS", "200")
        .env("ULTRA_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start `ultra worker`");
    let stderr = child.stderr.take().expect("stderr");
    let log = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });
    WorkerProcess { child, health: format!("http://127.0.0.1:{port}/health/ready"), log }
}

async fn wait_ready(app: &TestApp, worker: &WorkerProcess) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(response) = app.http.get(&worker.health).send().await {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            if body["status"] == "ok" {
                return;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "worker never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, then the exit status and the log lines.
async fn terminate(mut worker: WorkerProcess) -> (std::process::ExitStatus, Vec<String>) {
    let pid = worker.child.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(sent.success());
    let status =
        tokio::time::timeout(PATIENCE, worker.child.wait()).await.expect("worker exits on SIGTERM").expect("wait");
    (status, worker.log.await.expect("log reader"))
}

#[tokio::test]
async fn two_worker_processes_share_one_queue() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let workers = [spawn_worker(&app).await, spawn_worker(&app).await];
    for worker in &workers {
        wait_ready(&app, worker).await;
    }
    let (_, key) = app.user_with_key().await;

    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(app.submit_ok(&key, &["mock/alpha"]).await);
    }
    // A stream on this process sees every event the other processes write.
    let events = crate::sse::SseReader::new(app.events(&key, ids[5], None).await).collect_events().await;
    assert_eq!(events.last().and_then(|e| e.event.as_deref()), Some("succeeded"));
    for id in &ids {
        assert_eq!(app.wait_for_terminal(&key, *id).await["status"], "succeeded");
    }

    let [first, second] = workers;
    for worker in [first, second] {
        let (status, log) = terminate(worker).await;
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
        let finished = log.iter().filter(|l| l.contains("job finished")).count();
        assert!(finished >= 1, "each worker should have run a share of the jobs; log: {log:#?}");
        assert!(log.iter().any(|l| l.contains("worker stopped")));
    }
    assert_eq!(app.mock.calls(), 0, "the in-process mock must not have been used");
    app.stop().await;
}

#[tokio::test]
async fn production_refuses_an_unsafe_configuration_listing_every_problem() {
    let output = Command::new(env!("CARGO_BIN_EXE_ultra"))
        .arg("api")
        .env_clear()
        .env("ULTRA_ENV", "production")
        .env("ULTRA_JWT_KEYS", "k1:too-short")
        .env("ULTRA_CORS_ORIGINS", "*")
        .env("ULTRA_LOG_FORMAT", "json")
        .output()
        .await
        .expect("run ultra");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for problem in
        ["guest credentials", "DATABASE_URL has no password", "mock provider", "shorter than 32 bytes", "any origin"]
    {
        assert!(stderr.contains(problem), "missing `{problem}` in: {stderr}");
    }
    assert!(!stderr.contains("too-short"), "a secret must never be printed");
}
