//! `refresh_tokens`: opaque rotating refresh tokens, stored hashed, in families.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefreshToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub family_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub replaced_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub async fn insert(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    family_id: Uuid,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(user_id)
    .bind(family_id)
    .bind(token_hash)
    .bind(expires_at)
    .execute(ex)
    .await?;
    Ok(id)
}

/// The token with this hash, locked for the caller's transaction.
pub async fn find_for_update(conn: &mut PgConnection, token_hash: &[u8]) -> Result<Option<RefreshToken>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, user_id, family_id, expires_at, replaced_at, revoked_at FROM refresh_tokens
          WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(token_hash)
    .fetch_optional(conn)
    .await
}

pub async fn mark_replaced(ex: impl PgExecutor<'_>, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE refresh_tokens SET replaced_at = now() WHERE id = $1").bind(id).execute(ex).await?;
    Ok(())
}

/// Revokes every live token of a family (logout, or reuse of a rotated token).
pub async fn revoke_family(ex: impl PgExecutor<'_>, family_id: Uuid) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL")
        .bind(family_id)
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}
