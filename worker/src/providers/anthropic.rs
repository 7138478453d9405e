//! Anthropic Messages, streamed. Wire format:
//! <https://docs.anthropic.com/en/api/messages> and
//! <https://docs.anthropic.com/en/docs/build-with-claude/streaming>: `message_start`
//! (input usage), `content_block_delta` (`text_delta`), `message_delta` (stop reason,
//! output usage), `message_stop` (the terminator), `ping`, and `error`.

use async_trait::async_trait;
use common::catalog::ProviderSpec;
use futures::{stream::BoxStream, StreamExt};
use serde_json::{json, Value};

use super::{
    http::{self, Endpoint, SseMessage},
    CompletionRequest, EventStream, Provider, ProviderError, StreamEvent, Usage,
};

/// The API version this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    endpoint: Endpoint,
}

impl Anthropic {
    pub fn new(spec: &ProviderSpec) -> reqwest::Result<Self> {
        Ok(Self { endpoint: Endpoint::new(spec)? })
    }
}

#[async_trait]
impl Provider for Anthropic {
    async fn stream(&self, request: &CompletionRequest<'_>) -> Result<EventStream, ProviderError> {
        let endpoint = &self.endpoint;
        let key = endpoint.required_key()?;
        let mut body = json!({
            "model": request.model.upstream,
            // Required by the Messages API.
            "max_tokens": request.max_tokens.unwrap_or(request.model.max_output_tokens),
            "messages": [{ "role": "user", "content": request.prompt }],
            "stream": true,
        });
        if let Some(temperature) = request.temperature {
            body["temperature"] = json!(temperature.min(1.0)); // Anthropic's range is 0 to 1
        }
        let http_request = endpoint
            .post("/messages")
            .header("x-api-key", http::secret_header(key)?)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body);
        Ok(assemble(endpoint.events(http_request).await?))
    }
}

#[derive(Default)]
struct Progress {
    usage: Usage,
    stop_reason: Option<String>,
}

fn assemble(events: BoxStream<'static, Result<SseMessage, ProviderError>>) -> EventStream {
    events
        .scan(Progress::default(), |progress, message| {
            let out = match message {
                Err(err) => vec![Err(err)],
                Ok(message) => event(progress, &message),
            };
            futures::future::ready(Some(out))
        })
        .flat_map(futures::stream::iter)
        .boxed()
}

fn event(progress: &mut Progress, message: &SseMessage) -> Vec<Result<StreamEvent, ProviderError>> {
    let Ok(value) = serde_json::from_str::<Value>(&message.data) else {
        // A broken event might have carried text: never assemble an answer with a hole.
        return vec![Err(ProviderError::Truncated("unreadable event".into()))];
    };
    let kind = message.event.as_deref().or_else(|| value.get("type").and_then(Value::as_str)).unwrap_or_default();
    let count = |v: Option<&Value>| v.and_then(Value::as_i64).unwrap_or(0) as i32;
    match kind {
        "message_start" => {
            progress.usage.input_tokens = count(value.pointer("/message/usage/input_tokens"));
            progress.usage.output_tokens = count(value.pointer("/message/usage/output_tokens"));
            vec![]
        }
        "content_block_delta" => match value.pointer("/delta/text").and_then(Value::as_str) {
            Some(text) if !text.is_empty() => vec![Ok(StreamEvent::Delta(text.to_owned()))],
            _ => vec![],
        },
        "message_delta" => {
            if let Some(output) = value.pointer("/usage/output_tokens").and_then(Value::as_i64) {
                progress.usage.output_tokens = output as i32;
            }
            if let Some(reason) = value.pointer("/delta/stop_reason").and_then(Value::as_str) {
                progress.stop_reason = Some(reason.to_owned());
                if reason == "refusal" {
                    return vec![Err(ProviderError::ContentFiltered)];
                }
            }
            vec![]
        }
        "message_stop" => {
            vec![Ok(StreamEvent::Done { usage: progress.usage, finish_reason: progress.stop_reason.take() })]
        }
        "error" => vec![Err(stream_error(value.get("error").unwrap_or(&Value::Null)))],
        _ => vec![], // ping, content_block_start/stop, and event types added later
    }
}

/// <https://docs.anthropic.com/en/api/errors>: the error types a stream can carry.
fn stream_error(error: &Value) -> ProviderError {
    let message = error.get("message").and_then(Value::as_str).unwrap_or("error in stream").to_owned();
    match error.get("type").and_then(Value::as_str).unwrap_or_default() {
        "overloaded_error" => ProviderError::Overloaded { status: 529 },
        "api_error" => ProviderError::Overloaded { status: 500 },
        "rate_limit_error" => ProviderError::RateLimited { retry_after: None },
        "authentication_error" | "permission_error" => ProviderError::Auth,
        "request_too_large" => ProviderError::ContextTooLong(message),
        _ => ProviderError::BadRequest(message),
    }
}
