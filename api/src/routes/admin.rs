//! Administration: only users with the `admin` role.

use std::sync::Arc;

use common::db;
use poem_openapi::{param::Path, payload::Json, Object, OpenApi};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    body::JsonBody,
    error::{ApiError, FieldError},
    routes::{auth::Account, ApiTags},
    state::AppState,
};

/// Fields an administrator may change; absent fields stay as they are.
#[derive(Debug, Deserialize, Object)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    /// A configured tier: `free`, `basic`, `premium`, `enterprise`, …
    pub tier: Option<String>,
    /// A disabled user's tokens and keys stop working at once.
    pub disabled: Option<bool>,
}

#[derive(Debug, Object)]
pub struct AdminUserView {
    #[oai(flatten)]
    pub account: Account,
    pub disabled: bool,
}

pub struct AdminApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1/admin", tag = "ApiTags::Admin")]
impl AdminApi {
    /// Change a user's tier or disable them
    #[oai(path = "/users/:id", method = "patch")]
    async fn update_user(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<UserUpdate>,
    ) -> Result<Json<AdminUserView>, ApiError> {
        if !auth.0.is_admin() {
            return Err(ApiError::Forbidden("administrators only"));
        }
        let update = body.0;
        if let Some(tier) = &update.tier {
            if self.state.tiers.get(tier).is_none() {
                let known: Vec<&str> = self.state.tiers.names().collect();
                return Err(ApiError::validation(vec![FieldError::new(
                    "tier",
                    format!("unknown tier `{tier}`; known: {}", known.join(", ")),
                )]));
            }
        }
        let user = db::users::update_admin(&self.state.pool, id.0, update.tier.as_deref(), update.disabled)
            .await?
            .ok_or(ApiError::NotFound("user not found"))?;
        tracing::info!(admin = %auth.0.user_id, user_id = %user.id, tier = %user.tier, disabled = user.disabled_at.is_some(), "user updated by an administrator");
        Ok(Json(AdminUserView {
            disabled: user.disabled_at.is_some(),
            account: Account {
                id: user.id,
                email: user.email,
                tier: user.tier,
                role: user.role,
                created_at: user.created_at,
            },
        }))
    }
}
