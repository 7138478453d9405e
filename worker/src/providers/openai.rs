//! OpenAI Chat Completions, streamed — and so every OpenAI-compatible server (Ollama,
//! vLLM, LM Studio, OpenRouter, DeepSeek, Mistral, Groq, …) by configuration alone.
//! Wire format: <https://platform.openai.com/docs/api-reference/chat/create> and
//! <https://platform.openai.com/docs/api-reference/chat-streaming>: `data:` chunks
//! with `choices[].delta.content`, a last chunk carrying `usage` (asked for with
//! `stream_options.include_usage`), then `data: [DONE]`.

use async_trait::async_trait;
use common::{catalog::ProviderSpec, sse::SseMessage};
use futures::{stream::BoxStream, StreamExt};
use serde_json::{json, Value};

use super::{
    http::{self, Endpoint},
    CompletionRequest, EventStream, Provider, ProviderError, StreamEvent, Usage,
};

pub struct OpenAi {
    endpoint: Endpoint,
    stream_usage: bool,
    max_tokens_field: String,
}

impl OpenAi {
    pub fn new(spec: &ProviderSpec) -> reqwest::Result<Self> {
        Ok(Self {
            endpoint: Endpoint::new(spec)?,
            stream_usage: spec.stream_usage,
            max_tokens_field: spec.max_tokens_field.clone(),
        })
    }
}

#[async_trait]
impl Provider for OpenAi {
    async fn stream(&self, request: &CompletionRequest<'_>) -> Result<EventStream, ProviderError> {
        let messages: Vec<_> =
            request.turns().into_iter().map(|(role, content)| json!({ "role": role, "content": content })).collect();
        let mut body = json!({ "model": request.model.upstream, "messages": messages, "stream": true });
        if self.stream_usage {
            body["stream_options"] = json!({ "include_usage": true });
        }
        if let Some(max_tokens) = request.max_tokens {
            body[self.max_tokens_field.as_str()] = json!(max_tokens);
        }
        if let Some(temperature) = request.temperature {
            body["temperature"] = json!(temperature);
        }
        if let Some(top_p) = request.top_p {
            body["top_p"] = json!(top_p);
        }
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        let endpoint = &self.endpoint;
        let mut http_request = endpoint.post("/chat/completions").json(&body);
        if let Some(key) = &endpoint.api_key {
            http_request = http_request.header("authorization", http::secret_header(&format!("Bearer {key}"))?);
        }
        let prompt_chars = request.prompt.chars().count();
        Ok(assemble(endpoint.events(http_request).await?, prompt_chars))
    }
}

/// What the stream has told so far.
#[derive(Default)]
struct Progress {
    usage: Option<Usage>,
    finish_reason: Option<String>,
    output_chars: usize,
}

/// Turns the chunk stream into deltas and one `Done`, after `[DONE]` only.
fn assemble(events: BoxStream<'static, Result<SseMessage, ProviderError>>, prompt_chars: usize) -> EventStream {
    events
        .scan(Progress::default(), move |progress, message| {
            let out = match message {
                Err(err) => vec![Err(err)],
                Ok(message) if message.data.trim() == "[DONE]" => {
                    // Servers that cannot report usage get an honest estimate, not zero.
                    let usage = progress.usage.unwrap_or(Usage {
                        input_tokens: estimate_tokens(prompt_chars),
                        output_tokens: estimate_tokens(progress.output_chars),
                    });
                    vec![Ok(StreamEvent::Done { usage, finish_reason: progress.finish_reason.take() })]
                }
                Ok(message) => chunk(progress, &message.data),
            };
            futures::future::ready(Some(out))
        })
        .flat_map(futures::stream::iter)
        .boxed()
}

/// Reads one chunk: text deltas, the finish reason, usage, or an error object.
fn chunk(progress: &mut Progress, data: &str) -> Vec<Result<StreamEvent, ProviderError>> {
    let Ok(value) = serde_json::from_str::<Value>(data) else {
        let start: String = data.chars().take(80).collect();
        return vec![Err(ProviderError::Truncated(format!("unreadable chunk: {start}")))];
    };
    if let Some(error) = value.get("error") {
        return vec![Err(stream_error(error))];
    }
    let mut events = Vec::new();
    for choice in value.get("choices").and_then(Value::as_array).into_iter().flatten() {
        if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            progress.output_chars += text.chars().count();
            events.push(Ok(StreamEvent::Delta(text.to_owned())));
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            if reason == "content_filter" {
                events.push(Err(ProviderError::ContentFiltered));
            }
            progress.finish_reason = Some(reason.to_owned());
        }
    }
    if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
        let count = |key: &str| usage.get(key).and_then(Value::as_i64).unwrap_or(0) as i32;
        progress.usage =
            Some(Usage { input_tokens: count("prompt_tokens"), output_tokens: count("completion_tokens") });
    }
    events
}

/// An error object sent inside the stream (OpenAI and compatible servers do this).
fn stream_error(error: &Value) -> ProviderError {
    let said = error.get("message").and_then(Value::as_str);
    let message = http::excerpt(said.unwrap_or("error in stream"));
    // `type` is the category, `code` the detail: either may say what happened.
    let says = |what: &str| ["type", "code"].iter().any(|k| error.get(*k).and_then(Value::as_str) == Some(what));
    if says("context_length_exceeded") {
        ProviderError::ContextTooLong(message)
    } else if says("insufficient_quota") {
        ProviderError::BadRequest(message)
    } else if says("rate_limit_exceeded") || says("rate_limit_error") {
        ProviderError::RateLimited { retry_after: None }
    } else if says("server_error") || says("overloaded_error") {
        ProviderError::Overloaded { status: 500, detail: http::detail(said) }
    } else {
        ProviderError::BadRequest(message)
    }
}

/// Tokens in `chars` characters, by the one estimate (`common::patterns`).
pub fn estimate_tokens(chars: usize) -> i32 {
    i32::try_from(common::patterns::tokens_in_chars(chars)).unwrap_or(i32::MAX)
}
