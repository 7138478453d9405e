//! Authentication: `Authorization: Bearer <api key>` on every `/v1` route. Missing,
//! malformed, unknown and revoked keys (and keys of disabled users) all answer the
//! same 401, so a caller learns nothing about which keys exist.

use std::sync::Arc;

use common::{apikey, db};
use poem::Request;
use poem_openapi::{auth::Bearer, SecurityScheme};
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: Uuid,
    pub role: String,
    pub tier: String,
    pub key_id: Uuid,
}

/// An Ultra API key (`ultra_…`), sent as a bearer token.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "ultra API key", checker = "authenticate")]
pub struct ApiKeyAuth(pub Principal);

async fn authenticate(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let state = req
        .data::<Arc<AppState>>()
        .ok_or_else(|| ApiError::Internal("application state missing from request".into()))?;
    let prefix = apikey::prefix_of(&bearer.token).ok_or(ApiError::Unauthorized)?;
    let key = db::api_keys::find_active(&state.pool, prefix).await.map_err(ApiError::from)?;
    let key = key.filter(|k| apikey::verify(&bearer.token, &k.key_hash)).ok_or(ApiError::Unauthorized)?;
    if let Err(err) = db::api_keys::touch(&state.pool, key.key_id).await {
        tracing::warn!(error = %err, "could not record API key use");
    }
    Ok(Principal { user_id: key.user_id, role: key.role, tier: key.tier, key_id: key.key_id })
}
