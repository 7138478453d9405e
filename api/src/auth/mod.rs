//! Authentication. Either credential goes in `Authorization: Bearer …`: an API key
//! (`ultra_…`) or a JWT access token from `POST /v1/auth/login`. The `authenticate`
//! middleware resolves it once per request — checking the user is not disabled, so
//! disabling takes effect at once — and the `BearerAuth` scheme hands the result to
//! the operation. Every failure is the same 401: a caller learns nothing about which
//! keys, tokens or users exist.

pub mod jwt;
pub mod lookups;
pub mod middleware;
pub mod password;
pub mod refresh;
pub mod session_cookie;
pub mod ticket;

use std::sync::Arc;

use common::{apikey, db};
use poem::Request;
use poem_openapi::{auth::Bearer, SecurityScheme};
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

/// Which credential a request came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    ApiKey(Uuid),
    AccessToken,
    /// A single-use stream ticket; good for one job's event stream only.
    StreamTicket(Uuid),
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: Uuid,
    pub role: String,
    pub tier: String,
    pub credential: Credential,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }
}

/// An Ultra API key (`ultra_…`) or a JWT access token, as a bearer token.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "API key or JWT", checker = "resolved_principal")]
pub struct BearerAuth(pub Principal);

/// The principal the middleware resolved for this request.
async fn resolved_principal(req: &Request, _bearer: Bearer) -> poem::Result<Principal> {
    req.extensions().get::<Principal>().cloned().ok_or_else(|| ApiError::Unauthorized.into())
}

/// Resolves a bearer token to its principal. `Unauthorized` for anything invalid;
/// `Unavailable` only when the database cannot answer.
pub async fn authenticate(state: &Arc<AppState>, token: &str) -> Result<Principal, ApiError> {
    if token.starts_with(apikey::KEY_PREFIX) {
        let prefix = apikey::prefix_of(token).ok_or(ApiError::Unauthorized)?;
        let key = db::api_keys::find_active(&state.pool, prefix).await?;
        let key = key.filter(|k| apikey::verify(token, &k.key_hash)).ok_or(ApiError::Unauthorized)?;
        if key.use_is_stale() {
            if let Err(err) = db::api_keys::touch(&state.pool, key.key_id).await {
                tracing::warn!(error = %err, "could not record API key use");
            }
        }
        return Ok(Principal {
            user_id: key.user_id,
            role: key.role,
            tier: key.tier,
            credential: Credential::ApiKey(key.key_id),
        });
    }
    let user_id = state.jwt.verify(token).map_err(|_| ApiError::Unauthorized)?;
    let user = db::users::get(&state.pool, user_id).await?.ok_or(ApiError::Unauthorized)?;
    if user.disabled_at.is_some() {
        return Err(ApiError::Unauthorized);
    }
    Ok(Principal { user_id: user.id, role: user.role, tier: user.tier, credential: Credential::AccessToken })
}

/// Whether checking `token` means a database lookup: a well-formed API key (its
/// checksum holds) or a JWT whose signature and claims verify. Anything else is refused
/// on the CPU alone, and is no threat to the pool.
pub fn needs_lookup(state: &AppState, token: &str) -> bool {
    if token.starts_with(apikey::KEY_PREFIX) {
        apikey::prefix_of(token).is_some()
    } else {
        state.jwt.verify(token).is_ok()
    }
}

/// Resolves `?ticket=` on `GET /v1/jobs/{id}/events` to the user it was issued to.
pub async fn authenticate_ticket(state: &Arc<AppState>, ticket: &str, job_id: Uuid) -> Result<Principal, ApiError> {
    let redeemed = ticket::redeem(&state.redis, &state.config.redis_prefix, ticket, job_id).await;
    // Without Redis no ticket can be told good or bad: unavailable, not unauthorized.
    let user_id = redeemed.map_err(|e| ApiError::Unavailable(Box::new(e)))?.ok_or(ApiError::Unauthorized)?;
    let user = db::users::get(&state.pool, user_id).await?.filter(|u| u.disabled_at.is_none());
    let user = user.ok_or(ApiError::Unauthorized)?;
    Ok(Principal { user_id: user.id, role: user.role, tier: user.tier, credential: Credential::StreamTicket(job_id) })
}
