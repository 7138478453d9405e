//! Anthropic Messages, streamed. Wire format:
//! <https://docs.anthropic.com/en/api/messages> and
//! <https://docs.anthropic.com/en/docs/build-with-claude/streaming>: `message_start`
//! (usage so far), `content_block_delta` (`text_delta`), `message_delta` (stop reason,
//! cumulative usage), `message_stop` (the terminator), `ping`, and `error`.

use async_trait::async_trait;
use common::{catalog::ProviderSpec, sse::SseMessage};
use futures::{stream::BoxStream, StreamExt};
use serde_json::{json, Value};

use super::{
    http::{self, Endpoint},
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
        let (system, dialogue) = request.system_and_dialogue();
        let messages: Vec<_> =
            dialogue.iter().map(|(role, content)| json!({ "role": role, "content": content })).collect();
        let mut body = json!({
            "model": request.model.upstream,
            // Required by the Messages API.
            "max_tokens": request.max_tokens.unwrap_or(request.model.max_output_tokens),
            "messages": messages,
            "stream": true,
        });
        if let Some(system) = system {
            body["system"] = json!(system);
        }
        if let Some(temperature) = request.temperature {
            body["temperature"] = json!(temperature.min(1.0)); // Anthropic's range is 0 to 1
        }
        if let Some(top_p) = request.top_p {
            body["top_p"] = json!(top_p);
        }
        if !request.stop.is_empty() {
            body["stop_sequences"] = json!(request.stop);
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

impl Progress {
    /// Takes the token counts of a `usage` object, from whichever event carries them:
    /// Anthropic puts the input count in `message_start` and the output count in
    /// `message_delta`, while proxies such as LiteLLM's `/v1/messages` send
    /// `input_tokens: 0` first and the real count in `message_delta`. The counts are
    /// cumulative, so a later one replaces an earlier one — unless it is lower (a
    /// placeholder 0 after the real count is no news). A missing or null count changes
    /// nothing.
    fn count(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage else { return };
        let read = |key: &str| usage.get(key).and_then(Value::as_i64).map(|n| i32::try_from(n).unwrap_or(i32::MAX));
        if let Some(input) = read("input_tokens") {
            self.usage.input_tokens = self.usage.input_tokens.max(input);
        }
        if let Some(output) = read("output_tokens") {
            self.usage.output_tokens = self.usage.output_tokens.max(output);
        }
    }
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
    match kind {
        "message_start" => {
            progress.count(value.pointer("/message/usage"));
            vec![]
        }
        "content_block_delta" => match value.pointer("/delta/text").and_then(Value::as_str) {
            Some(text) if !text.is_empty() => vec![Ok(StreamEvent::Delta(text.to_owned()))],
            _ => vec![],
        },
        "message_delta" => {
            progress.count(value.get("usage"));
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
    let said = error.get("message").and_then(Value::as_str);
    let message = http::excerpt(said.unwrap_or("error in stream"));
    match error.get("type").and_then(Value::as_str).unwrap_or_default() {
        "overloaded_error" => ProviderError::Overloaded { status: 529, detail: http::detail(said) },
        "api_error" => ProviderError::Overloaded { status: 500, detail: http::detail(said) },
        "rate_limit_error" => ProviderError::RateLimited { retry_after: None },
        "authentication_error" | "permission_error" => ProviderError::Auth,
        "request_too_large" => ProviderError::ContextTooLong(message),
        _ => ProviderError::BadRequest(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_after(events: &[Value]) -> Usage {
        let mut progress = Progress::default();
        for value in events {
            let message = SseMessage { event: None, data: value.to_string() };
            assert!(event(&mut progress, &message).is_empty(), "no text, no end: {value}");
        }
        progress.usage
    }

    #[test]
    fn token_counts_come_from_whichever_event_carries_them() {
        let start = |input: i64, output: i64| json!({ "type": "message_start", "message": { "usage": { "input_tokens": input, "output_tokens": output } } });
        let delta =
            |usage: Value| json!({ "type": "message_delta", "delta": { "stop_reason": "end_turn" }, "usage": usage });
        let counts = |usage: Usage| (usage.input_tokens, usage.output_tokens);
        // Anthropic: input in `message_start`, output in `message_delta`.
        assert_eq!(counts(usage_after(&[start(25, 1), delta(json!({ "output_tokens": 15 }))])), (25, 15));
        // LiteLLM: zeros first, the real counts at the end.
        let litellm = [start(0, 0), delta(json!({ "input_tokens": 25, "output_tokens": 15 }))];
        assert_eq!(counts(usage_after(&litellm)), (25, 15));
        // A cumulative count never goes down: a later placeholder 0 or null is no news.
        let placeholder = [start(25, 1), delta(json!({ "input_tokens": 0, "output_tokens": 15 }))];
        assert_eq!(counts(usage_after(&placeholder)), (25, 15));
        let null = [start(25, 1), delta(json!({ "input_tokens": null, "output_tokens": 15 }))];
        assert_eq!(counts(usage_after(&null)), (25, 15));
    }
}
