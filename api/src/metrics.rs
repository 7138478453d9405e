//! HTTP metrics and the api's `/metrics` endpoint.
//!
//! Requests are labelled by route template (`/v1/jobs/{id}`), never by raw path: a
//! path is matched against the templates of the OpenAPI document, and anything else
//! is `unmatched`, so a scanner probing random URLs cannot grow the label set.

use std::{sync::Arc, time::Instant};

use poem::{
    handler,
    http::{header, StatusCode},
    web::Data,
    Endpoint, IntoResponse, Middleware, Request, Response, Result,
};

use crate::{queues::QueuesSnapshot, state::AppState};

/// Route templates, split into segments (`None` matches any one segment), each with
/// the methods it takes: request labels here, and the `Allow` of a `405`.
#[derive(Debug, Default)]
pub struct RouteTemplates(Vec<Route>);

#[derive(Debug)]
struct Route {
    template: String,
    segments: Vec<Option<String>>,
    /// `GET, POST`, …: the `Allow` header's value.
    methods: String,
}

impl RouteTemplates {
    /// From the OpenAPI document's `paths`, plus routes outside it (which answer `GET`).
    /// The documented routes and `extra` ones (template, methods) served beside them.
    pub fn from_spec(spec_json: &str, extra: &[(&str, &str)]) -> Self {
        let spec: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
        let documented = spec["paths"].as_object().into_iter().flatten().map(|(template, operations)| {
            let mut methods: Vec<String> =
                operations.as_object().into_iter().flatten().map(|(m, _)| m.to_ascii_uppercase()).collect();
            methods.sort();
            (template.clone(), methods.join(", "))
        });
        let routes = documented
            .chain(extra.iter().map(|(template, methods)| ((*template).to_owned(), (*methods).to_owned())))
            .map(|(template, methods)| {
                let segments = template
                    .split('/')
                    .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
                    .collect();
                Route { template, segments, methods }
            })
            .collect();
        Self(routes)
    }

    /// The route a path matches: literal segments win over parameters.
    fn route(&self, path: &str) -> Option<&Route> {
        let segments = path.split('/').count();
        self.0
            .iter()
            .filter(|route| {
                route.segments.len() == segments
                    && route.segments.iter().zip(path.split('/')).all(|(t, s)| t.as_deref().is_none_or(|t| t == s))
            })
            .max_by_key(|route| route.segments.iter().filter(|t| t.is_some()).count())
    }

    /// The template a path matches, or `unmatched`.
    pub fn label(&self, path: &str) -> &str {
        self.route(path).map_or("unmatched", |route| route.template.as_str())
    }

    /// The methods the path takes (`Allow`), if it is a route.
    pub fn allowed(&self, path: &str) -> Option<&str> {
        self.route(path).map(|route| route.methods.as_str())
    }
}

/// Counts and times every request by method, route template and status, and logs it
/// (inside the request's span, so with its request and trace ids). The log names the
/// route template and never the query string, which may carry a stream ticket.
pub struct HttpMetrics(pub Arc<RouteTemplates>);

impl<E: Endpoint> Middleware<E> for HttpMetrics {
    type Output = HttpMetricsEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        HttpMetricsEndpoint { inner, routes: self.0.clone() }
    }
}

pub struct HttpMetricsEndpoint<E> {
    inner: E,
    routes: Arc<RouteTemplates>,
}

impl<E: Endpoint> Endpoint for HttpMetricsEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        let started = Instant::now();
        let route = self.routes.label(req.uri().path()).to_owned();
        let method = method_label(req.method()).to_owned();
        let response = match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(err) => crate::error::into_problem(err).await,
        };
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        if response.status().is_server_error() {
            tracing::warn!(%method, %route, status, latency_ms = elapsed.as_secs_f64() * 1e3, "request failed");
        } else {
            tracing::info!(%method, %route, status, latency_ms = elapsed.as_secs_f64() * 1e3, "request served");
        }
        let status = status.to_string();
        let labels = [("method", method), ("route", route)];
        metrics::histogram!(common::metrics::HTTP_DURATION, &labels).record(elapsed.as_secs_f64());
        let [method, route] = labels;
        metrics::counter!(common::metrics::HTTP_REQUESTS, &[method, route, ("status", status)]).increment(1);
        Ok(response)
    }
}

/// The standard methods by name, anything else (extension methods are unbounded) as
/// `other`.
fn method_label(method: &poem::http::Method) -> &'static str {
    use poem::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `GET /metrics`: the Prometheus text format, with the queue gauges sampled now.
/// When `ULTRA_METRICS_TOKEN` is set, the scraper must send it as a bearer token.
#[handler]
pub async fn endpoint(req: &Request, state: Data<&Arc<AppState>>) -> Response {
    if !common::metrics::authorized(
        state.config.metrics_token.as_deref(),
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()),
    ) {
        return poem::error::ResponseError::as_response(&crate::error::ApiError::Unauthorized);
    }
    let sampled = tokio::time::timeout(SAMPLE_TIMEOUT, QueuesSnapshot::take(&state)).await;
    match sampled {
        Ok(Ok(snapshot)) => snapshot.record(),
        Ok(Err(err)) => tracing::warn!(error = %err, "metrics: cannot sample the queues"),
        Err(_) => tracing::warn!("metrics: sampling the queues timed out"),
    }
    common::metrics::render()
        .with_content_type(common::metrics::CONTENT_TYPE)
        .with_status(StatusCode::OK)
        .into_response()
}

/// A scrape must answer even when a dependency hangs; stale gauges beat no metrics.
const SAMPLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_bounded_templates() {
        let spec =
            r#"{"paths": {"/v1/jobs": {}, "/v1/jobs/{id}": {}, "/v1/jobs/{id}/events": {}, "/v1/auth/login": {}}}"#;
        let routes = RouteTemplates::from_spec(spec, &[("/metrics", "GET")]);
        assert_eq!(routes.label("/v1/jobs"), "/v1/jobs");
        assert_eq!(routes.label("/v1/jobs/0190f6c1-aaaa-7000-8000-000000000000"), "/v1/jobs/{id}");
        assert_eq!(routes.label("/v1/jobs/x/events"), "/v1/jobs/{id}/events");
        assert_eq!(routes.label("/v1/auth/login"), "/v1/auth/login");
        assert_eq!(routes.label("/metrics"), "/metrics");
        assert_eq!(routes.label("/wp-admin/setup.php"), "unmatched");
        assert_eq!(routes.label("/v1/jobs/x/y/z"), "unmatched");
    }

    #[test]
    fn a_route_knows_its_methods() {
        let spec = r#"{"paths": {"/v1/jobs/{id}": {"get": {}, "delete": {}}, "/v1/jobs": {"get": {}}}}"#;
        let routes = RouteTemplates::from_spec(spec, &[("/metrics", "GET")]);
        assert_eq!(routes.allowed("/v1/jobs/0190"), Some("DELETE, GET"));
        assert_eq!(routes.allowed("/v1/jobs"), Some("GET"));
        assert_eq!(routes.allowed("/metrics"), Some("GET"));
        assert_eq!(routes.allowed("/v2/jobs"), None);
    }

    #[test]
    fn extension_methods_share_one_label() {
        let custom = poem::http::Method::from_bytes(b"FOO1").expect("a valid token");
        assert_eq!(method_label(&custom), "other");
        assert_eq!(method_label(&poem::http::Method::PATCH), "PATCH");
    }
}
