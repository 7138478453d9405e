//! `users`: accounts. Emails are stored normalised (trimmed, lower-case).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub tier: String,
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The one spelling of an email address Ultra stores and looks up.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

pub async fn create(ex: impl PgExecutor<'_>, email: &str, role: &str) -> Result<User, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO users (id, email, role) VALUES ($1, $2, $3)
         RETURNING id, email, role, tier, disabled_at, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(normalize_email(email))
    .bind(role)
    .fetch_one(ex)
    .await
}

pub async fn find_by_email(ex: impl PgExecutor<'_>, email: &str) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as("SELECT id, email, role, tier, disabled_at, created_at FROM users WHERE lower(email) = $1")
        .bind(normalize_email(email))
        .fetch_optional(ex)
        .await
}
