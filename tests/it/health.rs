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
