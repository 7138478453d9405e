//! The HTTP surface, one module per resource.

pub mod admin;
pub mod analyze;
pub mod api_keys;
pub mod auth;
pub mod health;
pub mod jobs;
pub mod models;
pub mod patterns;
pub mod webhooks;

use std::sync::Arc;

use poem_openapi::{OpenApiService, Tags};

use crate::state::AppState;

#[derive(Tags)]
pub enum ApiTags {
    /// Submit analysis jobs and follow them.
    Jobs,
    /// The model catalog.
    Models,
    /// Accounts, tokens and API keys.
    Accounts,
    /// Webhooks: be told when a job or batch ends, signed as Standard Webhooks say.
    Webhooks,
    /// Administration (admins only).
    Admin,
    /// Liveness and readiness probes.
    Health,
    /// The OpenAI-compatible surface: set an OpenAI SDK's base URL to
    /// `http://host:8080/openai/v1`. Errors here are OpenAI's `{"error": {…}}`.
    #[oai(rename = "OpenAI")]
    OpenAi,
}

/// A page of a list fetched one row longer than `limit` (the extra row says another
/// page exists): the first `limit` rows, and the cursor of the next page.
pub fn paged<T>(mut rows: Vec<T>, limit: u32, id: impl Fn(&T) -> uuid::Uuid) -> (Vec<T>, Option<String>) {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(|row| id(row).to_string()) } else { None };
    (rows, next_cursor)
}

pub type Apis = (
    analyze::AnalyzeApi,
    jobs::JobsApi,
    models::ModelsApi,
    patterns::PatternsApi,
    auth::AuthApi,
    api_keys::ApiKeysApi,
    webhooks::WebhooksApi,
    admin::AdminApi,
    health::HealthApi,
    crate::openai::Apis,
);

/// The OpenAPI service: every route, documented.
pub fn service(state: Arc<AppState>) -> OpenApiService<Apis, ()> {
    let apis = (
        analyze::AnalyzeApi { state: state.clone() },
        jobs::JobsApi { state: state.clone() },
        models::ModelsApi { state: state.clone() },
        patterns::PatternsApi { state: state.clone() },
        auth::AuthApi { state: state.clone() },
        api_keys::ApiKeysApi { state: state.clone() },
        webhooks::WebhooksApi { state: state.clone() },
        admin::AdminApi { state: state.clone() },
        health::HealthApi { state: state.clone() },
        crate::openai::apis(&state),
    );
    OpenApiService::new(apis, "Ultra", env!("CARGO_PKG_VERSION")).description(
        "Ultra runs one prompt across several LLMs in the background and streams every step back. \
         Authenticate with `Authorization: Bearer <api key or access token>`. Errors are RFC 9457 \
         problem documents (`application/problem+json`) whose `type` is one of \
         `https://ultra.dev/problems/{malformed-request, unauthorized, forbidden, not-found, conflict, \
         payload-too-large, unsupported-media-type, validation-error, rate-limited, budget-exceeded, \
         concurrency-limit, stream-limit, internal-error, service-unavailable, timeout}`. Every response carries \
         `RateLimit-Policy` and `RateLimit` headers; a 429 carries `Retry-After`.",
    )
}
