//! Separate `ultra worker` processes share one queue, and an SSE subscriber on the
//! api sees events that workers in other processes publish.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::support::{Options, TestApp, PATIENCE};

pub(crate) struct WorkerProcess {
    pub(crate) child: Child,
    health: String,
    log: tokio::task::JoinHandle<Vec<String>>,
}

async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address").port()
}

async fn spawn_worker(app: &TestApp) -> WorkerProcess {
    spawn_worker_with(app, 1).await
}

/// `ultra <args>` on the app's database, broker names and Redis prefix, and nothing
/// else from this environment.
pub(crate) fn ultra_command(app: &TestApp, args: &[&str]) -> Command {
    let config = &app.config;
    let mut command = Command::new(env!("CARGO_BIN_EXE_ultra"));
    command.env_clear();
    if let Some(file) = &config.config_file {
        command.env("ULTRA_CONFIG_FILE", file);
    }
    command
        .args(args)
        .env("DATABASE_URL", &config.database_url)
        .env("AMQP_URL", &config.amqp_url)
        .env("REDIS_URL", &config.redis_url)
        .env("ULTRA_QUEUE_PREFIX", &config.queue_prefix)
        .env("ULTRA_REDIS_PREFIX", &config.redis_prefix)
        .env("ULTRA_WEBHOOK_ALLOW_PRIVATE", config.webhook_allow_private.to_string())
        .env("ULTRA_WEBHOOK_RETRY_SCHEDULE", &config.webhook_retry_schedule)
        .env("ULTRA_LOG_FORMAT", "json")
        .kill_on_drop(true);
    command
}

pub(crate) async fn spawn_worker_with(app: &TestApp, concurrency: u16) -> WorkerProcess {
    let port = free_port().await;
    let mut child = ultra_command(app, &["worker", "--concurrency", &concurrency.to_string()])
        .env("ULTRA_WORKER_LISTEN", format!("127.0.0.1:{port}"))
        .env("ULTRA_MOCK_LATENCY_MS", "200")
        // Debug for the worker's own lines, so a prompt logged at debug would show.
        .env("RUST_LOG", "info,ultra_worker=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
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

pub(crate) async fn wait_ready(app: &TestApp, worker: &WorkerProcess) {
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
pub(crate) async fn terminate(mut worker: WorkerProcess) -> (std::process::ExitStatus, Vec<String>) {
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
        .env("ULTRA_WEBHOOK_ALLOW_PRIVATE", "true")
        .env("ULTRA_LOG_FORMAT", "json")
        .output()
        .await
        .expect("run ultra");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for problem in [
        "guest credentials",
        "DATABASE_URL has no password",
        "mock provider",
        "shorter than 32 bytes",
        "any origin",
        "ULTRA_METRICS_TOKEN",
        "ULTRA_WEBHOOK_ALLOW_PRIVATE",
    ] {
        assert!(stderr.contains(problem), "missing `{problem}` in: {stderr}");
    }
    assert!(!stderr.contains("too-short"), "a secret must never be printed");
}

/// The chaos test of the delivery guarantees: three worker processes share 200 jobs
/// while one of them is SIGKILLed and restarted every second or two, and once all
/// of the app's broker connections are closed under it. Every job must
/// end, once, with every step recorded once — whatever was in flight when a worker
/// died is resumed elsewhere (through redelivery or, once its lease expires, the
/// reaper).
#[tokio::test]
async fn two_hundred_jobs_survive_workers_killed_mid_run() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let mut workers =
        vec![spawn_worker_with(&app, 8).await, spawn_worker_with(&app, 8).await, spawn_worker_with(&app, 8).await];
    for worker in &workers {
        wait_ready(&app, worker).await;
    }
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await);
    }

    let started = std::time::Instant::now();
    let mut kills = 0;
    let unfinished = |app: &TestApp| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')",
            )
            .fetch_one(&pool)
            .await
            .expect("count")
        }
    };
    while unfinished(&app).await > 0 {
        assert!(started.elapsed() < Duration::from_secs(120), "jobs did not drain after {kills} kills");
        if kills == 3 {
            // And once, the operator closes every broker connection of this app.
            let prefix = app.config.queue_prefix.clone();
            tokio::task::spawn_blocking(move || crate::support::close_broker_connections(&prefix))
                .await
                .expect("close");
        }
        if kills < 6 {
            let victim = workers.remove(kills % workers.len());
            let pid = victim.child.id().expect("pid").to_string();
            let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
            drop(victim);
            kills += 1;
            let replacement = spawn_worker_with(&app, 8).await;
            workers.push(replacement);
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }

    // Every job succeeded once, each finished step recorded once, nothing left unpublished.
    let audit = testkit::audit::delivery(&app.pool).await.expect("audit");
    let clean = testkit::audit::DeliveryAudit { jobs: ids.len() as i64, ..Default::default() };
    assert_eq!(audit, clean);
    let completed: i64 = sqlx::query_scalar("SELECT count(*) FROM job_events WHERE kind = 'step.completed'")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(completed, 2 * ids.len() as i64, "every job's two steps recorded");
    for worker in workers {
        let (status, _) = terminate(worker).await;
        assert!(status.success());
    }
    eprintln!("chaos: 200 jobs, {kills} workers killed, drained in {:?}", started.elapsed());
    app.stop().await;
}

/// Checkpoints across a crash: a worker process is SIGKILLed while one of a job's two
/// provider calls is in flight. The job succeeds on another worker, and the provider
/// (a local server that counts its requests) is asked once more only for the call
/// that had not finished.
#[tokio::test]
async fn a_worker_killed_mid_job_costs_only_the_unfinished_call_again() {
    use crate::support::openai_answer as answer;
    use wiremock::{
        matchers::{body_partial_json, method},
        Mock, MockServer,
    };
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(serde_json::json!({ "model": "fast" })))
        .respond_with(answer("quick"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(serde_json::json!({ "model": "slow" })))
        .respond_with(answer("eventually").set_delay(Duration::from_secs(6)))
        .mount(&server)
        .await;
    let catalog = format!(
        "[providers.local]\nkind = \"openai\"\nbase_url = \"{}/v1\"\n\n\
         [[models]]\nid = \"local/fast\"\nprovider = \"local\"\nupstream = \"fast\"\n\n\
         [[models]]\nid = \"local/slow\"\nprovider = \"local\"\nupstream = \"slow\"\n",
        server.uri()
    );
    let app = TestApp::spawn_with(Options { worker: false, config_toml: Some(catalog), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let doomed = spawn_worker(&app).await;
    wait_ready(&app, &doomed).await;
    let id = app.submit_ok(&key, &["local/fast", "local/slow"]).await;

    // Wait until the fast step is recorded and the slow one is in flight (the server
    // has its request: on a busy machine the step may start later), then kill.
    let deadline = std::time::Instant::now() + PATIENCE;
    let slow_in_flight = || async {
        let requests = server.received_requests().await.unwrap_or_default();
        requests.iter().any(|r| String::from_utf8_lossy(&r.body).contains("\"model\":\"slow\""))
    };
    while app.count("SELECT count(*) FROM job_steps WHERE job_id = $1 AND status = 'succeeded'", id).await < 1
        || !slow_in_flight().await
    {
        assert!(std::time::Instant::now() < deadline, "the first step never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = doomed.child.id().expect("pid").to_string();
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    drop(doomed);

    let survivor = spawn_worker(&app).await;
    let job = loop {
        let job = app.job(&key, id).await;
        if job["status"] == "succeeded" || job["status"] == "failed" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline + Duration::from_secs(60), "the job never resumed: {job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    let requests = server.received_requests().await.expect("recorded");
    let calls = |model: &str| {
        requests.iter().filter(|r| String::from_utf8_lossy(&r.body).contains(&format!("\"model\":\"{model}\""))).count()
    };
    assert_eq!(calls("fast"), 1, "the finished step was not called again");
    assert_eq!(calls("slow"), 2, "the call in flight at the crash was made again");
    let (status, _) = terminate(survivor).await;
    assert!(status.success());
    app.stop().await;
}

/// One trace from submit to result: the worker process logs the job's work under the
/// caller's trace id, and serves its own metrics on its health port.
#[tokio::test]
async fn a_worker_process_continues_the_trace_and_serves_its_metrics() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let worker = spawn_worker(&app).await;
    wait_ready(&app, &worker).await;
    let (_, key) = app.user_with_key().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = serde_json::json!({ "prompt": "a secret prompt text", "models": ["mock/alpha"] });
    let response = app.submit_traced(&key, &body, &format!("00-{trace_id}-00f067aa0ba902b7-01")).await;
    let id: uuid::Uuid = response.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("job id");
    assert_eq!(app.wait_for_terminal(&key, id).await["status"], "succeeded");

    let metrics_url = worker.health.replace("/health/ready", "/metrics");
    let text = app.http.get(&metrics_url).send().await.expect("metrics").text().await.expect("body");
    for expected in [
        r#"ultra_jobs_finished_total{pattern="direct",status="succeeded"} 1"#,
        r#"ultra_step_duration_seconds_count{stage="initial",model="mock/alpha",provider="mock",outcome="succeeded"} 1"#,
        r#"ultra_steps_in_flight{provider="mock"} 0"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }

    let (status, log) = terminate(worker).await;
    assert!(status.success());
    let job_lines: Vec<&String> = log.iter().filter(|l| l.contains(&id.to_string())).collect();
    assert!(job_lines.iter().any(|l| l.contains("job finished")), "{log:#?}");
    for line in &job_lines {
        assert!(line.contains(trace_id), "a line of the job's work without its trace id: {line}");
    }
    assert!(!log.iter().any(|l| l.contains("a secret prompt text")), "prompts stay out of logs");
    app.stop().await;
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans go to that collector over OTLP/HTTP,
/// in the caller's trace; they are flushed when the process stops.
#[tokio::test]
async fn spans_are_exported_over_otlp_in_the_callers_trace() {
    use wiremock::{matchers, Mock, MockServer, ResponseTemplate};
    let collector = MockServer::start().await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let port = free_port().await;
    let mut api = ultra_command(&app, &["api"])
        .env("ULTRA_LISTEN", format!("127.0.0.1:{port}"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.uri())
        .env("OTEL_SERVICE_NAME", "ultra-otlp-test")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start `ultra api`");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while app.http.get(format!("{base}/health/live")).send().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "api never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let response = app
        .http
        .get(format!("{base}/v1/models"))
        .header("traceparent", format!("00-{trace_id}-eee19b7ec3c1b174-01"))
        .send()
        .await
        .expect("request");
    assert!(response.status().is_client_error(), "no credentials: refused, but traced");

    let pid = api.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = tokio::time::timeout(PATIENCE, api.wait()).await.expect("api stops").expect("wait");
    assert!(status.success());
    let exports = collector.received_requests().await.expect("recorded");
    assert!(!exports.is_empty(), "no spans were exported");
    let wanted = hex::decode(trace_id).expect("hex");
    let body: Vec<u8> = exports.iter().flat_map(|r| r.body.clone()).collect();
    assert!(body.windows(wanted.len()).any(|w| w == wanted.as_slice()), "the caller's trace id is not in the export");
    assert!(body.windows(15).any(|w| w == b"ultra-otlp-test"), "the service name is not in the export");
    app.stop().await;
}
