//! Cancelling jobs: queued ones never start, running ones stop within a second.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::{
    sse::SseReader,
    support::{problem, Options, TestApp, PATIENCE},
};

async fn cancel(app: &TestApp, key: &str, id: uuid::Uuid) -> reqwest::Response {
    app.http.post(app.url(&format!("/v1/jobs/{id}/cancel"))).bearer_auth(key).send().await.expect("cancel")
}

#[tokio::test]
async fn a_queued_job_is_cancelled_at_once_and_never_starts() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let (_, other) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha"]).await;

    problem(cancel(&app, &other, id).await, StatusCode::NOT_FOUND).await;
    let response = cancel(&app, &key, id).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.expect("JSON")["status"], "cancelled");
    let job = app.job(&key, id).await;
    assert_eq!((job["status"].as_str(), job["error"]["code"].as_str()), (Some("cancelled"), Some("cancelled")));
    let events = SseReader::new(app.events(&key, id, None).await).collect_events().await;
    let kinds: Vec<_> = events.iter().filter_map(|e| e.event.clone()).collect();
    assert_eq!(kinds, ["queued", "cancelled"]);
    problem(cancel(&app, &key, id).await, StatusCode::CONFLICT).await;
    let me: Value = app.get(&key, "/v1/me").await.json().await.expect("JSON");
    assert_eq!(me["usage"]["reserved_tokens"], 0, "the budget reservation is released");
    app.stop().await;
}

#[tokio::test]
async fn a_running_job_stops_within_a_second_keeping_what_is_done() {
    let app = TestApp::spawn_with(Options { mock_latency_ms: 20_000, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let id = app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await;
    let deadline = Instant::now() + PATIENCE;
    while app.job(&key, id).await["steps"].as_array().map_or(0, Vec::len) < 2 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let asked = Instant::now();
    let response = cancel(&app, &key, id).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job = app.wait_for_terminal(&key, id).await;
    assert!(asked.elapsed() < Duration::from_secs(2), "took {:?}", asked.elapsed());
    assert_eq!(job["status"], "cancelled");
    let steps = job["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "steps are kept");
    assert!(steps.iter().all(|s| s["status"] == "failed" && s["error"]["code"] == "cancelled"));
    let events = SseReader::new(app.events(&key, id, None).await).collect_events().await;
    assert_eq!(events.last().and_then(|e| e.event.as_deref()), Some("cancelled"));
    problem(cancel(&app, &key, id).await, StatusCode::CONFLICT).await;
    app.stop().await;
}

#[tokio::test]
async fn a_job_past_its_deadline_fails_and_its_calls_are_aborted() {
    let app = TestApp::spawn_with(Options { mock_latency_ms: 20_000, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let body = serde_json::json!({ "prompt": "hi", "models": ["mock/alpha"], "options": { "timeout_s": 1 } });
    let response = app.submit(&key, &body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");
    let started = Instant::now();
    let job = app.wait_for_terminal(&key, id).await;
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!((job["status"].as_str(), job["error"]["code"].as_str()), (Some("failed"), Some("deadline_exceeded")));
    assert_eq!(job["steps"][0]["error"]["code"], "deadline_exceeded");

    let zero = serde_json::json!({ "prompt": "hi", "models": ["mock/alpha"], "options": { "timeout_s": 0 } });
    problem(app.submit(&key, &zero).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    app.stop().await;
}
