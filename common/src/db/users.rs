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

/// Whether a (normalised) string can be an email address: `local@domain.tld`, no spaces.
pub fn is_plausible_email(email: &str) -> bool {
    email.chars().count() <= 254
        && !email.contains(|c: char| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && !domain.contains('@') && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.'))
}

/// The one spelling of an email address Ultra stores and looks up.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

const COLUMNS: &str = "id, email, role, tier, disabled_at, created_at";

pub async fn create(ex: impl PgExecutor<'_>, email: &str, role: &str) -> Result<User, sqlx::Error> {
    create_with_password(ex, email, role, None).await
}

/// Creates a user; `password_hash` is an Argon2id PHC string.
pub async fn create_with_password(
    ex: impl PgExecutor<'_>,
    email: &str,
    role: &str,
    password_hash: Option<&str>,
) -> Result<User, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO users (id, email, role, password_hash) VALUES ($1, $2, $3, $4) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(normalize_email(email))
    .bind(role)
    .bind(password_hash)
    .fetch_one(ex)
    .await
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM users WHERE id = $1")).bind(id).fetch_optional(ex).await
}

/// The user and their password hash, for login.
pub async fn find_credentials(
    ex: impl PgExecutor<'_>,
    email: &str,
) -> Result<Option<(User, Option<String>)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: User,
        password_hash: Option<String>,
    }
    let row: Option<Row> =
        sqlx::query_as(&format!("SELECT {COLUMNS}, password_hash FROM users WHERE lower(email) = $1"))
            .bind(normalize_email(email))
            .fetch_optional(ex)
            .await?;
    Ok(row.map(|r| (r.user, r.password_hash)))
}

/// Users, newest first, from before `before` (an id), whose email contains `email`.
pub async fn list(
    ex: impl PgExecutor<'_>,
    email: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<User>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM users
          WHERE ($1::text IS NULL OR strpos(email, $1) > 0)
            AND ($2::uuid IS NULL OR (created_at, id) < (SELECT created_at, id FROM users WHERE id = $2))
          ORDER BY created_at DESC, id DESC LIMIT $3"
    ))
    .bind(email.map(normalize_email))
    .bind(before)
    .bind(limit)
    .fetch_all(ex)
    .await
}

/// Applies an administrator's change; `None` leaves a field as it is.
pub async fn update_admin(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    tier: Option<&str>,
    disabled: Option<bool>,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE users SET tier = coalesce($2, tier),
                disabled_at = CASE WHEN $3::bool IS NULL THEN disabled_at
                                   WHEN $3 THEN coalesce(disabled_at, now()) ELSE NULL END,
                updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(tier)
    .bind(disabled)
    .fetch_optional(ex)
    .await
}

pub async fn find_by_email(ex: impl PgExecutor<'_>, email: &str) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM users WHERE lower(email) = $1"))
        .bind(normalize_email(email))
        .fetch_optional(ex)
        .await
}
