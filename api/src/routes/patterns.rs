//! `GET /v1/patterns`: the analysis patterns and the stages each runs.

use std::sync::Arc;

use common::domain::Stage;
use poem_openapi::{payload::Json, Object, OpenApi};

use crate::{
    auth::BearerAuth,
    problems::{Problems, ALWAYS, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
};

#[derive(Debug, Object)]
pub struct PatternView {
    /// The name to give as `pattern` in an analyze request.
    pub name: String,
    pub description: String,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Object)]
pub struct PatternList {
    pub patterns: Vec<PatternView>,
}

pub struct PatternsApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Models")]
impl PatternsApi {
    /// List analysis patterns
    #[oai(path = "/patterns", method = "get", operation_id = "list_patterns")]
    async fn list_patterns(&self, _auth: BearerAuth) -> Result<Json<PatternList>, Problems<{ ALWAYS | UNAUTHORIZED }>> {
        let patterns = self
            .state
            .patterns
            .iter()
            .map(|(name, spec)| PatternView {
                name: name.to_owned(),
                description: spec.description.clone(),
                stages: spec.stages(),
            })
            .collect();
        Ok(Json(PatternList { patterns }))
    }
}
