//! `GET /openai/v1/models` and `GET /openai/v1/models/{id}`: every catalog model, and
//! one virtual model per pattern, `ultra/<pattern>`, which runs that pattern.

use std::sync::Arc;

use poem::{handler, http::StatusCode, web::Data, Response};
use poem_openapi::{param::Path, payload::Json, ApiResponse, OpenApi};

use super::{
    error::{self, OpenAiProblems},
    objects::{ErrorResponse, ListTag, Model, ModelList, ModelTag},
};
use crate::{
    auth::BearerAuth,
    error::ApiError,
    problems::{ALWAYS, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
};

/// The prefix of the virtual models that run a pattern.
pub const PATTERN_PREFIX: &str = "ultra/";

fn model(id: impl Into<String>, owned_by: impl Into<String>) -> Model {
    Model { id: id.into(), object: ModelTag::Model, created: 0, owned_by: owned_by.into() }
}

/// Every model a chat completion may name, catalog models first.
fn all(state: &AppState) -> Vec<Model> {
    let catalog = state.catalog.models().map(|m| model(&m.id, &m.provider));
    let patterns = state.patterns.iter().map(|(name, _)| model(format!("{PATTERN_PREFIX}{name}"), "ultra"));
    catalog.chain(patterns).collect()
}

fn find(state: &AppState, id: &str) -> Option<Model> {
    if let Some(spec) = state.catalog.get(id) {
        return Some(model(&spec.id, &spec.provider));
    }
    let pattern = id.strip_prefix(PATTERN_PREFIX)?;
    state.patterns.get(pattern).map(|_| model(id, "ultra"))
}

pub struct ModelsApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/openai/v1", tag = "ApiTags::OpenAi")]
impl ModelsApi {
    /// List models (OpenAI)
    ///
    /// Every catalog model and one `ultra/<pattern>` model per pattern.
    #[oai(path = "/models", method = "get", operation_id = "openai_list_models")]
    async fn list(&self, _auth: BearerAuth) -> Result<Json<ModelList>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED }>> {
        Ok(Json(ModelList { object: ListTag::List, data: all(&self.state) }))
    }

    /// Retrieve a model (OpenAI)
    ///
    /// Model ids contain `/`: send it as `%2F` here; the SDKs' unencoded
    /// `/openai/v1/models/mock/alpha` is served too.
    #[oai(path = "/models/:id", method = "get", operation_id = "openai_retrieve_model")]
    async fn retrieve(
        &self,
        _auth: BearerAuth,
        id: Path<String>,
    ) -> Result<Retrieved, OpenAiProblems<{ ALWAYS | UNAUTHORIZED }>> {
        Ok(retrieved(&self.state, &id))
    }
}

#[derive(ApiResponse)]
pub enum Retrieved {
    #[oai(status = 200)]
    Found(Json<Model>),
    /// No model has that id (code `model_not_found`).
    #[oai(status = 404)]
    Missing(Json<ErrorResponse>),
}

fn retrieved(state: &AppState, id: &str) -> Retrieved {
    match find(state, id) {
        Some(found) => Retrieved::Found(Json(found)),
        None => Retrieved::Missing(Json(missing(id))),
    }
}

/// `GET /openai/v1/models/{owner}/{rest}`: a model id sent with its `/` unencoded, as
/// some SDKs send it; the same answer as the documented operation.
#[handler]
pub async fn retrieve_unencoded(
    req: &poem::Request,
    Data(state): Data<&Arc<AppState>>,
    poem::web::Path((owner, rest)): poem::web::Path<(String, String)>,
) -> poem::Result<Retrieved> {
    if req.extensions().get::<crate::auth::Principal>().is_none() {
        return Err(ApiError::Unauthorized.into());
    }
    Ok(retrieved(state, &format!("{owner}/{rest}")))
}

/// Whether a chat completion may name `id`.
pub fn exists(state: &AppState, id: &str) -> bool {
    find(state, id).is_some()
}

/// OpenAI's error for a model that does not exist.
fn missing(id: &str) -> ErrorResponse {
    let message = format!("The model `{id}` does not exist or you do not have access to it.");
    ErrorResponse::new(message, "invalid_request_error", Some("model"), Some("model_not_found"))
}

/// OpenAI's answer for a model that does not exist.
pub fn not_found(id: &str) -> Response {
    error::response(StatusCode::NOT_FOUND, &missing(id))
}
