//! Cross-cutting HTTP layers: security headers, CORS and a request timeout.

use std::time::Duration;

use common::{
    config::Environment,
    trace::{self, TraceContext},
};
use poem::{
    http::{HeaderValue, Method},
    middleware::Cors,
    Endpoint, IntoResponse, Middleware, Request, Response, Result,
};

use crate::error::ApiError;

/// Headers every response carries — errors included, which is why this layer also
/// turns errors into problem documents rather than leaving that to an outer layer.
/// HSTS only in production, where TLS is assumed in front of Ultra (announcing it
/// over plain local HTTP would be a lie).
pub struct SecurityHeaders(pub Environment);

const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-resource-policy", "same-origin"),
];

/// Defaults a response may set otherwise: the console's page and assets have their
/// own policy and caching (`console`).
const DEFAULT_HEADERS: [(&str, &str); 2] = [
    ("content-security-policy", "frame-ancestors 'none'"),
    // Responses are per caller (jobs, tokens, keys): no shared cache may keep them.
    ("cache-control", "no-store"),
];

impl<E: Endpoint> Middleware<E> for SecurityHeaders {
    type Output = SecurityHeadersEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        SecurityHeadersEndpoint { inner, hsts: self.0 == Environment::Production }
    }
}

pub struct SecurityHeadersEndpoint<E> {
    inner: E,
    hsts: bool,
}

impl<E: Endpoint> Endpoint for SecurityHeadersEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        let mut response = match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(err) => crate::error::into_problem(err).await,
        };
        let headers = response.headers_mut();
        for (name, value) in SECURITY_HEADERS {
            headers.insert(name, HeaderValue::from_static(value));
        }
        for (name, value) in DEFAULT_HEADERS {
            headers.entry(name).or_insert(HeaderValue::from_static(value));
        }
        if self.hsts {
            headers
                .insert("strict-transport-security", HeaderValue::from_static("max-age=63072000; includeSubDomains"));
        }
        Ok(response)
    }
}

/// CORS for an explicit, non-empty list of origins (poem reads an empty list as "any
/// origin", so the caller must not install this without one); a preflight from any
/// other origin is refused.
pub fn cors(origins: &[String]) -> Cors {
    origins
        .iter()
        .fold(Cors::new(), |cors, origin| cors.allow_origin(origin))
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers(["authorization", "content-type", "last-event-id"])
        .expose_headers(["location", "ratelimit", "ratelimit-policy", "retry-after"])
        .max_age(600)
}

/// Ends a request handler that runs too long with a 503. Streams are not cut: their
/// handler returns at once and the body flows afterwards.
pub struct RequestTimeout(pub Duration);

impl<E: Endpoint> Middleware<E> for RequestTimeout {
    type Output = TimeoutEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        TimeoutEndpoint { inner, limit: self.0 }
    }
}

pub struct TimeoutEndpoint<E> {
    inner: E,
    limit: Duration,
}

impl<E: Endpoint> Endpoint for TimeoutEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        // A chat completion waits for its job, which its deadline bounds.
        if req.uri().path() == crate::openai::CHAT_COMPLETIONS {
            return self.inner.call(req).await.map(IntoResponse::into_response);
        }
        match tokio::time::timeout(self.limit, self.inner.call(req)).await {
            Ok(result) => result.map(IntoResponse::into_response),
            Err(_) => Err(ApiError::Timeout.into()),
        }
    }
}

/// `X-Request-Id` and W3C `traceparent`. The request id is taken from the request
/// when it is a sane value (1 to 128 visible ASCII characters), generated otherwise,
/// and returned on the response. The trace continues the caller's `traceparent` or
/// starts a new one; the request's own span context goes into the request's data
/// (the submit handler stores it with the job's message). Both ids ride on a tracing
/// span around the request, so every log line of its work names them.
pub struct RequestContext;

impl<E: Endpoint> Middleware<E> for RequestContext {
    type Output = RequestContextEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        RequestContextEndpoint { inner }
    }
}

pub struct RequestContextEndpoint<E> {
    inner: E,
}

impl<E: Endpoint> Endpoint for RequestContextEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Response> {
        use tracing::Instrument;
        let given = req.headers().get("x-request-id").and_then(|v| v.to_str().ok());
        let id = given
            .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let parent = TraceContext::extract(&HttpHeaders(req.headers()));
        let span = tracing::info_span!(
            "request",
            request_id = %id,
            method = %req.method(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let context = common::telemetry::continue_trace(&span, parent);
        req.extensions_mut().insert(context);
        // The layer inside (`HttpMetrics`) has already turned any error into its
        // problem document.
        let mut response = self.inner.call(req).instrument(span).await?.into_response();
        if let Ok(value) = HeaderValue::from_str(&id) {
            response.headers_mut().insert("x-request-id", value);
        }
        Ok(response)
    }
}

/// A request's headers as the carrier OpenTelemetry's propagator reads `traceparent`
/// from.
struct HttpHeaders<'a>(&'a poem::http::HeaderMap);

impl trace::Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// A `405` names the methods its path takes (`Allow`, which RFC 9110 §15.5.6 requires),
/// from the served OpenAPI document.
pub struct AllowHeader(pub std::sync::Arc<crate::metrics::RouteTemplates>);

impl<E: Endpoint> Middleware<E> for AllowHeader {
    type Output = AllowHeaderEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        AllowHeaderEndpoint { inner, methods: self.0.clone() }
    }
}

pub struct AllowHeaderEndpoint<E> {
    inner: E,
    methods: std::sync::Arc<crate::metrics::RouteTemplates>,
}

impl<E: Endpoint> Endpoint for AllowHeaderEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        let uri = req.uri().clone(); // shares its bytes: no copy unless a 405 needs the path
        let mut response = self.inner.call(req).await?.into_response();
        if response.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED {
            if let Some(allowed) = self.methods.allowed(uri.path()).and_then(|m| HeaderValue::from_str(m).ok()) {
                response.headers_mut().insert(poem::http::header::ALLOW, allowed);
            }
        }
        Ok(response)
    }
}
