//! Readiness reports each dependency; only PostgreSQL being down makes the api unready.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Options, TestApp};

async fn readiness(app: &TestApp) -> (StatusCode, Value) {
    let response = app.http.get(app.url("/health/ready")).send().await.expect("ready");
    (response.status(), response.json().await.expect("JSON"))
}

#[tokio::test]
async fn all_dependencies_up_is_ok() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok", "{body}");
    for check in ["postgres", "rabbitmq", "redis"] {
        assert_eq!(body["checks"][check]["status"], "ok");
        assert!(body["checks"][check]["latency_ms"].is_u64());
    }
    let live: Value = app.http.get(app.url("/health/live")).send().await.expect("live").json().await.expect("JSON");
    assert_eq!(live["status"], "ok");
    app.stop().await;
}

#[tokio::test]
async fn rabbitmq_down_is_degraded_and_jobs_are_still_accepted() {
    let closed = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let app = TestApp::spawn_with(Options { worker: false, amqp_url: Some(closed), ..Default::default() }).await;
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["rabbitmq"]["status"], "down");
    assert_eq!(body["checks"]["postgres"]["status"], "ok");

    // Accepted into the outbox: it is published when the broker returns.
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    assert_eq!(app.count("SELECT count(*) FROM outbox WHERE job_id = $1", id).await, 1);
    assert_eq!(app.job(&key, id).await["status"], "queued");
    app.stop().await;
}

#[tokio::test]
async fn redis_down_is_degraded_and_jobs_still_run() {
    let closed = "redis://127.0.0.1:1".to_owned();
    let app = TestApp::spawn_with(Options { redis_url: Some(closed), ..Default::default() }).await;
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["redis"]["status"], "down");

    // Without live fan-out, streams read PostgreSQL: slower, still complete.
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    let events = crate::sse::SseReader::new(app.events(&key, id, None).await).collect_events().await;
    assert_eq!(events.last().and_then(|e| e.event.as_deref()), Some("succeeded"));
    assert_eq!(events.len(), 5);
    app.stop().await;
}

#[tokio::test]
async fn postgres_down_is_down_and_requests_get_503_not_500() {
    let app = TestApp::spawn_with(Options { proxied: true, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let postgres = &app.proxies.as_ref().expect("proxied").postgres;

    postgres.cut();
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "down", "{body}");
    assert_eq!(body["checks"]["postgres"]["status"], "down");
    let refused = app.submit(&key, &serde_json::json!({ "prompt": "hi", "models": ["mock/alpha"] })).await;
    assert_eq!(refused.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"2"[..]), "a client is told when");
    crate::support::problem(refused, StatusCode::SERVICE_UNAVAILABLE).await;

    // Back again: the pool replaces its dead connections without a restart.
    postgres.restore();
    let id = app.submit_ok(&key, &["mock/alpha"]).await;
    assert_eq!(app.wait_for_terminal(&key, id).await["status"], "succeeded");
    assert_eq!(readiness(&app).await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn streams_survive_losing_redis_mid_job() {
    let app = TestApp::spawn_with(Options { proxied: true, mock_latency_ms: 1_500, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let redis = &app.proxies.as_ref().expect("proxied").redis;
    let id = app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await;
    let mut reader = crate::sse::SseReader::new(app.events(&key, id, None).await);
    let mut ids = Vec::new();
    // Lifecycle events only: tokens carry no id (and may be lost with Redis).
    while ids.len() < 2 {
        if let Some(crate::sse::Frame::Event(event)) = reader.next_frame().await {
            ids.extend(event.id.and_then(|i| i.parse::<i64>().ok()));
        }
    }
    // Live fan-out dies while the models are still answering.
    redis.cut();
    while let Some(frame) = reader.next_frame().await {
        if let crate::sse::Frame::Event(event) = frame {
            ids.extend(event.id.and_then(|i| i.parse::<i64>().ok()));
        }
    }
    assert_eq!(ids, (1..=7).collect::<Vec<_>>(), "every event, once, in order");
    let (_, body) = readiness(&app).await;
    assert_eq!(body["checks"]["redis"]["status"], "down");
    app.stop().await;
}

#[tokio::test]
async fn every_response_names_its_request() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let given = app.http.get(app.url("/health/live")).header("x-request-id", "trace-me-42").send().await.expect("live");
    assert_eq!(given.headers()["x-request-id"], "trace-me-42");
    let generated = app.http.get(app.url("/v1/nope")).send().await.expect("404");
    let id = generated.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let refused =
        app.http.get(app.url("/health/live")).header("x-request-id", "x".repeat(500)).send().await.expect("live");
    assert_ne!(refused.headers()["x-request-id"], "x".repeat(500).as_str(), "an unreasonable id is replaced");
    app.stop().await;
}
