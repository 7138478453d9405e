//! The analysis pipeline: initial answers, revisions in view of the others, one
//! synthesis — with partial failure and a synthesis fallback.

use reqwest::StatusCode;
use serde_json::{json, Value};
use wiremock::{
    matchers::{body_partial_json, body_string_contains, method},
    Mock, MockServer, ResponseTemplate,
};

use crate::support::{openai_answer as answer, problem, Options, TestApp};

async fn run(app: &TestApp, key: &str, body: Value) -> Value {
    let response = app.submit(key, &body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");
    app.wait_for_terminal(key, id).await
}

fn stages(job: &Value) -> Vec<(String, String)> {
    job["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (s["stage"].as_str().unwrap_or_default().to_owned(), s["model"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_critique_runs_three_stages_and_names_its_synthesis_model() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let patterns: Value = app.get(&key, "/v1/patterns").await.json().await.expect("JSON");
    let names: Vec<&str> =
        patterns["patterns"].as_array().expect("patterns").iter().filter_map(|p| p["name"].as_str()).collect();
    for name in ["direct", "gut", "confidence", "critique", "fact_check", "perspective", "scenario"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    let models = ["mock/alpha", "mock/beta", "mock/gamma"];
    let body = json!({ "prompt": "Is Rust fast?", "models": models, "pattern": "critique",
                       "options": { "synthesis_model": "mock/gamma" } });
    let job = run(&app, &key, body).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let expected: Vec<(String, String)> = ["initial", "meta"]
        .iter()
        .flat_map(|stage| models.iter().map(move |m| (stage.to_string(), m.to_string())))
        .chain(std::iter::once(("synthesis".to_owned(), "mock/gamma".to_owned())))
        .collect();
    assert_eq!(stages(&job), expected);
    let result = &job["result"];
    assert_eq!(result["answers"].as_array().map(Vec::len), Some(3));
    assert_eq!(result["meta"].as_array().map(Vec::len), Some(3));
    assert_eq!(result["synthesis"]["model"], "mock/gamma");
    assert_eq!(result["output"], result["synthesis"]["output"]);
    // A revision is a different call from the first answer (its prompt carries the others').
    assert_ne!(result["meta"][0]["output"], result["answers"][0]["output"]);

    // A synthesis model from outside the job's models writes the synthesis only, and a
    // quorum above the job's models asks for every one of them.
    let outside = json!({ "prompt": "x", "models": ["mock/alpha"], "pattern": "critique",
                          "options": { "synthesis_model": "mock/beta", "min_models": 2 } });
    let job = run(&app, &key, outside).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let expected = [("initial", "mock/alpha"), ("meta", "mock/alpha"), ("synthesis", "mock/beta")]
        .map(|(stage, model)| (stage.to_owned(), model.to_owned()));
    assert_eq!(stages(&job), expected);

    let max = app.config.max_models_per_job + 1;
    let bad = json!({ "prompt": "x", "models": ["mock/alpha"], "pattern": "critique",
                      "options": { "synthesis_model": "mock/omega", "min_models": max } });
    let refused = problem(app.submit(&key, &bad).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(crate::support::fields(&refused), ["options.synthesis_model", "options.min_models"]);
    app.stop().await;
}

const TWO_MODELS: &str = r#"
[providers.local]
kind = "openai"
base_url = "BASE/v1"

[[models]]
id = "local/a"
provider = "local"
upstream = "a"

[[models]]
id = "local/b"
provider = "local"
upstream = "b"
"#;

#[tokio::test]
async fn revisions_see_the_others_answers_and_a_failed_synthesis_falls_back() {
    let server = MockServer::start().await;
    // Model a cannot write syntheses; otherwise each model has its own voice.
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "model": "a" })))
        .and(body_string_contains("The models' answers"))
        .respond_with(ResponseTemplate::new(503))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "model": "a" })))
        .respond_with(answer("apples are red"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "model": "b" })))
        .respond_with(answer("bananas are yellow"))
        .mount(&server)
        .await;
    let config = TWO_MODELS.replace("BASE", &server.uri());
    let app = TestApp::spawn_with(Options { config_toml: Some(config), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;

    let job =
        run(&app, &key, json!({ "prompt": "Fruit?", "models": ["local/a", "local/b"], "pattern": "critique" })).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["synthesis"]["model"], "local/b", "a failed, so b wrote it");
    let failures = job["result"]["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0]["model"].as_str(), failures[0]["stage"].as_str()), (Some("local/a"), Some("synthesis")));

    // Model a's revision was asked with b's answer in its prompt, and not its own as "other".
    let requests = server.received_requests().await.expect("recorded");
    let revision = requests
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .find(|body| body.contains("\"model\":\"a\"") && body.contains("Other models answered"))
        .expect("a's meta request");
    assert!(revision.contains("local/b: bananas are yellow"), "{revision}");
    assert!(revision.contains("Your earlier answer:\\napples are red"), "{revision}");
    app.stop().await;
}

#[tokio::test]
async fn a_stage_below_its_quorum_fails_the_job_with_the_reasons() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "model": "a" })))
        .respond_with(answer("fine"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({ "model": "b" })))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let config = TWO_MODELS.replace("BASE", &server.uri());
    let app = TestApp::spawn_with(Options { config_toml: Some(config), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;

    // With the default quorum of one, the job goes on without b.
    let lenient =
        run(&app, &key, json!({ "prompt": "q", "models": ["local/a", "local/b"], "pattern": "critique" })).await;
    assert_eq!(lenient["status"], "succeeded", "{lenient}");
    assert_eq!(lenient["result"]["meta"].as_array().map(Vec::len), Some(1), "only a revised");
    assert_eq!(lenient["result"]["failures"][0]["error"]["code"], "auth");

    let strict = run(
        &app,
        &key,
        json!({ "prompt": "q2", "models": ["local/a", "local/b"], "pattern": "critique", "options": { "min_models": 2 } }),
    )
    .await;
    assert_eq!(strict["status"], "failed");
    assert_eq!(strict["error"]["code"], "too_few_models");
    assert!(strict["error"]["message"].as_str().is_some_and(|m| m.contains("initial")), "{strict}");
    app.stop().await;
}

#[tokio::test]
async fn placeholders_in_a_prompt_are_text_not_templates() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    // Expanded, each `$other_responses` would paste in the other models' answers: a
    // meta prompt of ~140,000 tokens per model, past the mock's 128,000-token window.
    let prompt = "$other_responses ".repeat(1_900);
    let body = json!({ "prompt": prompt, "models": ["mock/alpha", "mock/beta", "mock/gamma"], "pattern": "critique" });
    let job = run(&app, &key, body).await;
    assert_eq!(job["status"], "succeeded", "{}", job["error"]);
    assert_eq!(job["result"]["meta"].as_array().map(Vec::len), Some(3));
    app.stop().await;
}
