//! Cross-cutting HTTP layers: security headers, CORS and a request timeout.

use std::time::Duration;

use common::config::Environment;
use poem::{
    http::Method,
    middleware::{Cors, SetHeader},
    Endpoint, IntoResponse, Middleware, Request, Response, Result,
};

use crate::error::ApiError;

/// Headers every response carries. HSTS only in production, where TLS is assumed
/// in front of Ultra (announcing it over plain local HTTP would be a lie).
pub fn security_headers(environment: Environment) -> SetHeader {
    let headers = SetHeader::new()
        .overriding("X-Content-Type-Options", "nosniff")
        .overriding("X-Frame-Options", "DENY")
        .overriding("Referrer-Policy", "no-referrer")
        .overriding("Content-Security-Policy", "frame-ancestors 'none'")
        .overriding("Cross-Origin-Resource-Policy", "same-origin")
        // Responses are per-caller (jobs, tokens, keys): no shared cache may keep them.
        .overriding("Cache-Control", "no-store");
    match environment {
        Environment::Production => {
            headers.overriding("Strict-Transport-Security", "max-age=63072000; includeSubDomains")
        }
        Environment::Development => headers,
    }
}

/// CORS for an explicit list of origins; a preflight from any other origin is refused.
pub fn cors(origins: &[String]) -> Cors {
    origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
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
        match tokio::time::timeout(self.limit, self.inner.call(req)).await {
            Ok(result) => result.map(IntoResponse::into_response),
            Err(_) => Err(ApiError::Timeout.into()),
        }
    }
}
