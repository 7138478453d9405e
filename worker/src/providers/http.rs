//! What the HTTP providers share: a client that never follows redirects (base URLs
//! come only from operator configuration), error classification by status, and a
//! Server-Sent Events reader with an idle timeout (the parser is `common::sse`).

use std::time::Duration;

use common::sse::{ReadError, SseMessage};
use futures::{stream::BoxStream, StreamExt};
use reqwest::{header::HeaderMap, RequestBuilder, Response, StatusCode};

use super::ProviderError;

/// Longest a TCP (and TLS) connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `Retry-After` believed; a larger one is clamped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Most of an error body read to explain a failure.
const ERROR_BODY_LIMIT: usize = 16 * 1024;
/// Longest excerpt of a provider's own message that our errors keep (they are stored
/// with the step and shown to the user).
const EXCERPT_CHARS: usize = 200;
/// What replaces anything that looks like a credential.
const REDACTED: &str = "[redacted]";
/// Prefixes of keys providers issue: OpenAI and most compatible servers (`sk-`),
/// Google (`AIza`), AWS (`AKIA`), Groq (`gsk_`), Hugging Face (`hf_`), xAI (`xai-`),
/// GitHub (`ghp_`, `github_pat_`).
const KEY_PREFIXES: &[&str] = &["sk-", "sk_", "AIza", "AKIA", "gsk_", "hf_", "xai-", "ghp_", "github_pat_"];
/// Names whose value in `name=value` is a secret (a URL's `?key=`, `access_token=`).
const SECRET_NAMES: &[&str] = &["key", "token", "secret", "password", "signature"];

pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).connect_timeout(CONNECT_TIMEOUT).build()
}

/// One configured HTTP provider: where it is, its key, and its timeouts.
pub struct Endpoint {
    pub client: reqwest::Client,
    base_url: String,
    pub api_key: Option<String>,
    /// Longest wait for a response head, and the longest silence inside a stream.
    pub first_byte: Duration,
    /// A whole call's limit.
    pub total: Duration,
}

impl Endpoint {
    pub fn new(spec: &common::catalog::ProviderSpec) -> reqwest::Result<Self> {
        Ok(Self {
            client: client()?,
            base_url: spec.base_url.clone().unwrap_or_default().trim_end_matches('/').to_owned(),
            api_key: api_key(spec),
            first_byte: Duration::from_secs(spec.first_byte_timeout_secs),
            total: Duration::from_secs(spec.timeout_secs),
        })
    }

    /// `POST {base_url}{path}`.
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.client.post(format!("{}{path}", self.base_url))
    }

    /// The key, or `Auth` for a provider that needs one and has none.
    pub fn required_key(&self) -> Result<&str, ProviderError> {
        self.api_key.as_deref().ok_or(ProviderError::Auth)
    }

    /// Sends a streaming request and returns its events.
    pub async fn events(
        &self,
        request: RequestBuilder,
    ) -> Result<BoxStream<'static, Result<SseMessage, ProviderError>>, ProviderError> {
        Ok(sse(self.send(request, self.first_byte).await?, self.first_byte))
    }

    /// Sends, waiting at most `head_within` for the response head; errors never carry the key.
    pub async fn send(&self, request: RequestBuilder, head_within: Duration) -> Result<Response, ProviderError> {
        send(request, head_within).await.map_err(|e| e.redact(self.api_key.as_deref()))
    }
}

/// An API key from the environment variable a provider names, trimmed (a trailing
/// newline from a secrets file would make an invalid header).
pub fn api_key(spec: &common::catalog::ProviderSpec) -> Option<String> {
    let key = std::env::var(spec.api_key_env.as_ref()?).ok()?;
    Some(key.trim().to_owned()).filter(|k| !k.is_empty())
}

/// A header value that HTTP tooling must not print.
pub fn secret_header(value: &str) -> Result<reqwest::header::HeaderValue, ProviderError> {
    let mut value = reqwest::header::HeaderValue::from_str(value).map_err(|_| ProviderError::Auth)?;
    value.set_sensitive(true);
    Ok(value)
}

/// Sends a request and waits at most `first_byte` for the response head. A non-2xx
/// answer becomes the matching `ProviderError`.
pub async fn send(request: RequestBuilder, first_byte: Duration) -> Result<Response, ProviderError> {
    let response = match tokio::time::timeout(first_byte, request.send()).await {
        Err(_) => return Err(ProviderError::Timeout),
        Ok(Err(err)) => return Err(transport_error(err)),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = tokio::time::timeout(first_byte, read_limited(response)).await.unwrap_or_default();
    Err(classify(status, &headers, &body))
}

/// A transport failure, described without its URL (which may carry a key for some
/// providers' conventions; ours never do, but errors must not depend on that).
pub fn transport_error(err: reqwest::Error) -> ProviderError {
    if err.is_builder() {
        // A request we could not even build will not build next time either.
        ProviderError::BadRequest(err.without_url().to_string())
    } else if err.is_timeout() {
        ProviderError::Timeout
    } else if err.is_connect() {
        ProviderError::Connection(err.without_url().to_string())
    } else if err.is_body() || err.is_decode() {
        ProviderError::Truncated(err.without_url().to_string())
    } else {
        ProviderError::Connection(err.without_url().to_string())
    }
}

async fn read_limited(response: Response) -> String {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY_LIMIT {
            body.truncate(ERROR_BODY_LIMIT);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Maps an error status (and what the body says) to a provider error.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &str) -> ProviderError {
    let lower = body.to_ascii_lowercase();
    match status.as_u16() {
        // An exhausted billing quota is not a rate limit: waiting will not help.
        429 if lower.contains("insufficient_quota") => {
            ProviderError::BadRequest("the provider account is out of quota".into())
        }
        429 => ProviderError::RateLimited { retry_after: retry_after(headers) },
        401 | 403 => ProviderError::Auth,
        // Gemini answers an invalid key with 400 `API_KEY_INVALID`.
        400 if lower.contains("api_key_invalid") || lower.contains("api key not valid") => ProviderError::Auth,
        408 => ProviderError::Timeout,
        413 => ProviderError::ContextTooLong(body_excerpt(body)),
        400 | 404 | 422 if mentions_context_limit(&lower) => ProviderError::ContextTooLong(body_excerpt(body)),
        400 | 422 if lower.contains("content_filter") || lower.contains("safety") => ProviderError::ContentFiltered,
        500..=599 => ProviderError::Overloaded { status: status.as_u16(), detail: body_detail(body) },
        _ => ProviderError::BadRequest(format!("{status}: {}", body_excerpt(body))),
    }
}

fn mentions_context_limit(lower: &str) -> bool {
    [
        "context_length_exceeded",
        "maximum context length",
        "prompt is too long",
        "too many tokens",
        "context window",
        "exceeds the maximum number of tokens",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

/// The provider's own error message as an excerpt (see `excerpt`).
fn body_excerpt(body: &str) -> String {
    excerpt(&provider_message(body))
}

/// The message of an error body: the JSON error's message where there is one
/// (OpenAI and LiteLLM `error.message`, Anthropic `error.message`, Gemini
/// `error.message`; also a bare `message`, `error` or `detail` string), otherwise the
/// body itself (a proxy's HTML page, plain text).
fn provider_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let said = parsed.as_ref().and_then(|v| {
        ["/error/message", "/message", "/error", "/detail"]
            .iter()
            .find_map(|pointer| v.pointer(pointer).and_then(serde_json::Value::as_str))
    });
    said.unwrap_or(body).to_owned()
}

/// The provider's own error message as `Overloaded`'s detail, if it said anything.
fn body_detail(body: &str) -> Option<String> {
    let message = provider_message(body);
    detail(Some(message.as_str()))
}

/// A provider's message as the detail of an error: its excerpt, if it says anything.
pub fn detail(message: Option<&str>) -> Option<String> {
    message.map(excerpt).filter(|e| !e.is_empty())
}

/// A provider's own message, made safe to store with a step and show to its user:
/// one line (control and invisible characters dropped, whitespace collapsed),
/// anything that looks like a credential replaced by `[redacted]` — before it is cut
/// to `EXCERPT_CHARS`, so a cut cannot leave part of a key behind.
pub fn excerpt(message: &str) -> String {
    let visible: String =
        message.chars().filter(|c| !is_invisible(*c)).map(|c| if c.is_control() { ' ' } else { c }).collect();
    let line = visible.split_whitespace().collect::<Vec<_>>().join(" ");
    shorten(&redact_secrets(&line), EXCERPT_CHARS)
}

/// Format characters that change how text displays without showing (zero-width
/// spaces and joiners, bidirectional overrides, the byte-order mark).
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// At most `max` characters, the last an ellipsis when something was cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// Characters of a key or token: letters, digits, and what base64 (standard and
/// URL-safe) and key formats add. Anything else separates words.
fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '/' | '=')
}

/// `text` with every word that looks like a credential replaced by `[redacted]`: a
/// word after `Bearer` or `Basic`, a known key prefix, the value of `key=`,
/// `token=`…, and long runs of hex or of letters and digits.
fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let mut after_scheme = false;
    for c in text.chars() {
        if is_key_char(c) {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            push_word(&mut out, &word, after_scheme);
            after_scheme = is_auth_scheme(&word);
            word.clear();
        }
        out.push(c);
    }
    if !word.is_empty() {
        push_word(&mut out, &word, after_scheme);
    }
    out
}

/// `Authorization` schemes whose next word is the credential.
fn is_auth_scheme(word: &str) -> bool {
    word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic")
}

/// Appends `word`, or `[redacted]` in place of the secret it is or holds.
fn push_word(out: &mut String, word: &str, after_scheme: bool) {
    if after_scheme || looks_like_key(word) {
        out.push_str(REDACTED);
        return;
    }
    match word.split_once('=') {
        // Not base64 padding: a value follows the `=`.
        Some((name, value))
            if !value.trim_matches('=').is_empty() && (names_a_secret(name) || looks_like_key(value)) =>
        {
            out.push_str(name);
            out.push('=');
            out.push_str(REDACTED);
        }
        _ => out.push_str(word),
    }
}

fn names_a_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|secret| name.ends_with(secret))
}

/// A known key prefix with something after it; 32 or more hex digits; 32 or more
/// characters mixing upper case, lower case and digits (base64); or 40 or more
/// mixing letters and digits. Words, model names and UUIDs are none of these.
fn looks_like_key(word: &str) -> bool {
    let prefixed = KEY_PREFIXES.iter().any(|prefix| word.len() >= prefix.len() + 4 && word.starts_with(prefix));
    let hex = word.len() >= 32 && word.chars().all(|c| c.is_ascii_hexdigit());
    let base64 = word.len() >= 32
        && has(word, char::is_ascii_uppercase)
        && has(word, char::is_ascii_lowercase)
        && has(word, char::is_ascii_digit);
    let opaque = word.len() >= 40 && has(word, char::is_ascii_alphabetic) && has(word, char::is_ascii_digit);
    prefixed || hex || base64 || opaque
}

fn has(word: &str, class: fn(&char) -> bool) -> bool {
    word.chars().any(|c| class(&c))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_within(headers, MAX_RETRY_AFTER)
}

/// `Retry-After` as seconds or an HTTP date, clamped to `max`.
pub fn retry_after_within(headers: &HeaderMap, max: Duration) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<f64>() {
        // Clamped before converting: a huge value must not overflow (and panic).
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Duration::from_secs_f64(seconds.min(max.as_secs_f64())),
        Ok(_) => return None,
        Err(_) => {
            let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()?
        }
    };
    Some(wait.min(max))
}

/// The events of a streamed response, failing with `Timeout` if no byte arrives for
/// `idle`. The stream ends when the response does; deciding whether that was a proper
/// end is the provider's job.
pub fn sse(response: Response, idle: Duration) -> BoxStream<'static, Result<SseMessage, ProviderError>> {
    common::sse::read(response.bytes_stream().boxed(), idle)
        .map(|read| {
            read.map_err(|err| match err {
                ReadError::Idle => ProviderError::Timeout,
                ReadError::Broken(err) => ProviderError::Truncated(err.without_url().to_string()),
            })
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_retry_after_values_do_not_panic() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "1e20".parse().expect("header"));
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert("retry-after", "-3".parse().expect("header"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn a_server_error_keeps_the_providers_message() {
        let anthropic = r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#;
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new(), anthropic),
            ProviderError::Overloaded { status: 500, detail: Some("Internal server error".into()) }
        );
        let plain = "upstream timed out\n";
        assert_eq!(
            classify(StatusCode::GATEWAY_TIMEOUT, &HeaderMap::new(), plain).to_string(),
            "the provider is overloaded or failing (504): upstream timed out"
        );
    }

    #[test]
    fn excerpts_keep_words_model_names_and_ids() {
        let said = "model claude-3-5-sonnet-20241022 (request 123e4567-e89b-12d3-a456-426614174000) \
                    failed: max_tokens=4096 is too large; padding QUJD== is fine";
        assert_eq!(excerpt(said), said);
    }

    #[test]
    fn excerpts_redact_what_looks_like_a_credential() {
        for (said, shown) in [
            ("key sk-ant-api03-abcdEFGH1234 is invalid", "key [redacted] is invalid"),
            ("Authorization: Bearer 12345", "Authorization: Bearer [redacted]"),
            ("GET /v1/models?api_key=hunter2&page=2", "GET /v1/models?api_key=[redacted]&page=2"),
            ("digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "digest [redacted]"),
            ("token eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9 expired", "token [redacted] expired"),
        ] {
            assert_eq!(excerpt(said), shown);
        }
    }

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt("line\none\u{7}\u{202e}\ttwo  "), "line one two");
        let long = excerpt(&"word ".repeat(100));
        assert_eq!(long.chars().count(), EXCERPT_CHARS);
        assert!(long.ends_with('…'), "{long}");
    }

    #[test]
    fn statuses_are_classified() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "7".parse().expect("header"));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &headers, ""),
            ProviderError::RateLimited { retry_after: Some(Duration::from_secs(7)) }
        );
        let none = HeaderMap::new();
        assert_eq!(classify(StatusCode::UNAUTHORIZED, &none, ""), ProviderError::Auth);
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, &none, ""),
            ProviderError::Overloaded { status: 500, detail: None }
        );
        assert!(matches!(
            classify(
                StatusCode::BAD_REQUEST,
                &none,
                r#"{"error":{"code":"context_length_exceeded","message":"too long"}}"#
            ),
            ProviderError::ContextTooLong(_)
        ));
        assert!(
            matches!(classify(StatusCode::BAD_REQUEST, &none, r#"{"error":{"message":"bad"}}"#), ProviderError::BadRequest(m) if m.contains("bad"))
        );
    }
}
