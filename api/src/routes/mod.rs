//! The HTTP surface, one module per resource.

pub mod analyze;
pub mod health;
pub mod jobs;
pub mod models;

use std::sync::Arc;

use poem_openapi::{OpenApiService, Tags};

use crate::state::AppState;

#[derive(Tags)]
pub enum ApiTags {
    /// Submit analysis jobs and follow them.
    Jobs,
    /// The model catalog.
    Models,
    /// Liveness and readiness probes.
    Health,
}

pub type Apis = (analyze::AnalyzeApi, jobs::JobsApi, models::ModelsApi, health::HealthApi);

/// The OpenAPI service: every route, documented.
pub fn service(state: Arc<AppState>) -> OpenApiService<Apis, ()> {
    let apis = (
        analyze::AnalyzeApi { state: state.clone() },
        jobs::JobsApi { state: state.clone() },
        models::ModelsApi { state: state.clone() },
        health::HealthApi { state },
    );
    OpenApiService::new(apis, "Ultra", env!("CARGO_PKG_VERSION")).description(
        "Ultra runs one prompt across several LLMs in the background and streams every step back. \
         Authenticate with `Authorization: Bearer <api key>`. Errors are RFC 9457 problem documents.",
    )
}
