//! Google Gemini, streamed with `streamGenerateContent?alt=sse` (or, configured with
//! `streaming = false`, the unary `generateContent`), the key in the
//! `x-goog-api-key` header (never in the URL). Wire format:
//! <https://ai.google.dev/api/generate-content>: each event is a
//! `GenerateContentResponse` with `candidates[].content.parts[].text`, a
//! `finishReason` on the last one, and `usageMetadata`. Gemini sends no separate
//! terminator: a stream that ends before a `finishReason` is truncated.

use async_trait::async_trait;
use common::{catalog::ProviderSpec, domain::ChatRole, sse::SseMessage};
use futures::{stream::BoxStream, StreamExt};
use serde_json::{json, Value};

use super::{
    http::{self, Endpoint},
    CompletionRequest, EventStream, Provider, ProviderError, StreamEvent, Usage,
};

pub struct Gemini {
    endpoint: Endpoint,
    streaming: bool,
}

impl Gemini {
    pub fn new(spec: &ProviderSpec) -> reqwest::Result<Self> {
        Ok(Self { endpoint: Endpoint::new(spec)?, streaming: spec.streaming })
    }
}

#[async_trait]
impl Provider for Gemini {
    async fn stream(&self, request: &CompletionRequest<'_>) -> Result<EventStream, ProviderError> {
        let endpoint = &self.endpoint;
        let key = endpoint.required_key()?;
        let mut config = json!({});
        if let Some(max_tokens) = request.max_tokens {
            config["maxOutputTokens"] = json!(max_tokens);
        }
        if let Some(temperature) = request.temperature {
            config["temperature"] = json!(temperature);
        }
        if let Some(top_p) = request.top_p {
            config["topP"] = json!(top_p);
        }
        if !request.stop.is_empty() {
            config["stopSequences"] = json!(request.stop);
        }
        let (system, dialogue) = request.system_and_dialogue();
        let contents: Vec<_> = dialogue
            .iter()
            .map(|(role, text)| {
                let role = if *role == ChatRole::Assistant { "model" } else { "user" };
                json!({ "role": role, "parts": [{ "text": text }] })
            })
            .collect();
        let mut body = json!({ "contents": contents, "generationConfig": config });
        if let Some(system) = system {
            body["systemInstruction"] = json!({ "parts": [{ "text": system }] });
        }
        let model = &request.model.upstream;
        if !self.streaming {
            // One `GenerateContentResponse`: the same reading as one streamed chunk.
            // A unary answer's head only comes once it is written: the whole-call limit applies.
            let http_request = endpoint
                .post(&format!("/models/{model}:generateContent"))
                .header("x-goog-api-key", http::secret_header(key)?)
                .json(&body);
            let response = endpoint.send(http_request, endpoint.total).await?;
            let text = tokio::time::timeout(endpoint.total, response.text())
                .await
                .map_err(|_| ProviderError::Timeout)?
                .map_err(http::transport_error)?;
            let message = SseMessage { event: None, data: text };
            return Ok(assemble(futures::stream::once(async move { Ok(message) }).boxed()));
        }
        let http_request = endpoint
            .post(&format!("/models/{model}:streamGenerateContent?alt=sse"))
            .header("x-goog-api-key", http::secret_header(key)?)
            .json(&body);
        Ok(assemble(endpoint.events(http_request).await?))
    }
}

#[derive(Default)]
struct Progress {
    usage: Usage,
    finish_reason: Option<String>,
    ended: bool,
}

fn assemble(events: BoxStream<'static, Result<SseMessage, ProviderError>>) -> EventStream {
    // A `None` at the end lets the scan decide whether the stream ended properly.
    let events = events.map(Some).chain(futures::stream::once(async { None }));
    events
        .scan(Progress::default(), |progress, message| {
            let out = match message {
                _ if progress.ended => vec![],
                Some(Err(err)) => {
                    progress.ended = true;
                    vec![Err(err)]
                }
                Some(Ok(message)) => chunk(progress, &message.data),
                None => {
                    progress.ended = true;
                    match progress.finish_reason.take() {
                        Some(reason) => {
                            vec![Ok(StreamEvent::Done { usage: progress.usage, finish_reason: Some(reason) })]
                        }
                        None => vec![Err(ProviderError::Truncated("the stream ended before a finishReason".into()))],
                    }
                }
            };
            futures::future::ready(Some(out))
        })
        .flat_map(futures::stream::iter)
        .boxed()
}

fn chunk(progress: &mut Progress, data: &str) -> Vec<Result<StreamEvent, ProviderError>> {
    let Ok(value) = serde_json::from_str::<Value>(data) else {
        return vec![Err(ProviderError::Truncated("unreadable chunk".into()))];
    };
    if let Some(error) = value.get("error") {
        let said = error.get("message").and_then(Value::as_str);
        let message = http::excerpt(said.unwrap_or("error in stream"));
        return vec![Err(match error.get("code").and_then(Value::as_u64) {
            Some(429) => ProviderError::RateLimited { retry_after: None },
            Some(code @ 500..=599) => ProviderError::Overloaded { status: code as u16, detail: http::detail(said) },
            _ => ProviderError::BadRequest(message),
        })];
    }
    if value.pointer("/promptFeedback/blockReason").is_some() {
        return vec![Err(ProviderError::ContentFiltered)];
    }
    if let Some(usage) = value.get("usageMetadata") {
        let count = |key: &str| usage.get(key).and_then(Value::as_i64).unwrap_or(0) as i32;
        progress.usage =
            Usage { input_tokens: count("promptTokenCount"), output_tokens: count("candidatesTokenCount") };
    }
    let mut events = Vec::new();
    if let Some(candidate) = value.pointer("/candidates/0") {
        for part in candidate.pointer("/content/parts").and_then(Value::as_array).into_iter().flatten() {
            if let Some(text) = part.get("text").and_then(Value::as_str).filter(|t| !t.is_empty()) {
                events.push(Ok(StreamEvent::Delta(text.to_owned())));
            }
        }
        if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
            if matches!(reason, "SAFETY" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" | "RECITATION") {
                events.push(Err(ProviderError::ContentFiltered));
            }
            progress.finish_reason = Some(reason.to_owned());
        }
    }
    events
}
