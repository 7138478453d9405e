use common::catalog::ProviderKind;
use serde_json::json;
use ultra_worker::providers::{collect, CompletionRequest, ProviderError};
use wiremock::{
    matchers::{body_partial_json, header, method, path},
    Mock, MockServer, ResponseTemplate,
};

use crate::support::{client, model, spec, sse_body, sse_response};

const KEY_ENV: &str = "ULTRA_TEST_ANTHROPIC_KEY";

/// The event sequence of <https://docs.anthropic.com/en/docs/build-with-claude/streaming>.
fn stream(with_stop: bool) -> String {
    let mut events = vec![
        (Some("message_start"), json!({ "type": "message_start", "message": { "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-test", "stop_reason": null, "usage": { "input_tokens": 25, "output_tokens": 1 } } }).to_string()),
        (Some("content_block_start"), json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }).to_string()),
        (Some("ping"), json!({ "type": "ping" }).to_string()),
        (Some("content_block_delta"), json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Hello" } }).to_string()),
        (Some("content_block_delta"), json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "!" } }).to_string()),
        (Some("content_block_stop"), json!({ "type": "content_block_stop", "index": 0 }).to_string()),
        (Some("message_delta"), json!({ "type": "message_delta", "delta": { "stop_reason": "end_turn", "stop_sequence": null }, "usage": { "output_tokens": 15 } }).to_string()),
    ];
    if with_stop {
        events.push((Some("message_stop"), json!({ "type": "message_stop" }).to_string()));
    }
    sse_body(&events)
}

#[tokio::test]
async fn streams_a_message_with_usage() {
    std::env::set_var(KEY_ENV, "sk-ant-test");
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", "sk-ant-test"))
        .and(header("anthropic-version", "2023-06-01"))
        .and(body_partial_json(json!({
            "model": "claude-test",
            "max_tokens": 64,
            "messages": [{ "role": "user", "content": "Greet me" }],
            "stream": true,
        })))
        .respond_with(sse_response(stream(true)))
        .expect(1)
        .mount(&server)
        .await;
    let spec = spec(ProviderKind::Anthropic, &format!("{}/v1", server.uri()), Some(KEY_ENV));
    let model = model("anthropic", "claude-test");
    let request = CompletionRequest { max_tokens: Some(64), ..CompletionRequest::new(&model, "Greet me") };
    let mut deltas = Vec::new();
    let completion = collect(client(&spec).stream(&request).await.expect("stream"), |d| deltas.push(d.to_owned()))
        .await
        .expect("complete");
    assert_eq!(deltas, ["Hello", "!"]);
    assert_eq!(completion.text, "Hello!");
    assert_eq!((completion.input_tokens, completion.output_tokens), (25, 15));
    assert_eq!(completion.finish_reason.as_deref(), Some("end_turn"));
}

/// The same answer as LiteLLM's `/v1/messages` streams it: `message_start` says 0
/// tokens, and the real counts come in `message_delta` (cumulative, as Anthropic
/// documents them).
fn stream_with_usage_at_the_end() -> String {
    sse_body(&[
        (Some("message_start"), json!({ "type": "message_start", "message": { "id": "msg_2", "type": "message", "role": "assistant", "content": [], "model": "claude-test", "stop_reason": null, "stop_sequence": null, "usage": { "input_tokens": 0, "output_tokens": 0 } } }).to_string()),
        (Some("content_block_start"), json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }).to_string()),
        (Some("content_block_delta"), json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Hello!" } }).to_string()),
        (Some("content_block_stop"), json!({ "type": "content_block_stop", "index": 0 }).to_string()),
        (Some("message_delta"), json!({ "type": "message_delta", "delta": { "stop_reason": "end_turn", "stop_sequence": null }, "usage": { "input_tokens": 25, "output_tokens": 15 } }).to_string()),
        (Some("message_stop"), json!({ "type": "message_stop" }).to_string()),
    ])
}

#[tokio::test]
async fn input_tokens_sent_only_in_message_delta_are_counted() {
    std::env::set_var(KEY_ENV, "sk-ant-test");
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(sse_response(stream_with_usage_at_the_end()))
        .mount(&server)
        .await;
    let spec = spec(ProviderKind::Anthropic, &format!("{}/v1", server.uri()), Some(KEY_ENV));
    let model = model("anthropic", "claude-test");
    let request = CompletionRequest { max_tokens: Some(64), ..CompletionRequest::new(&model, "Greet me") };
    let completion = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await.expect("complete");
    assert_eq!(completion.text, "Hello!");
    assert_eq!(
        (completion.input_tokens, completion.output_tokens),
        (25, 15),
        "the prompt's tokens are counted (and paid for) whichever event carries them"
    );
    // The step's cost includes the prompt: 25 input tokens at $1/Mtok, 15 output at $2/Mtok.
    assert_eq!(model.cost_micros(i64::from(completion.input_tokens), i64::from(completion.output_tokens)), 55);
}

#[tokio::test]
async fn a_stream_without_message_stop_or_with_an_error_event_fails() {
    std::env::set_var(KEY_ENV, "sk-ant-test");
    let server = MockServer::start().await;
    let spec = spec(ProviderKind::Anthropic, &format!("{}/v1", server.uri()), Some(KEY_ENV));
    let model = model("anthropic", "claude-test");
    let request = CompletionRequest::new(&model, "hi");

    Mock::given(method("POST")).respond_with(sse_response(stream(false))).mount(&server).await;
    let result = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await;
    assert!(matches!(result, Err(ProviderError::Truncated(_))), "{result:?}");

    server.reset().await;
    let overloaded = sse_body(&[(
        Some("error"),
        json!({ "type": "error", "error": { "type": "overloaded_error", "message": "Overloaded" } }).to_string(),
    )]);
    Mock::given(method("POST")).respond_with(sse_response(overloaded)).mount(&server).await;
    let result = collect(client(&spec).stream(&request).await.expect("stream"), |_| {}).await;
    assert_eq!(result.err(), Some(ProviderError::Overloaded { status: 529, detail: Some("Overloaded".into()) }));

    let rate_limited = ResponseTemplate::new(429).insert_header("retry-after", "3").set_body_json(json!({
        "type": "error", "error": { "type": "rate_limit_error", "message": "Number of requests has exceeded your rate limit" }
    }));
    for (response, expected) in [
        (ResponseTemplate::new(401), ProviderError::Auth),
        (rate_limited, ProviderError::RateLimited { retry_after: Some(std::time::Duration::from_secs(3)) }),
        (ResponseTemplate::new(529), ProviderError::Overloaded { status: 529, detail: None }),
    ] {
        server.reset().await;
        Mock::given(method("POST")).respond_with(response).mount(&server).await;
        assert_eq!(client(&spec).stream(&request).await.err(), Some(expected));
    }
}
