//! The OpenAPI document as served says what the server does.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{Options, TestApp};

#[tokio::test]
async fn the_document_says_what_the_server_sends_and_takes() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let doc: Value = app.http.get(app.url("/openapi.json")).send().await.expect("GET").json().await.expect("JSON");
    let schemas = &doc["components"]["schemas"];
    // `null` where the server sends it, e.g. on the last page and before a job ends.
    assert_eq!(schemas["JobPage"]["properties"]["next_cursor"]["nullable"], true);
    assert_eq!(schemas["JobView"]["properties"]["finished_at"]["nullable"], true);
    // An enum is a plain reference, not an `allOf` wrapper generators cannot take.
    assert_eq!(schemas["CancelView"]["properties"]["status"]["$ref"], "#/components/schemas/JobStatus");
    // What the server refuses is declared: unknown fields, the configured choices.
    assert_eq!(schemas["AnalyzeRequest"]["additionalProperties"], false);
    let models = &schemas["AnalyzeRequest"]["properties"]["models"];
    assert_eq!(models["items"]["enum"], serde_json::json!(["mock/alpha", "mock/beta", "mock/gamma"]));
    assert_eq!((models["minItems"].as_u64(), models["uniqueItems"].as_bool()), (Some(1), Some(true)));
    assert_eq!(schemas["AnalyzeRequest"]["properties"]["prompt"]["maxLength"], app.config.max_prompt_chars);
    // Each operation lists the problems it can answer, and only those.
    let responses = |path: &str, method: &str| -> Vec<String> {
        let mut codes: Vec<String> = doc["paths"][path][method]["responses"]
            .as_object()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        codes.sort();
        codes
    };
    assert_eq!(responses("/v1/jobs/{id}", "get"), ["200", "401", "404", "429", "500", "503"]);
    assert!(responses("/v1/auth/register", "post").contains(&"409".to_owned()));
    assert!(!responses("/v1/auth/register", "post").contains(&"404".to_owned()));
    // An event stream is text: its schema is one event's.
    let stream = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"];
    assert_eq!(stream["schema"]["properties"]["data"]["type"], "string");
    // The OpenAI surface is documented too, with OpenAI's objects and error shape.
    let chat = &doc["paths"]["/openai/v1/chat/completions"]["post"];
    assert_eq!(chat["tags"], json!(["OpenAI"]));
    let answers = &chat["responses"]["200"]["content"];
    assert_eq!(answers["application/json"]["schema"]["$ref"], "#/components/schemas/ChatCompletion");
    assert!(answers["text/event-stream"].is_object(), "the streamed answer");
    assert!(chat["responses"]["200"]["headers"]["x-ultra-job-id"].is_object());
    let refused = &chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(refused, "#/components/schemas/OpenAiError");
    assert!(chat["responses"].get("422").is_none(), "OpenAI refuses an invalid request with 400");
    for (path, method) in [
        ("/openai/v1/models", "get"),
        ("/openai/v1/models/{id}", "get"),
        ("/openai/v1/files", "post"),
        ("/openai/v1/files/{id}/content", "get"),
        ("/openai/v1/batches", "post"),
        ("/openai/v1/batches/{id}/cancel", "post"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is documented");
    }
    let model_ids = &doc["paths"]["/openai/v1/models/{id}"]["get"]["parameters"][0]["schema"]["enum"];
    assert!(model_ids.as_array().is_some_and(|ids| ids.contains(&json!("ultra/critique"))), "{model_ids}");
    app.stop().await;
}

#[tokio::test]
async fn a_method_a_path_does_not_take_is_405_with_allow() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let response = app.http.delete(app.url("/v1/models")).send().await.expect("DELETE");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers().get("allow").and_then(|v| v.to_str().ok()), Some("GET"));
    let response = app.http.put(app.url(&format!("/v1/jobs/{}", uuid::Uuid::now_v7()))).send().await.expect("PUT");
    assert_eq!(response.headers().get("allow").and_then(|v| v.to_str().ok()), Some("GET"));
    app.stop().await;
}
