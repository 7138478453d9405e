use common::catalog::ProviderKind;
use serde_json::json;
use ultra_worker::providers::{collect, CompletionRequest, ProviderError};
use wiremock::{
    matchers::{body_partial_json, header, method, path, query_param},
    Mock, MockServer,
};

use crate::support::{client, model, spec, sse_body, sse_response};

const KEY_ENV: &str = "ULTRA_TEST_GEMINI_KEY";

fn chunk(text: &str, finish: Option<&str>) -> String {
    let mut candidate = json!({ "content": { "parts": [{ "text": text }], "role": "model" }, "index": 0 });
    if let Some(reason) = finish {
        candidate["finishReason"] = json!(reason);
    }
    json!({ "candidates": [candidate], "usageMetadata": { "promptTokenCount": 4, "candidatesTokenCount": 6, "totalTokenCount": 10 } })
        .to_string()
}

#[tokio::test]
async fn streams_generate_content_with_the_key_in_a_header() {
    std::env::set_var(KEY_ENV, "gemini-test-key");
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1beta/models/gemini-test:streamGenerateContent"))
        .and(query_param("alt", "sse"))
        .and(header("x-goog-api-key", "gemini-test-key"))
        .and(body_partial_json(json!({
            "contents": [{ "role": "user", "parts": [{ "text": "Count" }] }],
            "generationConfig": { "maxOutputTokens": 20 },
        })))
        .respond_with(sse_response(sse_body(&[(None, chunk("One, ", None)), (None, chunk("two.", Some("STOP")))])))
        .expect(1)
        .mount(&server)
        .await;
    let spec = spec(ProviderKind::Gemini, &format!("{}/v1beta", server.uri()), Some(KEY_ENV));
    let model = model("gemini", "gemini-test");
    let request = CompletionRequest { max_tokens: Some(20), ..CompletionRequest::new(&model, "Count") };
    let completion = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await.expect("complete");
    assert_eq!(completion.text, "One, two.");
    assert_eq!((completion.input_tokens, completion.output_tokens), (4, 6));
    assert_eq!(completion.finish_reason.as_deref(), Some("STOP"));
    let received = server.received_requests().await.expect("recorded");
    assert!(!received[0].url.as_str().contains("gemini-test-key"), "the key never goes in the URL");
}

#[tokio::test]
async fn a_stream_without_a_finish_reason_is_truncated_and_safety_blocks_are_refusals() {
    std::env::set_var(KEY_ENV, "gemini-test-key");
    let server = MockServer::start().await;
    let spec = spec(ProviderKind::Gemini, &format!("{}/v1beta", server.uri()), Some(KEY_ENV));
    let model = model("gemini", "gemini-test");
    let request = CompletionRequest::new(&model, "hi");

    Mock::given(method("POST"))
        .respond_with(sse_response(sse_body(&[(None, chunk("One, ", None))])))
        .mount(&server)
        .await;
    let result = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await;
    assert!(matches!(result, Err(ProviderError::Truncated(_))), "{result:?}");

    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(sse_response(sse_body(&[(None, chunk("", Some("SAFETY")))])))
        .mount(&server)
        .await;
    let result = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await;
    assert_eq!(result.err(), Some(ProviderError::ContentFiltered));
}

#[tokio::test]
async fn the_unary_generate_content_works_too() {
    std::env::set_var(KEY_ENV, "gemini-test-key");
    let server = MockServer::start().await;
    let whole = json!({
        "candidates": [{ "content": { "parts": [{ "text": "One, two." }], "role": "model" }, "finishReason": "STOP", "index": 0 }],
        "usageMetadata": { "promptTokenCount": 4, "candidatesTokenCount": 6, "totalTokenCount": 10 }
    });
    Mock::given(method("POST"))
        .and(path("/v1beta/models/gemini-test:generateContent"))
        .and(header("x-goog-api-key", "gemini-test-key"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(whole))
        .expect(1)
        .mount(&server)
        .await;
    let mut spec = spec(ProviderKind::Gemini, &format!("{}/v1beta", server.uri()), Some(KEY_ENV));
    spec.streaming = false;
    let model = model("gemini", "gemini-test");
    let request = CompletionRequest::new(&model, "Count");
    let completion = collect(client(&spec).stream(&request).await.expect("call"), |_| {}).await.expect("complete");
    assert_eq!((completion.text.as_str(), completion.output_tokens), ("One, two.", 6));
}
