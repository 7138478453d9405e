//! `GET /openai/v1/models` and `GET /openai/v1/models/{id}`: every catalog model, and
//! one virtual model per pattern, `ultra/<pattern>`, which runs that pattern.

use std::sync::Arc;

use poem::{
    handler,
    http::StatusCode,
    web::{Data, Json, Path},
    IntoResponse, Response,
};
use serde::Serialize;

use super::error;
use crate::state::AppState;

/// The prefix of the virtual models that run a pattern.
pub const PATTERN_PREFIX: &str = "ultra/";

/// OpenAI's model object.
#[derive(Debug, Serialize)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    /// When the model was made: unknown here, so the epoch.
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

fn model(id: impl Into<String>, owned_by: impl Into<String>) -> Model {
    Model { id: id.into(), object: "model", created: 0, owned_by: owned_by.into() }
}

/// Every model a chat completion may name, catalog models first.
fn all(state: &AppState) -> Vec<Model> {
    let catalog = state.catalog.models().map(|m| model(&m.id, &m.provider));
    let patterns = state.patterns.iter().map(|(name, _)| model(format!("{PATTERN_PREFIX}{name}"), "ultra"));
    catalog.chain(patterns).collect()
}

#[handler]
pub async fn list(Data(state): Data<&Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::to_value(ModelList { object: "list", data: all(state) }).unwrap_or_default())
}

/// The id is the rest of the path: model ids contain `/`, which some SDKs send as is.
#[handler]
pub async fn retrieve(Data(state): Data<&Arc<AppState>>, Path(id): Path<String>) -> Response {
    match all(state).into_iter().find(|m| m.id == id) {
        Some(found) => Json(serde_json::to_value(found).unwrap_or_default()).into_response(),
        None => not_found(&id),
    }
}

/// Whether a chat completion may name `id`.
pub fn exists(state: &AppState, id: &str) -> bool {
    state.catalog.get(id).is_some()
        || id.strip_prefix(PATTERN_PREFIX).is_some_and(|pattern| state.patterns.get(pattern).is_some())
}

/// OpenAI's answer for a model that does not exist.
pub fn not_found(id: &str) -> Response {
    let message = format!("The model `{id}` does not exist or you do not have access to it.");
    error::response(StatusCode::NOT_FOUND, "invalid_request_error", &message, Some("model"), Some("model_not_found"))
}
