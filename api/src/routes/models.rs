//! `GET /v1/models`: the catalog, and whether each model can be used now.

use std::sync::Arc;

use poem_openapi::{payload::Json, Object, OpenApi};

use crate::{auth::BearerAuth, error::ApiError, routes::ApiTags, state::AppState};

#[derive(Debug, Object)]
pub struct ModelView {
    /// The id to name in `models` of an analyze request.
    pub id: String,
    pub provider: String,
    /// The provider's own name for the model.
    pub upstream: String,
    pub description: String,
    /// Whether a job naming this model can run now.
    pub available: bool,
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
    #[oai(path = "/models", method = "get")]
    async fn list_models(&self, _auth: BearerAuth) -> Result<Json<ModelList>, ApiError> {
        let models = self
            .state
            .catalog
            .models()
            .iter()
            .map(|m| ModelView {
                id: m.id.clone(),
                provider: m.provider.clone(),
                upstream: m.upstream.clone(),
                description: m.description.clone(),
                // The mock provider runs in-process: it is always there.
                available: true,
            })
            .collect();
        Ok(Json(ModelList { models }))
    }
}
