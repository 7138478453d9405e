use std::time::Duration;

use common::catalog::ProviderKind;
use serde_json::json;
use ultra_worker::providers::{collect, CompletionRequest, EventStream, ProviderError};
use wiremock::{
    matchers::{body_partial_json, header, method, path},
    Mock, MockServer, ResponseTemplate,
};

use crate::support::{client, model, spec, sse_body, sse_response};

const KEY_ENV: &str = "ULTRA_TEST_OPENAI_KEY";

fn chunk(content: &str) -> String {
    json!({ "id": "c1", "object": "chat.completion.chunk", "model": "gpt-test",
            "choices": [{ "index": 0, "delta": { "content": content }, "finish_reason": null }] })
    .to_string()
}

fn stream(with_done: bool) -> String {
    let mut events = vec![
        (None, json!({ "choices": [{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }] }).to_string()),
        (None, chunk("Hello")),
        (None, chunk(", world")),
        (None, json!({ "choices": [{ "index": 0, "delta": {}, "finish_reason": "stop" }] }).to_string()),
        (None, json!({ "choices": [], "usage": { "prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12 } }).to_string()),
    ];
    if with_done {
        events.push((None, "[DONE]".to_owned()));
    }
    sse_body(&events)
}

/// Asks the server's `gpt-test` model to say hi.
async fn say_hi(server: &MockServer) -> Result<EventStream, ProviderError> {
    let spec = spec(ProviderKind::Openai, &format!("{}/v1", server.uri()), Some(KEY_ENV));
    let model = model("openai", "gpt-test");
    let request = CompletionRequest::new(&model, "hi");
    client(&spec).stream(&request).await
}

async fn server() -> MockServer {
    std::env::set_var(KEY_ENV, "sk-test-secret");
    MockServer::start().await
}

#[tokio::test]
async fn streams_a_chat_completion_and_reads_usage() {
    let server = server().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", "Bearer sk-test-secret"))
        .and(header("content-type", "application/json"))
        .and(body_partial_json(json!({
            "model": "gpt-test",
            "messages": [{ "role": "user", "content": "Say hello" }],
            "stream": true,
            "stream_options": { "include_usage": true },
            "max_tokens": 50,
        })))
        .respond_with(sse_response(stream(true)))
        .expect(1)
        .mount(&server)
        .await;
    let spec = spec(ProviderKind::Openai, &format!("{}/v1", server.uri()), Some(KEY_ENV));
    let model = model("openai", "gpt-test");
    let request = CompletionRequest { max_tokens: Some(50), ..CompletionRequest::new(&model, "Say hello") };
    let mut deltas = Vec::new();
    let completion = collect(client(&spec).stream(&request).await.expect("stream"), |d| deltas.push(d.to_owned()))
        .await
        .expect("complete");
    assert_eq!(deltas, ["Hello", ", world"]);
    assert_eq!(completion.text, "Hello, world");
    assert_eq!((completion.input_tokens, completion.output_tokens), (9, 3));
    assert_eq!(completion.finish_reason.as_deref(), Some("stop"));
}

#[tokio::test]
async fn a_stream_cut_before_done_is_an_error() {
    let server = server().await;
    Mock::given(method("POST")).respond_with(sse_response(stream(false))).mount(&server).await;
    let result = collect(say_hi(&server).await.expect("stream"), |_| {}).await;
    assert!(matches!(result, Err(ProviderError::Truncated(_))), "{result:?}");
}

#[tokio::test]
async fn error_statuses_say_whether_to_retry() {
    let server = server().await;
    let cases = [
        (
            ResponseTemplate::new(429).insert_header("retry-after", "7"),
            ProviderError::RateLimited { retry_after: Some(Duration::from_secs(7)) },
        ),
        (
            ResponseTemplate::new(401).set_body_json(json!({ "error": { "message": "bad key sk-test-secret" } })),
            ProviderError::Auth,
        ),
        (ResponseTemplate::new(500), ProviderError::Overloaded { status: 500, detail: None }),
        (ResponseTemplate::new(503), ProviderError::Overloaded { status: 503, detail: None }),
    ];
    for (response, expected) in cases {
        server.reset().await;
        Mock::given(method("POST")).respond_with(response).mount(&server).await;
        let error = say_hi(&server).await.err().expect("fails");
        assert_eq!(error, expected);
        assert_eq!(error.is_retryable(), !matches!(expected, ProviderError::Auth));
        assert!(
            !serde_json::to_string(&error.to_step_error()).unwrap_or_default().contains("sk-test-secret"),
            "keys never appear in errors"
        );
    }
    // A provider that echoes the key in its error message does not get it into ours.
    server.reset().await;
    let echo = json!({ "error": { "message": "Incorrect request for key sk-test-secret: unknown parameter" } });
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(400).set_body_json(echo)).mount(&server).await;
    let error = say_hi(&server).await.err().expect("fails");
    assert!(
        matches!(error, ProviderError::BadRequest(ref m) if m.contains("[redacted]") && !m.contains("sk-test-secret")),
        "{error:?}"
    );

    server.reset().await;
    let too_long = json!({ "error": { "message": "This model's maximum context length is 10 tokens", "code": "context_length_exceeded" } });
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(400).set_body_json(too_long)).mount(&server).await;
    let error = say_hi(&server).await.err().expect("fails");
    assert!(matches!(error, ProviderError::ContextTooLong(_)) && !error.is_retryable(), "{error:?}");
}

#[tokio::test]
async fn a_server_error_keeps_what_the_provider_said() {
    let server = server().await;
    // LiteLLM's body (OpenAI's error shape) when its upstream fails.
    let body = json!({ "error": {
        "message": "litellm.InternalServerError: OpenAIException - upstream connect error or disconnect/reset before headers",
        "type": "None", "param": "None", "code": "500",
    } });
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500).set_body_json(body)).mount(&server).await;
    let error = say_hi(&server).await.err().expect("fails");
    assert!(matches!(error, ProviderError::Overloaded { status: 500, .. }) && error.is_retryable(), "{error:?}");
    // What the failed step records and its user sees.
    let stored = serde_json::to_value(error.to_step_error()).expect("json");
    assert_eq!(stored["code"], "overloaded");
    assert_eq!(
        stored["message"],
        "the provider is overloaded or failing (500): litellm.InternalServerError: OpenAIException - \
         upstream connect error or disconnect/reset before headers"
    );
}

#[tokio::test]
async fn a_server_error_excerpt_is_short_one_line_and_keyless() {
    let server = server().await;
    let leaky = format!(
        "upstream said:\n\u{1b}[31m401 for key sk-proj-Abc123Def456Ghi789 and sk-test-secret \
         (Authorization: Bearer tok_live_51HxYz) at https://upstream.example/v1?key=AIzaSyD-1234567890abcdefghijklmnopqrstu&x=1 \
         request 0123456789abcdef0123456789abcdef\r\n{}",
        "and so on ".repeat(40)
    );
    let body = json!({ "error": { "message": leaky, "type": "server_error" } });
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(502).set_body_json(body)).mount(&server).await;
    let error = say_hi(&server).await.err().expect("fails");
    let ProviderError::Overloaded { status: 502, detail: Some(detail) } = &error else {
        panic!("an overload with a detail: {error:?}")
    };
    assert!(
        detail
            .starts_with("upstream said: [31m401 for key [redacted] and [redacted] (Authorization: Bearer [redacted])"),
        "{detail}"
    );
    assert!(detail.contains("request [redacted] and so on"), "{detail}");
    for secret in ["sk-proj", "sk-test-secret", "tok_live", "AIza", "0123456789abcdef"] {
        assert!(!detail.contains(secret), "{secret} leaked: {detail}");
    }
    assert!(!detail.chars().any(char::is_control), "one line, no escapes: {detail:?}");
    assert!(detail.chars().count() <= 200 && detail.ends_with('…'), "cut short: {detail}");
    assert!(error.to_step_error().message.ends_with(detail.as_str()));
}

#[tokio::test]
async fn a_slow_server_times_out() {
    let server = server().await;
    Mock::given(method("POST"))
        .respond_with(sse_response(stream(true)).set_delay(Duration::from_secs(3)))
        .mount(&server)
        .await;
    let error = say_hi(&server).await.err().expect("fails");
    assert_eq!(error, ProviderError::Timeout);
    assert!(error.is_retryable());
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(307).insert_header("location", "http://169.254.169.254/latest"))
        .mount(&server)
        .await;
    let error = say_hi(&server).await.err().expect("fails");
    assert!(matches!(error, ProviderError::BadRequest(ref m) if m.contains("307")), "{error:?}");
}
