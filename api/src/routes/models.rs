//! `GET /v1/models`: the catalog, and whether each model can be used now.

use std::{sync::Arc, time::Duration};

use common::catalog::{circuit_key, ModelSpec};
use poem_openapi::{payload::Json, Object, OpenApi};

use crate::{
    auth::BearerAuth,
    problems::{Problems, ALWAYS, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
};

#[derive(Debug, Object)]
pub struct ModelView {
    /// The id to name in `models` of an analyze request.
    pub id: String,
    pub provider: String,
    /// The provider's own name for the model.
    pub upstream: String,
    pub description: String,
    /// Whether a job naming this model can run now: its provider's key is configured
    /// and its circuit breaker is closed.
    pub available: bool,
    /// US dollars per million input tokens.
    pub input_price_per_mtok: f64,
    /// US dollars per million output tokens.
    pub output_price_per_mtok: f64,
    pub context_window: u32,
    pub max_output_tokens: u32,
}

#[derive(Debug, Object)]
#[oai(example)]
pub struct ModelList {
    pub models: Vec<ModelView>,
}

impl poem_openapi::types::Example for ModelList {
    fn example() -> Self {
        let model = ModelView {
            id: "mock/alpha".to_owned(),
            provider: "mock".to_owned(),
            upstream: "alpha".to_owned(),
            description: "Deterministic mock model for development and tests.".to_owned(),
            available: true,
            input_price_per_mtok: 0.0,
            output_price_per_mtok: 0.0,
            context_window: 128_000,
            max_output_tokens: 4_096,
        };
        Self { models: vec![model] }
    }
}

pub struct ModelsApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Models")]
impl ModelsApi {
    /// List models
    #[oai(path = "/models", method = "get", operation_id = "list_models")]
    async fn list_models(&self, _auth: BearerAuth) -> Result<Json<ModelList>, Problems<{ ALWAYS | UNAUTHORIZED }>> {
        let state = &self.state;
        let models: Vec<&ModelSpec> = state.catalog.models().collect();
        let availability = availability(state, &models).await;
        let models = models
            .into_iter()
            .zip(availability)
            .map(|(m, availability)| ModelView {
                id: m.id.clone(),
                provider: m.provider.clone(),
                upstream: m.upstream.clone(),
                description: m.description.clone(),
                available: availability.is_available(),
                input_price_per_mtok: m.input_price_per_mtok,
                output_price_per_mtok: m.output_price_per_mtok,
                context_window: m.context_window,
                max_output_tokens: m.max_output_tokens,
            })
            .collect();
        Ok(Json(ModelList { models }))
    }
}

/// Whether a model can be called now, as every api replica sees it.
#[derive(Debug, Clone, Copy)]
pub struct Availability {
    /// The provider's key is configured (the mock needs none).
    pub has_key: bool,
    /// The provider's circuit breaker is open for this much longer (shared through Redis).
    pub circuit_open_for: Option<Duration>,
}

impl Availability {
    pub fn is_available(&self) -> bool {
        self.has_key && self.circuit_open_for.is_none()
    }
}

/// The availability of each of `models`, in order: one Redis round trip for all.
pub async fn availability(state: &AppState, models: &[&ModelSpec]) -> Vec<Availability> {
    let circuit_keys: Vec<String> =
        models.iter().map(|m| circuit_key(&state.config.redis_prefix, &m.provider)).collect();
    let open_for = state.redis.remaining_ttls(&circuit_keys).await;
    models
        .iter()
        .zip(open_for)
        .map(|(m, circuit_open_for)| Availability { has_key: state.catalog.has_key(&m.provider), circuit_open_for })
        .collect()
}
