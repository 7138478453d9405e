//! Errors on `/openai/v1` in OpenAI's shape: `{"error": {"message", "type", "param",
//! "code"}}`, which the SDKs parse into their exception classes. Every error on the
//! surface — a handler's, the gate's 401 and 429, the router's 404 and 405 — is first
//! a problem document (`crate::error`); one middleware rewrites those under
//! `/openai/`, so no path can answer in the other surface's shape.

use poem::{http::StatusCode, Endpoint, IntoResponse, Middleware, Request, Response, Result};
use poem_openapi::{
    registry::{MetaMediaType, MetaResponses, Registry},
    types::{ParseFromJSON, ToJSON, Type},
    ApiResponse,
};

use super::objects::ErrorResponse;
use crate::{
    error::{ApiError, Problem, PROBLEM_CONTENT_TYPE},
    problems::Problems,
};

/// The paths the OpenAI-compatible surface serves.
pub const PREFIX: &str = "/openai/";

/// OpenAI's `type` and `code` for a problem type, and the status OpenAI would use.
fn translate(slug: &str, status: StatusCode) -> (StatusCode, &'static str, Option<&'static str>) {
    match slug {
        // OpenAI answers every invalid request with a 400.
        "validation-error" => (StatusCode::BAD_REQUEST, "invalid_request_error", Some("invalid_value")),
        "malformed-request" | "unsupported-media-type" => (status, "invalid_request_error", None),
        "payload-too-large" => (status, "invalid_request_error", Some("request_too_large")),
        "unauthorized" => (status, "invalid_request_error", Some("invalid_api_key")),
        "forbidden" => (status, "permission_error", None),
        "not-found" => (status, "invalid_request_error", Some("not_found")),
        "method-not-allowed" => (status, "invalid_request_error", Some("method_not_allowed")),
        "conflict" => (status, "invalid_request_error", Some("conflict")),
        "rate-limited" | "concurrency-limit" | "stream-limit" => (status, "requests", Some("rate_limit_exceeded")),
        "budget-exceeded" => (status, "insufficient_quota", Some("insufficient_quota")),
        "models-unavailable" | "service-unavailable" | "timeout" => (status, "server_error", Some("unavailable")),
        _ => (status, "server_error", None),
    }
}

/// An `ApiError` as OpenAI's status and error body (for a batch's error file).
pub fn of_api_error(err: &ApiError) -> (StatusCode, ErrorResponse) {
    of_problem(&err.problem(), err.status())
}

/// A problem document, answered with `status`, as OpenAI's status and error body.
fn of_problem(problem: &Problem, status: StatusCode) -> (StatusCode, ErrorResponse) {
    let slug = problem.kind.rsplit('/').next().unwrap_or_default();
    let (status, kind, code) = translate(slug, status);
    let param = problem.errors.as_ref().and_then(|errors| errors.first()).map(|e| e.field.as_str());
    (status, ErrorResponse::new(problem.detail.as_str(), kind, param, code))
}

/// An OpenAI-shaped error response.
pub fn response(status: StatusCode, body: &ErrorResponse) -> Response {
    Response::builder().status(status).content_type("application/json").body(body.to_json_string())
}

/// An operation's errors on `/openai/v1`, documented as OpenAI's: the statuses of
/// `Problems<CAN>` after `translate` (a 422 is OpenAI's 400), each with OpenAI's
/// error body, which the middleware below writes from the problem document.
#[derive(Debug)]
pub struct OpenAiProblems<const CAN: u32>(pub ApiError);

impl<const CAN: u32, E: Into<ApiError>> From<E> for OpenAiProblems<CAN> {
    fn from(err: E) -> Self {
        Self(err.into())
    }
}

impl<const CAN: u32> From<OpenAiProblems<CAN>> for poem::Error {
    fn from(problems: OpenAiProblems<CAN>) -> Self {
        problems.0.into()
    }
}

impl<const CAN: u32> ApiResponse for OpenAiProblems<CAN> {
    fn meta() -> MetaResponses {
        let mut meta = Problems::<CAN>::meta();
        for response in &mut meta.responses {
            if response.status == Some(400) || response.status == Some(422) {
                response.status = Some(400);
                response.description = "Malformed or invalid request: `param` names the field at fault.";
            }
            response.content =
                vec![MetaMediaType { content_type: "application/json", schema: ErrorResponse::schema_ref() }];
        }
        // Two 400s (malformed, invalid) are one in OpenAI's statuses.
        let mut seen = std::collections::BTreeSet::new();
        meta.responses.retain(|response| seen.insert(response.status));
        meta
    }

    fn register(registry: &mut Registry) {
        ErrorResponse::register(registry);
    }
}

/// Rewrites problem documents under `/openai/` into OpenAI's error shape, keeping the
/// status (a validation failure's 422 becomes OpenAI's 400) and every header
/// (`Retry-After`, the rate-limit headers, `WWW-Authenticate`).
pub struct OpenAiErrors;

impl<E: Endpoint> Middleware<E> for OpenAiErrors {
    type Output = OpenAiErrorsEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        OpenAiErrorsEndpoint { inner }
    }
}

pub struct OpenAiErrorsEndpoint<E> {
    inner: E,
}

impl<E: Endpoint> Endpoint for OpenAiErrorsEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        let ours = req.uri().path().starts_with(PREFIX);
        let answer = match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(err) => crate::error::into_problem(err).await,
        };
        let is_problem = answer.content_type().is_some_and(|t| t.starts_with(PROBLEM_CONTENT_TYPE));
        if !ours || !is_problem {
            return Ok(answer);
        }
        let (parts, body) = answer.into_parts();
        let json = serde_json::from_slice(&body.into_vec().await.unwrap_or_default()).ok();
        let (status, body) = match Problem::parse_from_json(json) {
            Ok(problem) => of_problem(&problem, parts.status),
            // Not ours to read: its status stands, in OpenAI's shape.
            Err(_) => {
                let (status, kind, code) = translate("", parts.status);
                (status, ErrorResponse::new("the request failed", kind, None, code))
            }
        };
        let mut rewritten = response(status, &body);
        for (name, value) in &parts.headers {
            if name != poem::http::header::CONTENT_TYPE && name != poem::http::header::CONTENT_LENGTH {
                rewritten.headers_mut().append(name.clone(), value.clone());
            }
        }
        Ok(rewritten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_type_has_an_openai_type() {
        let (status, kind, code) = translate("validation-error", StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!((status, kind, code), (StatusCode::BAD_REQUEST, "invalid_request_error", Some("invalid_value")));
        assert_eq!(translate("budget-exceeded", StatusCode::TOO_MANY_REQUESTS).1, "insufficient_quota");
        assert_eq!(translate("internal-error", StatusCode::INTERNAL_SERVER_ERROR).1, "server_error");
    }
}
