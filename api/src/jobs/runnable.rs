//! Whether a job's models are a list it may name (`check_model_names`), and whether
//! they can run now: each has a key, and not all are behind an open circuit breaker.

use std::collections::HashMap;

use common::catalog::ModelSpec;

use crate::{
    error::{ApiError, FieldError},
    routes::models::availability,
    state::AppState,
};

/// The errors of a job's model list, reported at `field` (`models`, `ultra.models`):
/// none, too many for the caller's tier (`allowed`), a duplicate, an unknown id. Past
/// the count limit the names are not looked at: a long list of bogus names gets one
/// error, not one per name.
pub fn check_model_names(state: &AppState, field: &str, models: &[String], allowed: usize) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if models.is_empty() {
        errors.push(FieldError::new(field, "name at least one model"));
    } else if models.len() > allowed {
        errors.push(FieldError::new(field, format!("{} models named; at most {allowed} per job", models.len())));
        return errors;
    }
    let mut seen = HashMap::new();
    for (index, model) in models.iter().enumerate() {
        if let Some(first) = seen.insert(model.as_str(), index) {
            errors.push(FieldError::new(format!("{field}[{index}]"), format!("duplicate of {field}[{first}]")));
        } else if state.catalog.get(model).is_none() {
            errors.push(FieldError::new(
                format!("{field}[{index}]"),
                format!("unknown model `{model}`; see GET /v1/models"),
            ));
        }
    }
    errors
}

/// The error of a synthesis model named at `field`, if it is unknown or its provider
/// has no key. One outside the job's models makes one call, the synthesis (so it is
/// not counted in the tier's models per job); if it cannot, the job's models take over.
pub fn check_synthesis_model(state: &AppState, field: &str, model: &str) -> Option<FieldError> {
    match state.catalog.get(model) {
        None => Some(FieldError::new(field, format!("unknown model `{model}`; see GET /v1/models"))),
        Some(spec) if !state.catalog.has_key(&spec.provider) => Some(FieldError::new(
            field,
            format!("model `{model}` is not available: its provider `{}` has no API key configured", spec.provider),
        )),
        Some(_) => None,
    }
}

/// The error of a quorum named at `field`, if it is not between 1 and
/// `ULTRA_MAX_MODELS_PER_JOB`.
pub fn check_min_models(state: &AppState, field: &str, min: u32) -> Option<FieldError> {
    let most = state.config.max_models_per_job;
    (min == 0 || min as usize > most).then(|| FieldError::new(field, format!("must be between 1 and {most}")))
}

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
