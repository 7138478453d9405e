//! Self-service API keys: create (shown once), list, revoke.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::{apikey, db};
use poem_openapi::{param::Path, payload::Json, ApiResponse, Object, OpenApi};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    auth::{BearerAuth, Credential},
    body::JsonBody,
    error::{ApiError, FieldError},
    problems::{Problems, ALWAYS, BODY, CONFLICT, FORBIDDEN, NOT_FOUND, UNAUTHORIZED},
    routes::{auth::NoContent, ApiTags},
    state::AppState,
};

const MAX_NAME_CHARS: usize = 100;
/// Live keys one user may hold.
const MAX_KEYS_PER_USER: i64 = 50;

#[derive(Debug, Deserialize, Object)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// A label to recognise the key by, 1 to 100 characters.
    pub name: String,
}

#[derive(Debug, Object)]
pub struct CreatedApiKey {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    /// The key itself: shown this once, never again. Store it now.
    pub key: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Object)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub name: String,
    /// The public part of the key, to recognise it by.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Object)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

#[derive(ApiResponse)]
pub enum CreateKeyResponse {
    #[oai(status = 201)]
    Created(Json<CreatedApiKey>),
}

pub struct ApiKeysApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Accounts")]
impl ApiKeysApi {
    /// Create an API key
    ///
    /// Needs an access token (not an API key), so a leaked key cannot mint more.
    #[oai(path = "/api-keys", method = "post", operation_id = "create_key")]
    async fn create_key(
        &self,
        auth: BearerAuth,
        body: JsonBody<NewApiKey>,
    ) -> Result<CreateKeyResponse, Problems<{ ALWAYS | UNAUTHORIZED | FORBIDDEN | CONFLICT | BODY }>> {
        // A leaked key must not be able to mint its own replacements.
        if auth.0.credential != Credential::AccessToken {
            return Err(ApiError::Forbidden("creating API keys needs an access token from /v1/auth/login").into());
        }
        let name = body.0.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.contains('\0') {
            return Err(ApiError::validation(vec![FieldError::new("name", "must be 1 to 100 characters")]).into());
        }
        let pool = &self.state.pool;
        if db::api_keys::count_live(pool, auth.0.user_id).await? >= MAX_KEYS_PER_USER {
            return Err(
                ApiError::Conflict(format!("at most {MAX_KEYS_PER_USER} live API keys; revoke one first")).into()
            );
        }
        let key = apikey::generate();
        let id = db::api_keys::insert(pool, auth.0.user_id, &name, &key.prefix, &key.hash).await?;
        Ok(CreateKeyResponse::Created(Json(CreatedApiKey {
            id,
            name,
            prefix: key.prefix,
            key: key.secret,
            created_at: Utc::now(),
        })))
    }

    /// List API keys
    ///
    /// The caller's live keys: never the key itself or its hash.
    #[oai(path = "/api-keys", method = "get", operation_id = "list_keys")]
    async fn list_keys(&self, auth: BearerAuth) -> Result<Json<ApiKeyList>, Problems<{ ALWAYS | UNAUTHORIZED }>> {
        let keys = db::api_keys::list_live(&self.state.pool, auth.0.user_id).await?;
        let api_keys = keys
            .into_iter()
            .map(|k| ApiKeyView {
                id: k.id,
                name: k.name,
                prefix: k.prefix,
                created_at: k.created_at,
                last_used_at: k.last_used_at,
            })
            .collect();
        Ok(Json(ApiKeyList { api_keys }))
    }

    /// Revoke an API key
    ///
    /// Takes effect at once. Another user's key id answers 404.
    #[oai(path = "/api-keys/:id", method = "delete", operation_id = "revoke_key")]
    async fn revoke_key(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<NoContent, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        if db::api_keys::revoke_owned(&self.state.pool, id.0, auth.0.user_id).await? {
            Ok(NoContent::Done)
        } else {
            Err(ApiError::NotFound("API key not found").into())
        }
    }
}
