//! Webhooks end to end: a job's end reaches its endpoints once, signed; failures are
//! retried under the same `webhook-id`, honouring `Retry-After`; a rotated secret
//! signs beside the new one; private addresses are refused at registration and at
//! delivery; a delivery process killed mid-retry loses nothing and repeats nothing
//! after a recorded 2xx; a thousand jobs ending at once are each delivered once with
//! the endpoint's concurrency bounded. (tests/webhooks/ verifies the same deliveries
//! with the spec's reference library.)

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{db, domain::JobStatus, job::JobOptions, webhooks::signing};
use poem::{http::StatusCode as PoemStatus, listener::TcpListener as PoemListener, Response as PoemResponse};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    batches::{create_batch, hello, line, upload_ok, wait_for_end},
    processes::ultra_command,
    support::{fields, problem, Options, TestApp, PATIENCE},
};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    /// Answers to give, in order (status, `Retry-After`); then 200.
    answers: Mutex<VecDeque<(u16, Option<u64>)>>,
    delay: Duration,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// A webhook receiver on a free local port: records every request and answers as
/// told. Stops with its token.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start(answers: &[(u16, Option<u64>)], delay: Duration) -> Self {
        let state = Arc::new(ReceiverState {
            answers: Mutex::new(answers.iter().copied().collect()),
            delay,
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        drop(listener);
        let handler = {
            let state = state.clone();
            poem::endpoint::make(move |request: poem::Request| {
                let state = state.clone();
                async move { receive(&state, request).await }
            })
        };
        let stop = CancellationToken::new();
        let server = poem::Server::new(PoemListener::bind(format!("127.0.0.1:{port}")));
        let stopped = stop.clone();
        tokio::spawn(async move { server.run_with_graceful_shutdown(handler, stopped.cancelled_owned(), None).await });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "receiver did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { url, state, stop }
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    async fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(Instant::now() < deadline, "{} of {count} deliveries arrived", received.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn receive(state: &ReceiverState, mut request: poem::Request) -> PoemResponse {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let header = |name: &str| request.header(name).unwrap_or_default().to_owned();
    let (id, timestamp, signature) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let path = request.uri().path().to_owned();
    let body = request.take_body().into_string().await.unwrap_or_default();
    tokio::time::sleep(state.delay).await;
    let answer = state.answers.lock().expect("lock").pop_front();
    state.received.lock().expect("lock").push(Received { path, id, timestamp, signature, body, at: Instant::now() });
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let (status, retry_after) = answer.unwrap_or((200, None));
    let mut response = PoemResponse::builder().status(PoemStatus::from_u16(status).unwrap_or(PoemStatus::OK));
    if let Some(seconds) = retry_after {
        response = response.header("retry-after", seconds.to_string());
    }
    response.body("ok")
}

/// Whether one of the space-separated signatures is `secret`'s over the request.
fn signed_by(received: &Received, secret: &str) -> bool {
    let timestamp: i64 = received.timestamp.parse().expect("webhook-timestamp is seconds");
    let expected = signing::sign(secret, &received.id, timestamp, &received.body).expect("sign");
    received.signature.split(' ').any(|s| s == expected)
}

fn webhook_app() -> Options {
    Options { webhook_allow_private: true, mock_latency_ms: 0, ..Default::default() }
}

/// Registers an endpoint; its id and secret.
async fn register(app: &TestApp, key: &str, body: Value) -> (Uuid, String) {
    let response = app.http.post(app.url("/v1/webhooks")).bearer_auth(key).json(&body).send().await.expect("POST");
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.expect("JSON");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    (created["id"].as_str().and_then(|id| id.parse().ok()).expect("id"), secret)
}

async fn deliveries(app: &TestApp, key: &str, endpoint: Uuid) -> Vec<Value> {
    let page: Value = app.get(key, &format!("/v1/webhooks/{endpoint}/deliveries")).await.json().await.expect("JSON");
    page["deliveries"].as_array().cloned().unwrap_or_default()
}

/// Polls the endpoint's deliveries until each has ended.
async fn wait_for_deliveries_to_end(app: &TestApp, key: &str, endpoint: Uuid, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let listed = deliveries(app, key, endpoint).await;
        if listed.len() == count && listed.iter().all(|d| d["status"] != "pending") {
            return listed;
        }
        assert!(Instant::now() < deadline, "deliveries did not end: {listed:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ping(app: &TestApp, key: &str, endpoint: Uuid) -> reqwest::Response {
    app.http.post(app.url(&format!("/v1/webhooks/{endpoint}/test"))).bearer_auth(key).send().await.expect("POST")
}

#[tokio::test]
async fn a_jobs_end_reaches_its_endpoint_and_its_one_off_url_once_each_signed() {
    let app = TestApp::spawn_with(webhook_app()).await;
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    let (_, key) = app.user_with_key().await;
    // Without an endpoint to sign with, a one-off URL is refused.
    let job = json!({ "prompt": "Hi", "models": ["mock/alpha"], "options": { "webhook_url": format!("{}/one-off", receiver.url) } });
    let refused = problem(app.submit(&key, &job).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&refused), ["options.webhook_url"]);

    let (endpoint, secret) = register(&app, &key, json!({ "url": format!("{}/endpoint", receiver.url) })).await;
    let response = app.submit(&key, &job).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id: Uuid =
        response.json::<Value>().await.expect("JSON")["id"].as_str().and_then(|s| s.parse().ok()).expect("id");
    assert_eq!(app.wait_for_terminal(&key, id).await["status"], "succeeded");

    let received = receiver.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 2, "one delivery each, no repeat: {:#?}", receiver.received());
    let mut paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/endpoint", "/one-off"]);
    assert_ne!(received[0].id, received[1].id, "each delivery has its own webhook-id");
    for delivery in &received {
        assert!(signed_by(delivery, &secret), "{delivery:?} is not signed with the endpoint's secret");
        let body: Value = serde_json::from_str(&delivery.body).expect("JSON body");
        assert_eq!(body["type"], "job.succeeded");
        assert_eq!(body["data"]["id"], id.to_string());
        assert_eq!(body["data"]["status"], "succeeded");
        assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
    }
    let listed = wait_for_deliveries_to_end(&app, &key, endpoint, 2).await;
    for delivery in &listed {
        assert_eq!((delivery["status"].as_str(), delivery["attempts"].as_i64()), (Some("succeeded"), Some(1)));
        assert_eq!(delivery["last_status_code"], 200);
        assert!(delivery["last_latency_ms"].as_i64().is_some());
        assert!(received.iter().any(|r| delivery["message_id"] == r.id.as_str()), "{delivery}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_message_again_after_its_retry_after() {
    let options = Options { webhook_retry_schedule: Some("100ms,100ms,100ms".into()), ..webhook_app() };
    let app = TestApp::spawn_with(options).await;
    let receiver = Receiver::start(&[(503, Some(1)), (500, None)], Duration::ZERO).await;
    let (_, key) = app.user_with_key().await;
    let (endpoint, _) = register(&app, &key, json!({ "url": receiver.url, "events": ["job.failed"] })).await;

    assert_eq!(ping(&app, &key, endpoint).await.status(), StatusCode::ACCEPTED);
    let received = receiver.wait_for(3).await;
    assert!(received.iter().all(|r| r.id == received[0].id), "webhook-id changes across attempts: {received:#?}");
    let waits = [received[1].at - received[0].at, received[2].at - received[1].at];
    assert!(waits[0] >= Duration::from_millis(950), "Retry-After: 1 was not honoured: {waits:?}");
    assert!(waits[1] < Duration::from_millis(900), "the schedule's 100 ms became {:?}", waits[1]);
    let listed = wait_for_deliveries_to_end(&app, &key, endpoint, 1).await;
    assert_eq!((listed[0]["status"].as_str(), listed[0]["attempts"].as_i64()), (Some("succeeded"), Some(3)));
    assert_eq!(listed[0]["event_type"], "webhook.test");
    app.stop().await;
}

#[tokio::test]
async fn an_endpoint_failing_too_long_is_disabled_and_its_owner_can_resume_it() {
    let options =
        Options { webhook_retry_schedule: Some("50ms".into()), webhook_disable_after_secs: Some(1), ..webhook_app() };
    let app = TestApp::spawn_with(options).await;
    let receiver = Receiver::start(&[(500, None); 3], Duration::ZERO).await;
    let (_, key) = app.user_with_key().await;
    let (endpoint, _) = register(&app, &key, json!({ "url": receiver.url })).await;

    // Two attempts, both refused: the delivery has failed; the endpoint is failing.
    ping(&app, &key, endpoint).await;
    let listed = wait_for_deliveries_to_end(&app, &key, endpoint, 1).await;
    assert_eq!((listed[0]["status"].as_str(), listed[0]["attempts"].as_i64()), (Some("failed"), Some(2)));
    assert_eq!(listed[0]["last_status_code"], 500);
    assert!(listed[0]["last_error"].as_str().is_some_and(|e| e.contains("HTTP 500")), "{}", listed[0]);
    let view: Value = app.get(&key, &format!("/v1/webhooks/{endpoint}")).await.json().await.expect("JSON");
    assert_eq!(view["enabled"], true);
    assert!(view["failing_since"].is_string(), "{view}");

    // Still failing more than a second later: disabled, with the reason.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ping(&app, &key, endpoint).await;
    wait_for_deliveries_to_end(&app, &key, endpoint, 2).await;
    let view: Value = app.get(&key, &format!("/v1/webhooks/{endpoint}")).await.json().await.expect("JSON");
    assert_eq!(view["enabled"], false, "{view}");
    assert!(view["disabled_reason"].as_str().is_some_and(|r| r.contains("failed since")), "{view}");
    let failed = listed[0]["id"].as_str().expect("id").to_owned();
    let retry = format!("/v1/webhooks/{endpoint}/deliveries/{failed}/retry");
    let response = app.http.post(app.url(&retry)).bearer_auth(&key).send().await.expect("POST");
    problem(response, StatusCode::CONFLICT).await;
    problem(ping(&app, &key, endpoint).await, StatusCode::CONFLICT).await;

    // Enabled again, the failed delivery is sent again from the start of its schedule.
    let patch = app.http.patch(app.url(&format!("/v1/webhooks/{endpoint}"))).bearer_auth(&key);
    let view: Value = patch.json(&json!({ "enabled": true })).send().await.expect("PATCH").json().await.expect("JSON");
    assert_eq!((view["enabled"].as_bool(), view["failing_since"].is_null()), (Some(true), true), "{view}");
    let response = app.http.post(app.url(&retry)).bearer_auth(&key).send().await.expect("POST");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let listed = deliveries(&app, &key, endpoint).await;
        let retried = listed.iter().find(|d| d["id"] == failed.as_str()).expect("the retried delivery");
        if retried["status"] == "succeeded" {
            assert_eq!(retried["attempts"], 1, "{retried}");
            break;
        }
        assert!(Instant::now() < deadline, "the retried delivery did not succeed: {retried}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn during_a_rotations_grace_both_secrets_sign() {
    let app = TestApp::spawn_with(webhook_app()).await;
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    let (_, key) = app.user_with_key().await;
    let (endpoint, old) = register(&app, &key, json!({ "url": receiver.url })).await;
    let rotate = app.url(&format!("/v1/webhooks/{endpoint}/rotate-secret"));
    let rotated: Value =
        app.http.post(rotate).bearer_auth(&key).send().await.expect("POST").json().await.expect("JSON");
    let new = rotated["secret"].as_str().expect("secret").to_owned();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_expires_at"].is_string(), "{rotated}");

    ping(&app, &key, endpoint).await;
    let received = receiver.wait_for(1).await;
    assert_eq!(received[0].signature.split(' ').count(), 2, "{:?}", received[0].signature);
    assert!(signed_by(&received[0], &new), "not signed with the new secret");
    assert!(signed_by(&received[0], &old), "not signed with the previous secret during its grace");
    assert!(!signed_by(&received[0], &signing::new_secret()), "any secret verifies");
    app.stop().await;
}

#[tokio::test]
async fn urls_that_reach_the_private_network_are_refused_at_registration_and_at_delivery() {
    let app = TestApp::spawn_with(Options { mock_latency_ms: 0, ..Default::default() }).await;
    let (user, key) = app.user_with_key().await;
    for url in [
        "http://127.0.0.1:9000/hook",
        "http://localhost:9000/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/hook",
        "http://[::ffff:192.168.0.1]/hook",
        "ftp://hooks.example.com/",
    ] {
        let response = app.http.post(app.url("/v1/webhooks")).bearer_auth(&key).json(&json!({ "url": url }));
        let refused = problem(response.send().await.expect("POST"), StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&refused), ["url"], "{url}: {refused}");
    }
    let job = json!({ "prompt": "Hi", "models": ["mock/alpha"], "options": { "webhook_url": "http://10.0.0.1/x" } });
    let refused = problem(app.submit(&key, &job).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&refused), ["options.webhook_url"]);

    // A URL that passed once (written here directly) is checked again at every attempt.
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    let new =
        db::webhooks::NewEndpoint { user_id: user, url: &receiver.url, events: None, secret: &signing::new_secret() };
    let endpoint = db::webhooks::create(&app.pool, &new).await.expect("endpoint").id;
    ping(&app, &key, endpoint).await;
    let deadline = Instant::now() + PATIENCE;
    let delivery = loop {
        let listed = deliveries(&app, &key, endpoint).await;
        if listed
            .first()
            .is_some_and(|d| d["attempts"].as_i64() >= Some(1) && !d["in_flight"].as_bool().unwrap_or(true))
        {
            break listed[0].clone();
        }
        assert!(Instant::now() < deadline, "no attempt: {listed:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(delivery["last_error"].as_str().is_some_and(|e| e.contains("not a public address")), "{delivery}");
    assert!(delivery["last_status_code"].is_null());
    assert!(receiver.received().is_empty(), "a private address was called");
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_process_killed_mid_retry_loses_nothing_and_repeats_nothing_after_a_2xx() {
    let options = Options { worker: false, webhook_retry_schedule: Some("2s,2s".into()), ..webhook_app() };
    let app = TestApp::spawn_with(options).await;
    let receiver = Receiver::start(&[(500, None)], Duration::ZERO).await;
    let (_, key) = app.user_with_key().await;
    let (endpoint, secret) = register(&app, &key, json!({ "url": receiver.url })).await;
    let spawn = || {
        let mut command = ultra_command(&app, &["worker", "--concurrency", "2"]);
        command.env("ULTRA_WORKER_LISTEN", "127.0.0.1:0").env("ULTRA_MOCK_LATENCY_MS", "0");
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().expect("ultra worker")
    };
    let mut first = spawn();
    let job = app.submit_ok(&key, &["mock/alpha"]).await;
    assert_eq!(app.wait_for_terminal(&key, job).await["status"], "succeeded");

    // The first attempt was refused; the retry waits. Kill the process now.
    receiver.wait_for(1).await;
    let deadline = Instant::now() + PATIENCE;
    while deliveries(&app, &key, endpoint).await.first().is_none_or(|d| d["in_flight"] != false) {
        assert!(Instant::now() < deadline, "the refused attempt was not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = first.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().expect("kill").success());
    first.wait().await.expect("killed");

    let mut second = spawn();
    let listed = wait_for_deliveries_to_end(&app, &key, endpoint, 1).await;
    assert_eq!((listed[0]["status"].as_str(), listed[0]["attempts"].as_i64()), (Some("succeeded"), Some(2)));
    // Long enough for a third attempt, had the success not been recorded.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let received = receiver.received();
    assert_eq!(received.len(), 2, "{received:#?}");
    assert_eq!(received[0].id, received[1].id);
    assert!(received.iter().all(|r| signed_by(r, &secret)));
    let body: Value = serde_json::from_str(&received[1].body).expect("JSON");
    assert_eq!(body["data"]["id"], job.to_string());

    let pid = second.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    tokio::time::timeout(PATIENCE, second.wait()).await.expect("worker exits on SIGTERM").expect("wait");
    app.stop().await;
}

#[tokio::test]
async fn a_thousand_jobs_ending_at_once_are_each_delivered_once_within_the_endpoints_concurrency() {
    const JOBS: usize = 1_000;
    const CONCURRENCY: u32 = 8;
    let options = Options { webhook_endpoint_concurrency: Some(CONCURRENCY), ..webhook_app() };
    let app = TestApp::spawn_with(options).await;
    let receiver = Receiver::start(&[], Duration::from_millis(5)).await;
    let (user, key) = app.user_with_key().await;
    register(&app, &key, json!({ "url": receiver.url, "events": ["job.succeeded"] })).await;

    // Running jobs, ended together as workers end them: each end writes its delivery.
    let models = vec!["mock/alpha".to_owned()];
    let options = JobOptions::default();
    let mut ids = Vec::with_capacity(JOBS);
    let mut tx = app.pool.begin().await.expect("begin");
    for _ in 0..JOBS {
        let id = Uuid::now_v7();
        let job = db::jobs::NewJob {
            id,
            user_id: user,
            pattern: "direct",
            prompt: "Hi",
            models: &models,
            options: &options,
            chat: None,
            batch_id: None,
            reserved_tokens: 0,
            reserved_day: None,
            timeout_secs: 600,
        };
        testkit::jobs::insert(&mut tx, &job).await.expect("insert job");
        ids.push(id);
    }
    tx.commit().await.expect("commit");
    let started = Instant::now();
    let ended: Vec<_> = futures::future::join_all(ids.chunks(JOBS / 10).map(|chunk| {
        let pool = app.pool.clone();
        let chunk = chunk.to_vec();
        async move {
            for id in chunk {
                db::jobs::finish(&pool, id, JobStatus::Succeeded, None, None).await.expect("finish").expect("ended");
            }
        }
    }))
    .await;
    assert_eq!(ended.len(), 10);
    let ending = started.elapsed();

    let received = receiver.wait_for(JOBS).await;
    let delivered = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received_total = receiver.received().len();
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for r in &received {
        let body: Value = serde_json::from_str(&r.body).expect("JSON");
        *per_job.entry(body["data"]["id"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    assert_eq!(received_total, JOBS, "some deliveries arrived twice");
    assert_eq!(per_job.len(), JOBS, "some jobs were not delivered");
    assert!(ids.iter().all(|id| per_job.get(&id.to_string()) == Some(&1)));
    let most = receiver.state.most_in_flight.load(Ordering::SeqCst);
    assert!(most <= CONCURRENCY as usize, "{most} deliveries in flight to one endpoint at once");
    assert!(most > 1, "deliveries were sent one at a time");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status <> 'succeeded'")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(pending, 0);
    eprintln!(
        "webhooks: {JOBS} jobs ended in {ending:?}; all delivered after {delivered:?}, at most {most} in flight \
         (limit {CONCURRENCY})"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_batch_tells_its_end_once_and_its_lines_tell_nothing() {
    let app = TestApp::spawn_with(webhook_app()).await;
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    let (_, key) = app.user_with_key().await;
    let (_, secret) = register(&app, &key, json!({ "url": receiver.url })).await;
    let lines: Vec<String> = (0..3).map(|i| line(&format!("q{i}"), hello("mock/alpha", "Hi"))).collect();
    let created = create_batch(&app, &key, &upload_ok(&app, &key, &lines).await).await;
    let id = created["id"].as_str().expect("id");
    assert_eq!(wait_for_end(&app, &key, id).await["status"], "completed");
    // Refused whole at creation: it ends at once, and says so too.
    let refused = create_batch(&app, &key, &upload_ok(&app, &key, &["{ not json".to_owned()]).await).await;
    assert_eq!(refused["status"], "failed");

    let received = receiver.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bodies: Vec<Value> = receiver.received().iter().map(|r| serde_json::from_str(&r.body).expect("JSON")).collect();
    assert_eq!(bodies.len(), 2, "one delivery per batch, none per line: {bodies:#?}");
    let ended = bodies.iter().find(|b| b["type"] == "batch.completed").expect("batch.completed");
    assert_eq!(ended["data"]["id"], id);
    assert_eq!(ended["data"]["status"], "completed");
    assert_eq!(ended["data"]["request_counts"], json!({ "total": 3, "completed": 3, "failed": 0 }));
    let failed = bodies.iter().find(|b| b["type"] == "batch.failed").expect("batch.failed");
    assert_eq!(failed["data"]["id"], refused["id"]);
    assert!(received.iter().all(|r| signed_by(r, &secret)));
    app.stop().await;
}

#[tokio::test]
async fn concurrent_registrations_stop_at_the_limit_of_twenty() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let attempts = (0..25).map(|i| {
        let body = json!({ "url": format!("https://hooks.example.com/{i}") });
        app.http.post(app.url("/v1/webhooks")).bearer_auth(&key).json(&body).send()
    });
    let statuses: Vec<StatusCode> =
        futures::future::join_all(attempts).await.into_iter().map(|r| r.expect("POST").status()).collect();
    let created = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count();
    assert_eq!((created, refused), (20, 5), "{statuses:?}");
    let listed: Value = app.get(&key, "/v1/webhooks").await.json().await.expect("JSON");
    assert_eq!(listed["webhooks"].as_array().map(Vec::len), Some(20));
    app.stop().await;
}
