//! Operations: Prometheus metrics on the api, the admin view of the queues, and the
//! W3C trace context carried from a submit into the job's message.

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{problem, Options, TestApp};

async fn metrics_text(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let request = app.http.get(app.url("/metrics"));
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    request.send().await.expect("GET /metrics")
}

async fn make_admin(app: &TestApp, user_id: Uuid) {
    sqlx::query("UPDATE users SET role = 'admin' WHERE id = $1").bind(user_id).execute(&app.pool).await.expect("admin");
}

/// A pattern only this test uses, so its counts are exact even though every test in
/// this binary shares one metrics recorder.
const PROBE_PATTERN: &str = "[patterns.metrics_probe]\ndescription = \"Counted by the metrics test.\"\n";

#[tokio::test]
async fn metrics_label_requests_by_route_template_and_count_jobs_and_steps() {
    let app = TestApp::spawn_with(Options { config_toml: Some(PROBE_PATTERN.to_owned()), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let body = json!({ "prompt": "Count me", "models": ["mock/alpha"], "pattern": "metrics_probe" });
    let accepted: Value = app.submit(&key, &body).await.json().await.expect("json");
    let id: Uuid = accepted["id"].as_str().and_then(|s| s.parse().ok()).expect("job id");
    assert_eq!(app.wait_for_terminal(&key, id).await["status"], "succeeded");
    let unknown = Uuid::now_v7();
    assert_eq!(app.get(&key, &format!("/v1/jobs/{unknown}")).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.get(&key, "/no/such/route").await.status(), StatusCode::NOT_FOUND);

    let response = metrics_text(&app, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/plain"));
    let text = response.text().await.expect("body");
    for expected in [
        r#"ultra_http_requests_total{method="GET",route="/v1/jobs/{id}",status="404"}"#,
        r#"ultra_http_requests_total{method="POST",route="/v1/analyze",status="202"}"#,
        r#"ultra_http_requests_total{method="GET",route="unmatched",status="404"}"#,
        r#"ultra_http_request_duration_seconds_bucket{method="POST",route="/v1/analyze",le="0.5"}"#,
        r#"ultra_jobs_submitted_total{pattern="metrics_probe"} 1"#,
        r#"ultra_jobs_finished_total{pattern="metrics_probe",status="succeeded"} 1"#,
        r#"ultra_job_duration_seconds_count{pattern="metrics_probe",status="succeeded"} 1"#,
        r#"ultra_step_duration_seconds_bucket{stage="initial",model="mock/alpha",provider="mock",outcome="succeeded""#,
        r#"ultra_tokens_total{model="mock/alpha",provider="mock",direction="output"}"#,
        "# TYPE ultra_job_duration_seconds histogram",
        "ultra_outbox_backlog ",
        &format!(r#"ultra_queue_messages{{queue="{}ultra.analyze",role="work"}}"#, app.config.queue_prefix),
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
    // Ids never become labels: not the job's, not the unknown one's.
    assert!(!text.contains(&id.to_string()) && !text.contains(&unknown.to_string()));
    assert!(!text.contains("/no/such/route"));
    app.stop().await;
}

#[tokio::test]
async fn a_metrics_token_is_required_when_configured() {
    let token = "scrape-token-0123456789";
    let app = TestApp::spawn_with(Options { metrics_token: Some(token.to_owned()), ..Default::default() }).await;
    problem(metrics_text(&app, None).await, StatusCode::UNAUTHORIZED).await;
    problem(metrics_text(&app, Some("scrape-token-wrong")).await, StatusCode::UNAUTHORIZED).await;
    let response = metrics_text(&app, Some(token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.expect("body").contains("ultra_http_requests_total"));
    app.stop().await;
}

#[tokio::test]
async fn admins_see_queue_depth_consumers_and_backlog() {
    // No worker: submitted jobs wait in the work queue.
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (admin_id, admin_key) = app.user_with_key().await;
    make_admin(&app, admin_id).await;
    let (_, key) = app.user_with_key().await;
    for _ in 0..3 {
        app.submit_ok(&key, &["mock/alpha"]).await;
    }

    problem(app.get(&key, "/v1/admin/queues").await, StatusCode::FORBIDDEN).await;
    // The broker counts a publish a moment after confirming it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let view: Value = loop {
        let response = app.get(&admin_key, "/v1/admin/queues").await;
        assert_eq!(response.status(), StatusCode::OK);
        let view: Value = response.json().await.expect("json");
        let work = view["queues"].as_array().and_then(|q| q.iter().find(|q| q["role"] == "work")).cloned();
        if work.is_some_and(|w| w["messages"] == 3) || tokio::time::Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let queues = view["queues"].as_array().expect("queues");
    let work = queues.iter().find(|q| q["role"] == "work").expect("work queue");
    assert_eq!(work["name"], format!("{}ultra.analyze", app.config.queue_prefix));
    assert_eq!((work["messages"].as_u64(), work["consumers"].as_u64()), (Some(3), Some(0)), "{view}");
    assert_eq!(queues.iter().filter(|q| q["role"] == "delay").count(), 4, "{view}");
    assert!(queues.iter().any(|q| q["role"] == "dead_letter"), "{view}");
    assert_eq!((view["jobs_queued"].as_i64(), view["jobs_running"].as_i64()), (Some(3), Some(0)), "{view}");
    assert_eq!(view["outbox_backlog"], 0, "{view}");
    assert_eq!(view["dead_lettered_jobs"], 0, "{view}");
    assert!(view.get("broker_error").is_none(), "{view}");
    app.stop().await;
}

#[tokio::test]
async fn a_submit_continues_the_callers_trace_into_the_job_message() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = app.submit_traced(&key, &json!({ "prompt": "trace me", "models": ["mock/alpha"] }), caller).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(response.headers().contains_key("x-request-id"));

    let connection = common::queue::connect(&app.config.amqp_url, "trace-test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let queue = format!("{}ultra.analyze", app.config.queue_prefix);
    let mut consumer = common::queue::consume(&channel, &queue).await.expect("consume");
    let delivery = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next())
        .await
        .expect("a message")
        .expect("stream open")
        .expect("delivery");
    let headers = delivery.properties.headers().clone().expect("headers");
    let traceparent = headers.inner().get("traceparent").and_then(|v| v.as_long_string()).expect("traceparent");
    let traceparent = traceparent.to_string();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c", "the caller's trace continues");
    assert_ne!(parts[2], "b7ad6b7169203331", "the api's own span is the parent, not the caller's");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}
