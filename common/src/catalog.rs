//! The model catalog: which models a job may name and which provider serves each.
//! Until real providers are configured it holds the deterministic mock models.

use serde::Serialize;

/// One model a job may name, as `provider/name`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSpec {
    /// The id clients use, e.g. `mock/alpha`.
    pub id: String,
    /// Which provider implementation serves it.
    pub provider: String,
    /// The provider's own name for the model.
    pub upstream: String,
    pub description: String,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<ModelSpec>,
}

impl Catalog {
    /// The built-in catalog: three mock models with distinct, deterministic voices.
    pub fn builtin() -> Self {
        let mock = |name: &str, description: &str| ModelSpec {
            id: format!("mock/{name}"),
            provider: "mock".to_owned(),
            upstream: name.to_owned(),
            description: description.to_owned(),
        };
        Self {
            models: vec![
                mock("alpha", "Deterministic mock model for development and tests."),
                mock("beta", "Deterministic mock model with a different seed."),
                mock("gamma", "Deterministic mock model with a third seed."),
            ],
        }
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    pub fn get(&self, id: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.id == id)
    }
}
