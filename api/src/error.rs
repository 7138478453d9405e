//! The one place errors become HTTP responses: RFC 9457 `application/problem+json`
//! with a stable `type`, a short human message and, for validation failures, the
//! offending fields. 5xx errors are logged here with their cause; clients never see
//! internals or a stack trace.

use poem::{http::StatusCode, Response};
use poem_openapi::{
    registry::{MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::{ToJSON, Type},
    ApiResponse, Object,
};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// An RFC 9457 problem details document.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct Problem {
    /// Stable identifier of the problem type; clients switch on this.
    #[oai(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// For validation problems: each offending field and why.
    #[oai(skip_serializing_if_is_none)]
    pub errors: Option<Vec<FieldError>>,
}

impl poem_openapi::types::Example for Problem {
    fn example() -> Self {
        ApiError::validation(vec![FieldError::new("models[1]", "unknown model `mock/omega`")]).problem()
    }
}

/// One invalid field: a JSON path into the request (`prompt`, `models[2]`, `options.temperature`).
#[derive(Debug, Clone, PartialEq, Object)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing, malformed, unknown or revoked credentials")]
    Unauthorized,
    #[error("{0}")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    PayloadTooLarge(String, Option<FieldError>),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Conflict(String),
    /// Too many requests for a rate-limit policy; `retry_after` in whole seconds.
    #[error("rate limit `{policy}` exceeded; retry in {retry_after} s")]
    RateLimited { policy: &'static str, retry_after: u64 },
    #[error("{0}")]
    BudgetExceeded(String),
    #[error("{0}")]
    TooManyJobs(String),
    #[error("{0}")]
    TooManyStreams(String),
    /// Every model a job names is behind an open circuit breaker; `retry_after` is
    /// the soonest one's remaining cool-down, in whole seconds.
    #[error("{detail}")]
    ModelsUnavailable { detail: String, retry_after: u64 },
    #[error("the request took too long")]
    Timeout,
    #[error("a dependency is unavailable; retry shortly")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn validation(errors: Vec<FieldError>) -> Self {
        ApiError::Validation(errors)
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError::new(field, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. }
            | ApiError::BudgetExceeded(_)
            | ApiError::TooManyJobs(_)
            | ApiError::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ModelsUnavailable { .. } | ApiError::Timeout | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug_and_title(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => ("malformed-request", "Malformed request"),
            ApiError::Unauthorized => ("unauthorized", "Unauthorized"),
            ApiError::NotFound(_) => ("not-found", "Not found"),
            ApiError::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            ApiError::PayloadTooLarge(..) => ("payload-too-large", "Payload too large"),
            ApiError::UnsupportedMediaType(_) => ("unsupported-media-type", "Unsupported media type"),
            ApiError::Validation(_) => ("validation-error", "Validation failed"),
            ApiError::Forbidden(_) => ("forbidden", "Forbidden"),
            ApiError::Conflict(_) => ("conflict", "Conflict"),
            ApiError::RateLimited { .. } => ("rate-limited", "Too many requests"),
            ApiError::BudgetExceeded(_) => ("budget-exceeded", "Daily token budget exceeded"),
            ApiError::TooManyJobs(_) => ("concurrency-limit", "Too many jobs in progress"),
            ApiError::TooManyStreams(_) => ("stream-limit", "Too many open event streams"),
            ApiError::ModelsUnavailable { .. } => ("models-unavailable", "The models are unavailable"),
            ApiError::Timeout => ("timeout", "Request timed out"),
            ApiError::Unavailable(_) => ("service-unavailable", "Service unavailable"),
            ApiError::Internal(_) => ("internal-error", "Internal server error"),
        }
    }

    pub fn problem(&self) -> Problem {
        let (slug, title) = self.slug_and_title();
        let errors = match self {
            ApiError::Validation(errors) => Some(errors.clone()),
            ApiError::PayloadTooLarge(_, Some(field)) => Some(vec![field.clone()]),
            _ => None,
        };
        let detail = match self {
            ApiError::Validation(errors) => {
                errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ")
            }
            other => other.to_string(),
        };
        Problem {
            kind: format!("https://ultra.dev/problems/{slug}"),
            title: title.to_owned(),
            status: self.status().as_u16(),
            detail,
            errors,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            // The database is away or saturated: the client should retry, nothing is lost.
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
                ApiError::Unavailable(Box::new(err))
            }
            // Data exceptions (22: e.g. a NUL byte in text) come from client input.
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| c.starts_with("22")) => {
                ApiError::BadRequest("the request contains characters or values that cannot be stored".into())
            }
            // Connection exceptions (08), insufficient resources (53), shutting down (57P0x).
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57P0")) =>
            {
                ApiError::Unavailable(Box::new(err))
            }
            other => ApiError::Internal(Box::new(other)),
        }
    }
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        if self.status().is_server_error() {
            let source = std::error::Error::source(self).map(ToString::to_string).unwrap_or_default();
            tracing::error!(status = self.status().as_u16(), error = %self, cause = %source, "request failed");
        }
        let mut response = Response::builder()
            .status(self.status())
            .content_type(PROBLEM_CONTENT_TYPE)
            .body(self.problem().to_json_string());
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert("WWW-Authenticate", poem::http::HeaderValue::from_static("Bearer"));
        }
        let retry_after = match self {
            ApiError::RateLimited { retry_after, .. } | ApiError::ModelsUnavailable { retry_after, .. } => {
                Some(*retry_after)
            }
            // The budget renews at the next UTC midnight.
            ApiError::BudgetExceeded(_) => Some(seconds_until_utc_midnight()),
            // A dependency's outage is usually short; a client should come back soon.
            ApiError::Unavailable(_) | ApiError::Timeout => Some(2),
            // A slot frees when a job ends; poll gently.
            ApiError::TooManyJobs(_) | ApiError::TooManyStreams(_) => Some(5),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response.headers_mut().insert("Retry-After", poem::http::HeaderValue::from(seconds));
        }
        response
    }
}

fn seconds_until_utc_midnight() -> u64 {
    let now = chrono::Utc::now();
    let midnight = (now.date_naive() + chrono::Days::new(1)).and_hms_opt(0, 0, 0).map(|m| m.and_utc());
    midnight.map_or(3600, |m| (m - now).num_seconds().max(1) as u64)
}

/// Documents the problem responses an operation can return. Operations name their
/// own error type (`ApiError` documents every status it can take).
impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        let problem = |status: u16, description: &'static str| MetaResponse {
            description,
            status: Some(status),
            status_range: None,
            content: vec![MetaMediaType { content_type: PROBLEM_CONTENT_TYPE, schema: Problem::schema_ref() }],
            headers: vec![],
        };
        MetaResponses {
            responses: vec![
                problem(400, "Malformed request: invalid JSON or parameter (type `malformed-request`)."),
                problem(401, "Missing, malformed, unknown, expired or revoked credentials (type `unauthorized`)."),
                problem(403, "The caller may not do this (type `forbidden`)."),
                problem(404, "No such resource visible to the caller (type `not-found`)."),
                problem(409, "Conflicts with existing state, e.g. an email already registered (type `conflict`)."),
                problem(413, "Request body or prompt too large (type `payload-too-large`)."),
                problem(415, "Content-Type is not application/json (type `unsupported-media-type`)."),
                problem(422, "Well-formed but invalid; `errors` names each field (type `validation-error`)."),
                problem(
                    429,
                    "Rate limit (type `rate-limited`, with `Retry-After`), daily token budget \
                     (`budget-exceeded`), concurrent jobs (`concurrency-limit`) or open streams (`stream-limit`) exceeded.",
                ),
                problem(500, "An unexpected error; details are in the server log (type `internal-error`)."),
                problem(
                    503,
                    "A dependency is unavailable, the request timed out, or every model the job names is behind \
                     an open circuit breaker, with `Retry-After` (types `service-unavailable`, `timeout`, \
                     `models-unavailable`).",
                ),
            ],
        }
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

/// Turns any error escaping an endpoint — ours, poem's or poem-openapi's — into a
/// problem document, so not even a router 404 answers in plain text.
pub async fn into_problem(err: poem::Error) -> Response {
    use poem_openapi::error::{AuthorizationError, ContentTypeError, ParseParamError, ParsePathError};

    if let Some(api) = err.downcast_ref::<ApiError>() {
        return poem::error::ResponseError::as_response(api);
    }
    let api = if err.is::<AuthorizationError>() {
        ApiError::Unauthorized
    } else if err.is::<ParsePathError>() {
        // An id that cannot exist answers like one that does not.
        ApiError::NotFound("not found")
    } else if let Some(param) = err.downcast_ref::<ParseParamError>() {
        ApiError::BadRequest(format!("invalid parameter `{}`: {}", param.name, param.reason))
    } else if let Some(content_type) = err.downcast_ref::<ContentTypeError>() {
        ApiError::UnsupportedMediaType(format!("{content_type}; send application/json"))
    } else {
        match err.status() {
            StatusCode::NOT_FOUND => ApiError::NotFound("not found"),
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge("request body too large".into(), None),
            StatusCode::UNAUTHORIZED => ApiError::Unauthorized,
            StatusCode::FORBIDDEN => ApiError::Forbidden("forbidden"),
            status if status.is_client_error() => ApiError::BadRequest(err.to_string()),
            _ => ApiError::Internal(err.to_string().into()),
        }
    };
    poem::error::ResponseError::as_response(&api)
}
