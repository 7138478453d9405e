//! Whether a job's models can run now: each has a key, and not all are behind an open
//! circuit breaker.

use common::catalog::ModelSpec;

use crate::{
    error::{ApiError, FieldError},
    routes::models::availability,
    state::AppState,
};

/// Refuses what cannot run rather than accepting a job bound to fail: a model whose
/// provider has no key is a `422` naming it; a job whose every model is behind an
/// open circuit is a `503` with `Retry-After` (the soonest circuit's cool-down).
pub async fn check_models_can_run(state: &AppState, models: &[String]) -> Result<(), ApiError> {
    let specs: Vec<&ModelSpec> = models.iter().filter_map(|id| state.catalog.get(id)).collect();
    let availability = availability(state, &specs).await;
    let unavailable: Vec<FieldError> = specs
        .iter()
        .zip(&availability)
        .enumerate()
        .filter(|(_, (_, a))| !a.has_key)
        .map(|(index, (model, _))| {
            FieldError::new(
                format!("models[{index}]"),
                format!(
                    "model `{}` is not available: its provider `{}` has no API key configured",
                    model.id, model.provider
                ),
            )
        })
        .collect();
    if !unavailable.is_empty() {
        return Err(ApiError::validation(unavailable));
    }
    let soonest = availability
        .iter()
        .map(|a| a.circuit_open_for)
        .collect::<Option<Vec<_>>>()
        .and_then(|open| open.into_iter().min());
    if let Some(wait) = soonest {
        return Err(ApiError::ModelsUnavailable {
            detail: format!(
                "every model of this job is behind an open circuit breaker (its provider is failing); retry in {} s",
                wait.as_secs_f64().ceil() as u64
            ),
            retry_after: (wait.as_secs_f64().ceil() as u64).max(1),
        });
    }
    Ok(())
}
