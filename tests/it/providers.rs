//! A whole job through the worker against an OpenAI-compatible server (wiremock)
//! instead of the mock: catalog from configuration, streamed answer, usage, cost, and
//! the response cache.

use reqwest::StatusCode;
use serde_json::{json, Value};
use wiremock::{
    matchers::{body_partial_json, method, path},
    Mock, MockServer, ResponseTemplate,
};

use crate::support::{problem, Options, TestApp};

fn catalog(base_url: &str) -> String {
    format!(
        r#"
[providers.local]
kind = "openai"
base_url = "{base_url}/v1"

[[models]]
id = "local/llama"
provider = "local"
upstream = "llama3"
description = "A local OpenAI-compatible server"
input_price_per_mtok = 1.0
output_price_per_mtok = 2.0
context_window = 8192
"#
    )
}

fn answer() -> String {
    let chunks = [
        json!({ "choices": [{ "index": 0, "delta": { "content": "The sky " }, "finish_reason": null }] }),
        json!({ "choices": [{ "index": 0, "delta": { "content": "scatters blue light." }, "finish_reason": "stop" }] }),
        json!({ "choices": [], "usage": { "prompt_tokens": 9, "completion_tokens": 3 } }),
    ];
    let mut body: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    body.push_str("data: [DONE]\n\n");
    body
}

#[tokio::test]
async fn a_job_runs_through_an_openai_compatible_server() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(body_partial_json(json!({ "model": "llama3", "stream": true })))
        .respond_with(
            ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(answer()),
        )
        .mount(&server)
        .await;
    let app = TestApp::spawn_with(Options { config_toml: Some(catalog(&server.uri())), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;

    let catalog: Value = app.get(&key, "/v1/models").await.json().await.expect("JSON");
    assert_eq!(catalog["models"].as_array().map(Vec::len), Some(1), "{catalog}");
    let model = &catalog["models"][0];
    assert_eq!((model["id"].as_str(), model["available"].as_bool()), (Some("local/llama"), Some(true)));
    assert_eq!(model["output_price_per_mtok"], 2.0);
    // With real providers configured, the mock models are gone.
    let refused = app.submit(&key, &json!({ "prompt": "hi", "models": ["mock/alpha"] })).await;
    problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;

    let body = json!({ "prompt": "Why is the sky blue?", "models": ["local/llama"], "options": { "cache": true } });
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let response = app.submit(&key, &body).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let id = response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");
        let job = app.wait_for_terminal(&key, id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        outputs.push(job["steps"][0].clone());
    }
    let (first, second) = (&outputs[0], &outputs[1]);
    assert_eq!(first["output"], "The sky scatters blue light.");
    assert_eq!(first["usage"], json!({ "input_tokens": 9, "output_tokens": 3 }));
    assert_eq!(first["cost_usd"], 0.000015); // 9 × $1/M + 3 × $2/M
    assert_eq!(first["cached"], false);
    // The second, identical request was answered from the cache: free, and no call made.
    assert_eq!(
        (second["output"].clone(), second["cached"].clone(), second["cost_usd"].clone()),
        (first["output"].clone(), json!(true), json!(0.0))
    );
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), 1);

    // Another user asking the same is not told, by a free cached answer, that someone did.
    let (_, other_key) = app.user_with_key().await;
    let response = app.submit(&other_key, &body).await;
    let id = response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");
    let job = app.wait_for_terminal(&other_key, id).await;
    assert_eq!(job["steps"][0]["cached"], false, "{job}");
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_failing_provider_fails_the_step_with_its_reason() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(401)).mount(&server).await;
    // Retries allowed: a permanent failure must still not be retried.
    let options = Options { config_toml: Some(catalog(&server.uri())), max_attempts: 3, ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let (_, key) = app.user_with_key().await;
    let response =
        app.submit(&key, &json!({ "prompt": "hi", "models": ["local/llama"], "options": { "cache": true } })).await;
    let id = response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");
    let job = app.wait_for_terminal(&key, id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["steps"][0]["status"], "failed");
    assert_eq!(job["steps"][0]["error"]["code"], "auth");
    assert_eq!(job["error"]["failures"][0]["error"]["retryable"], false);
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), 1, "no retry of a permanent failure");
    app.stop().await;
}

#[tokio::test]
async fn an_open_circuit_shows_in_the_catalog_and_readiness() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&server).await;
    let config =
        catalog(&server.uri()).replace("base_url = ", "breaker_failures = 2\nbreaker_cooldown_secs = 60\nbase_url = ");
    let app = TestApp::spawn_with(Options { config_toml: Some(config), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    for _ in 0..2 {
        let response = app.submit(&key, &json!({ "prompt": "hi", "models": ["local/llama"] })).await;
        let id = response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");
        let job = app.wait_for_terminal(&key, id).await;
        assert_eq!(job["steps"][0]["error"]["code"], "overloaded");
        assert_eq!(job["steps"][0]["error"]["retryable"], true);
    }
    let catalog: Value = app.get(&key, "/v1/models").await.json().await.expect("JSON");
    assert_eq!(catalog["models"][0]["available"], false, "{catalog}");
    let ready: Value = app.http.get(app.url("/health/ready")).send().await.expect("ready").json().await.expect("JSON");
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["open_circuits"], json!(["local"]));

    // While open, a job that could only fail is refused, with the cool-down left.
    let refused = app.submit(&key, &json!({ "prompt": "hi", "models": ["local/llama"] })).await;
    let retry_after: u64 = refused.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body = problem(refused, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["type"], "https://ultra.dev/problems/models-unavailable");
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_model_without_its_key_is_refused_at_submit() {
    let config = catalog("http://127.0.0.1:9").replace(
        "base_url = ",
        &format!("api_key_env = \"ULTRA_TEST_UNSET_{}\"\nbase_url = ", uuid::Uuid::new_v4().simple()),
    );
    let app = TestApp::spawn_with(Options { config_toml: Some(config), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let response = app.submit(&key, &json!({ "prompt": "hi", "models": ["local/llama"] })).await;
    let body = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["field"], "models[0]");
    assert!(body["errors"][0]["message"].as_str().is_some_and(|m| m.contains("not available")), "{body}");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&app.pool).await.expect("count");
    assert_eq!(jobs, 0, "nothing was accepted");
    app.stop().await;
}

#[tokio::test]
async fn transient_failures_are_retried_later_through_delay_queues() {
    let server = MockServer::start().await;
    // First a rate limit asking for 3 s, then an overload, then an answer.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(answer()),
        )
        .with_priority(3)
        .mount(&server)
        .await;
    let options = Options { config_toml: Some(catalog(&server.uri())), max_attempts: 4, ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let (_, key) = app.user_with_key().await;
    let response = app.submit(&key, &json!({ "prompt": "hi", "models": ["local/llama"] })).await;
    let id: uuid::Uuid =
        response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");

    let job = app.wait_for_terminal(&key, id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["steps"][0]["output"], "The sky scatters blue light.");
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), 3);
    let retries: Vec<Value> = sqlx::query_scalar(
        "SELECT data FROM job_events WHERE job_id = $1 AND kind = 'queued' AND data->>'reason' = 'retry' ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .expect("events");
    assert_eq!(retries.len(), 2, "{retries:?}");
    assert!(retries[0]["delay_ms"].as_u64() >= Some(3_000), "Retry-After is honoured: {retries:?}");
    assert_eq!(retries[1]["attempt"], 3);
    app.stop().await;
}
