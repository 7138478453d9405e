//! `api_keys`: hashed API keys, found by their public prefix.

use sqlx::PgExecutor;
use uuid::Uuid;

/// The owner of an API key that is valid right now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActiveKey {
    pub key_id: Uuid,
    pub key_hash: Vec<u8>,
    pub user_id: Uuid,
    pub role: String,
    pub tier: String,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ActiveKey {
    /// Whether its use is worth recording (`touch`): at most once a minute, so
    /// authentication is not a write per request.
    pub fn use_is_stale(&self) -> bool {
        self.last_used_at.is_none_or(|at| chrono::Utc::now() - at > chrono::Duration::minutes(1))
    }
}

pub async fn insert(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    name: &str,
    prefix: &str,
    key_hash: &[u8],
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO api_keys (id, user_id, name, prefix, key_hash) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(user_id)
        .bind(name)
        .bind(prefix)
        .bind(key_hash)
        .execute(ex)
        .await?;
    Ok(id)
}

/// The unrevoked key with this prefix, if its owner is not disabled.
pub async fn find_active(ex: impl PgExecutor<'_>, prefix: &str) -> Result<Option<ActiveKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT k.id AS key_id, k.key_hash, u.id AS user_id, u.role, u.tier, k.last_used_at
           FROM api_keys k JOIN users u ON u.id = k.user_id
          WHERE k.prefix = $1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL",
    )
    .bind(prefix)
    .fetch_optional(ex)
    .await
}

/// Records a use, at most once a minute per key so authentication is not a write
/// per request.
pub async fn touch(ex: impl PgExecutor<'_>, key_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE api_keys SET last_used_at = now()
          WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(key_id)
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn revoke(ex: impl PgExecutor<'_>, key_id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
        .bind(key_id)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// A key as its owner sees it listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeySummary {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn list_live(ex: impl PgExecutor<'_>, user_id: Uuid) -> Result<Vec<KeySummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, prefix, created_at, last_used_at FROM api_keys
          WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at DESC",
    )
    .bind(user_id)
    .fetch_all(ex)
    .await
}

pub async fn count_live(ex: impl PgExecutor<'_>, user_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL")
        .bind(user_id)
        .fetch_one(ex)
        .await
}

/// Revokes the key if `user_id` owns it and it is live. Someone else's key and a
/// missing one look the same (false).
pub async fn revoke_owned(ex: impl PgExecutor<'_>, key_id: Uuid, user_id: Uuid) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL")
            .bind(key_id)
            .bind(user_id)
            .execute(ex)
            .await?;
    Ok(done.rows_affected() == 1)
}
