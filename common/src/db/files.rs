//! `files`: what a user uploaded for batches, and what batches wrote back.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

/// A file without its content.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileInfo {
    pub id: Uuid,
    pub user_id: Uuid,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub created_at: DateTime<Utc>,
}

const INFO: &str = "id, user_id, purpose, filename, bytes, created_at";

pub async fn insert(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    purpose: &str,
    filename: &str,
    content: &[u8],
) -> Result<FileInfo, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO files (id, user_id, purpose, filename, bytes, content) VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING {INFO}"
    ))
    .bind(Uuid::now_v7())
    .bind(user_id)
    .bind(purpose)
    .bind(filename)
    .bind(content.len() as i64)
    .bind(content)
    .fetch_one(ex)
    .await
}

/// The file if `user_id` owns it: someone else's and a missing one look the same.
pub async fn get_owned(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<Option<FileInfo>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {INFO} FROM files WHERE id = $1 AND user_id = $2"))
        .bind(id)
        .bind(user_id)
        .fetch_optional(ex)
        .await
}

pub async fn content_owned(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar("SELECT content FROM files WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user_id)
        .fetch_optional(ex)
        .await
}

/// A page of the user's files, newest first, after the id `after`.
pub async fn list_owned(
    ex: impl PgExecutor<'_>,
    user_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<FileInfo>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {INFO} FROM files WHERE user_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
    ))
    .bind(user_id)
    .bind(after)
    .bind(limit)
    .fetch_all(ex)
    .await
}

/// Whether the user's file existed (and is now gone).
pub async fn delete_owned(ex: impl PgExecutor<'_>, id: Uuid, user_id: Uuid) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM files WHERE id = $1 AND user_id = $2").bind(id).bind(user_id).execute(ex).await?;
    Ok(done.rows_affected() > 0)
}
