use std::time::Duration;

use ultra_worker::providers::{CompletionRequest, ProviderError};
use wiremock::{matchers::method, Mock, MockServer, ResponseTemplate};

use crate::support::{guarded, model, sse_body, sse_response};

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
    let server = MockServer::start().await;
    let model = model("local", "llama");
    let provider = guarded("local", &format!("{}/v1", server.uri()), &model);
    let request = CompletionRequest { max_tokens: Some(10), ..CompletionRequest::new(&model, "hi") };

    Mock::given(method("POST")).respond_with(ResponseTemplate::new(502)).mount(&server).await;
    for _ in 0..2 {
        assert_eq!(
            provider.complete(&request, |_| {}).await.err(),
            Some(ProviderError::Overloaded { status: 502, detail: None })
        );
    }
    // Open: calls fail fast without reaching the server.
    let before = server.received_requests().await.map_or(0, |r| r.len());
    assert_eq!(provider.complete(&request, |_| {}).await.err(), Some(ProviderError::CircuitOpen));
    assert!(provider.is_open());
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), before);

    // After the cool-down one probe goes through; it succeeds, so the circuit closes.
    server.reset().await;
    let ok = sse_body(&[
        (None, r#"{"choices":[{"index":0,"delta":{"content":"fine"},"finish_reason":"stop"}]}"#.to_owned()),
        (None, "[DONE]".to_owned()),
    ]);
    Mock::given(method("POST")).respond_with(sse_response(ok)).mount(&server).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let completion = provider.complete(&request, |_| {}).await.expect("probe succeeds");
    assert_eq!(completion.text, "fine");
    assert!(!provider.is_open());
    assert!(provider.complete(&request, |_| {}).await.is_ok());
}

#[tokio::test]
async fn a_failed_probe_opens_the_circuit_again() {
    let server = MockServer::start().await;
    let model = model("local", "llama");
    let provider = guarded("local", &format!("{}/v1", server.uri()), &model);
    let request = CompletionRequest { max_tokens: Some(10), ..CompletionRequest::new(&model, "hi") };
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).mount(&server).await;
    for _ in 0..2 {
        assert!(provider.complete(&request, |_| {}).await.is_err());
    }
    assert!(provider.is_open());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // The probe reaches the server, fails, and the circuit is open again at once.
    assert_eq!(
        provider.complete(&request, |_| {}).await.err(),
        Some(ProviderError::Overloaded { status: 500, detail: None })
    );
    assert!(provider.is_open());
    assert_eq!(provider.complete(&request, |_| {}).await.err(), Some(ProviderError::CircuitOpen));
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), 3);
}

#[tokio::test]
async fn a_prompt_beyond_the_context_window_is_refused_before_calling() {
    let server = MockServer::start().await;
    let model = model("local", "llama"); // context window 1000 tokens
    let provider = guarded("local", &format!("{}/v1", server.uri()), &model);
    let prompt = "word ".repeat(1_000); // about 1250 tokens
    let request = CompletionRequest { max_tokens: Some(10), ..CompletionRequest::new(&model, &prompt) };
    let error = provider.complete(&request, |_| {}).await.expect_err("refused");
    assert!(matches!(error, ProviderError::ContextTooLong(_)) && !error.is_retryable());
    assert_eq!(server.received_requests().await.map_or(0, |r| r.len()), 0, "no call was made");
}
