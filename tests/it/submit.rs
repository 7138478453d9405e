//! Submitting jobs: the happy path and every kind of bad input.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{fields, problem, TestApp};

#[tokio::test]
async fn a_two_model_job_runs_to_success() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;

    let response =
        app.submit(&key, &json!({ "prompt": "Why is the sky blue?", "models": ["mock/alpha", "mock/beta"] })).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().expect("Location").to_owned();
    let accepted: Value = response.json().await.expect("JSON");
    let id = accepted["id"].as_str().expect("id").to_owned();
    assert_eq!(accepted["status"], "queued");
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(accepted["links"]["self"], location);
    assert_eq!(accepted["links"]["events"], format!("/v1/jobs/{id}/events"));

    let job = app.wait_for_terminal(&key, id.parse().expect("uuid")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["pattern"], "direct");
    assert_eq!(job["models"], json!(["mock/alpha", "mock/beta"]));
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    let steps = job["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    for (step, model) in steps.iter().zip(["mock/alpha", "mock/beta"]) {
        assert_eq!(step["stage"], "initial");
        assert_eq!(step["model"], model);
        assert_eq!(step["status"], "succeeded");
        let output = step["output"].as_str().expect("output");
        assert!(output.starts_with(&format!("[{model}]")), "{output}");
        assert!(step["usage"]["input_tokens"].as_i64() > Some(0));
        assert!(step["usage"]["output_tokens"].as_i64() > Some(0));
    }
    let answers = job["result"]["answers"].as_array().expect("answers");
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0]["output"], steps[0]["output"]);
    assert_eq!(job["error"], Value::Null);
    assert_eq!(app.mock.calls(), 2);

    // The same prompt to the same model gives the same answer: the mock is deterministic.
    let again = app.submit_ok(&key, &["mock/alpha"]).await;
    let again = app.wait_for_terminal(&key, again).await;
    assert_eq!(again["steps"][0]["output"], steps[0]["output"]);
    app.stop().await;
}

#[tokio::test]
async fn every_kind_of_bad_input_is_refused_naming_the_field() {
    let app = TestApp::spawn_with(crate::support::Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_in_tier("basic").await; // five models per job
    let too_long = "a".repeat(app.config.max_prompt_chars + 1);
    let cases: Vec<(Value, StatusCode, &[&str])> = vec![
        (json!({ "prompt": "", "models": ["mock/alpha"] }), StatusCode::UNPROCESSABLE_ENTITY, &["prompt"]),
        (json!({ "prompt": "   \n", "models": ["mock/alpha"] }), StatusCode::UNPROCESSABLE_ENTITY, &["prompt"]),
        (json!({ "prompt": "a\u{0}b", "models": ["mock/alpha"] }), StatusCode::UNPROCESSABLE_ENTITY, &["prompt"]),
        (json!({ "prompt": too_long, "models": ["mock/alpha"] }), StatusCode::PAYLOAD_TOO_LARGE, &["prompt"]),
        (json!({ "prompt": "hi", "models": [] }), StatusCode::UNPROCESSABLE_ENTITY, &["models"]),
        (json!({ "prompt": "hi", "models": ["mock/omega"] }), StatusCode::UNPROCESSABLE_ENTITY, &["models[0]"]),
        (
            json!({ "prompt": "hi", "models": ["mock/alpha", "mock/alpha"] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["models[1]"],
        ),
        (
            json!({ "prompt": "hi", "models": ["mock/alpha", "mock/beta", "mock/gamma", "mock/a", "mock/b", "mock/c"] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["models"],
        ),
        // Too many names: one error for the count, none per name, however many there are.
        (
            json!({ "prompt": "hi", "models": (0..2_000).map(|i| format!("bogus/{i}")).collect::<Vec<_>>() }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["models"],
        ),
        (
            json!({ "prompt": "hi", "models": ["mock/alpha"], "pattern": "astrology" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["pattern"],
        ),
        (json!({ "prompt": 42, "models": ["mock/alpha"] }), StatusCode::UNPROCESSABLE_ENTITY, &["prompt"]),
        (json!({ "prompt": "hi", "models": "mock/alpha" }), StatusCode::UNPROCESSABLE_ENTITY, &["models"]),
        (json!({ "models": ["mock/alpha"] }), StatusCode::UNPROCESSABLE_ENTITY, &["body"]),
        (
            json!({ "prompt": "hi", "models": ["mock/alpha"], "tier": "enterprise" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["tier"],
        ),
        (
            json!({ "prompt": "hi", "models": ["mock/alpha"], "options": { "temperature": 9 } }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["options.temperature"],
        ),
        (
            json!({ "prompt": "hi", "models": ["mock/alpha"], "options": { "max_tokens": 0 } }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["options.max_tokens"],
        ),
        (
            json!({ "prompt": "hi", "models": ["mock/alpha"], "options": { "seed": 1 } }),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["options.seed"],
        ),
        (json!(["prompt"]), StatusCode::UNPROCESSABLE_ENTITY, &["body"]),
    ];
    for (body, status, expected) in cases {
        let problem = problem(app.submit(&key, &body).await, status).await;
        assert_eq!(fields(&problem), expected.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{body} -> {problem}");
    }

    let raw = |content_type: &'static str, body: &'static str| {
        app.http.post(app.url("/v1/analyze")).bearer_auth(&key).header("content-type", content_type).body(body).send()
    };
    let malformed = problem(
        raw("application/json", r#"{"prompt": "hi", "models": [#"#).await.expect("send"),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(malformed["detail"].as_str().is_some_and(|d| d.contains("malformed JSON")), "{malformed}");
    problem(raw("application/json", "").await.expect("send"), StatusCode::BAD_REQUEST).await;
    let wrong_type =
        problem(raw("text/plain", r#"{"prompt": "hi"}"#).await.expect("send"), StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .await;
    assert!(wrong_type["detail"].as_str().is_some_and(|d| d.contains("text/plain")), "{wrong_type}");
    let huge_body = "x".repeat(8 * 1024 * 1024);
    let response = app
        .http
        .post(app.url("/v1/analyze"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(huge_body)
        .send()
        .await;
    // The server may close the connection once it has refused the body.
    if let Ok(response) = response {
        problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    }

    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&app.pool).await.expect("count");
    assert_eq!(jobs, 0, "no refused request may create a job");
    app.stop().await;
}
