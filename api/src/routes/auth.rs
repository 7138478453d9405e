//! Accounts: register, log in, refresh, log out, and who am I.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::{
    db::{self, refresh_tokens::RefreshToken},
    tiers::Tier,
};
use poem_openapi::{
    param::{Cookie, Header},
    payload::Json,
    ApiResponse, Object, OpenApi,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    auth::{password, refresh, session_cookie, BearerAuth},
    body::JsonBody,
    error::{ApiError, FieldError},
    limits::Policy,
    problems::{Problems, ALWAYS, BODY, CONFLICT, FORBIDDEN, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
};

/// Email and password. Nothing else is accepted: fields such as `tier` or `role`
/// are refused with 422, never applied.
#[derive(Debug, Deserialize, Object)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[oai(validator(max_length = 254))]
    pub email: String,
    /// At least 12 characters, not the email address.
    #[oai(write_only, validator(min_length = 12, max_length = 256))]
    pub password: String,
}

#[derive(Debug, Deserialize, Object)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token; leave it out to use the session cookie (which needs the
    /// `X-Ultra-Session: cookie` header).
    #[serde(default)]
    #[oai(write_only)]
    pub refresh_token: Option<String>,
}

#[derive(Debug, Object)]
pub struct Tokens {
    /// A JWT: send it as `Authorization: Bearer …`.
    pub access_token: String,
    /// Opaque; exchange it at `/v1/auth/refresh` for new tokens (it works once).
    /// Absent when it was set as the session cookie instead (`X-Ultra-Session: cookie`).
    #[oai(skip_serializing_if_is_none)]
    pub refresh_token: Option<String>,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

#[derive(Debug, Object)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub tier: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Object)]
pub struct TodayUsage {
    /// Tokens used by finished jobs today (UTC).
    pub used_tokens: i64,
    /// Tokens held by jobs still in progress (their worst case).
    pub reserved_tokens: i64,
    /// Tokens still available today.
    pub remaining_tokens: i64,
    /// Jobs submitted today.
    pub jobs: i64,
    /// Jobs queued or running now.
    pub active_jobs: i64,
    /// What finished jobs cost today, in US dollars.
    pub cost_usd: f64,
}

#[derive(Debug, Object)]
pub struct Me {
    pub id: Uuid,
    pub email: String,
    pub tier: String,
    pub role: String,
    pub limits: Tier,
    pub usage: TodayUsage,
}

#[derive(ApiResponse)]
pub enum RegisterResponse {
    /// Account created; log in to get tokens.
    #[oai(status = 201)]
    Created(Json<Account>),
}

#[derive(ApiResponse)]
pub enum NoContent {
    /// Done.
    #[oai(status = 204)]
    Done,
}

#[derive(ApiResponse)]
pub enum TokensResponse {
    /// New tokens; with `X-Ultra-Session: cookie`, the refresh token is the
    /// `ultra_refresh` cookie (`HttpOnly`, `SameSite=Strict`, path `/v1/auth`) instead.
    #[oai(status = 200)]
    Issued(Json<Tokens>, #[oai(header = "Set-Cookie")] Option<String>),
}

#[derive(ApiResponse)]
pub enum LoggedOut {
    /// Done; a session cookie is cleared.
    #[oai(status = 204)]
    Done(#[oai(header = "Set-Cookie")] Option<String>),
}

/// Logins per minute for one account, from any number of addresses.
const LOGIN_PER_ACCOUNT_PER_MINUTE: u32 = 10;

/// The rate-limit key of an account's logins: a digest of the normalised email, so
/// whatever a client sends as `email` makes a short key (and no address is stored
/// in Redis in the clear).
fn account_bucket(email: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(email.as_bytes());
    format!("email:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..18]))
}

pub struct AuthApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Accounts")]
impl AuthApi {
    /// Register
    ///
    /// Creates an account in the default tier with the `user` role.
    #[oai(path = "/auth/register", method = "post", operation_id = "register")]
    async fn register(
        &self,
        body: JsonBody<Credentials>,
    ) -> Result<RegisterResponse, Problems<{ ALWAYS | BODY | CONFLICT }>> {
        let Credentials { email, password } = body.0;
        let email = db::users::normalize_email(&email);
        let mut errors = Vec::new();
        if !db::users::is_plausible_email(&email) {
            errors.push(FieldError::new("email", "not an email address"));
        }
        if let Err(problem) = password::check_policy(&password, &email) {
            errors.push(FieldError::new("password", problem));
        }
        if !errors.is_empty() {
            return Err(ApiError::validation(errors).into());
        }
        let hash = self.state.passwords.hash(&password).await?;
        let user = match db::users::create_with_password(&self.state.pool, &email, "user", Some(&hash)).await {
            Ok(user) => user,
            Err(err) if db::is_unique_violation(&err) => {
                return Err(ApiError::Conflict("an account with this email already exists".into()).into())
            }
            Err(err) => return Err(err.into()),
        };
        tracing::info!(user_id = %user.id, "account registered");
        Ok(RegisterResponse::Created(Json(Account {
            id: user.id,
            email: user.email,
            tier: user.tier,
            role: user.role,
            created_at: user.created_at,
        })))
    }

    /// Log in
    ///
    /// A wrong email and a wrong password get the same answer, in about the same time.
    #[oai(path = "/auth/login", method = "post", operation_id = "login")]
    async fn login(
        &self,
        body: JsonBody<Credentials>,
        /// `cookie`: keep the refresh token in an `HttpOnly` cookie, out of reach of
        /// the page's scripts (the web console does).
        #[oai(name = "X-Ultra-Session")]
        session: Header<Option<String>>,
    ) -> Result<TokensResponse, Problems<{ ALWAYS | BODY | UNAUTHORIZED }>> {
        let Credentials { email, password } = body.0;
        let email = db::users::normalize_email(&email);
        // Guessing one account's password from many addresses meets this limit.
        let account_limit = Policy::per_minute("login-account", LOGIN_PER_ACCOUNT_PER_MINUTE);
        let decision = self.state.limiter.check(&account_bucket(&email), account_limit).await;
        if !decision.allowed {
            metrics::counter!(common::metrics::RATE_LIMITED, "policy" => "login-account").increment(1);
            return Err(
                ApiError::RateLimited { policy: "login-account", retry_after: decision.retry_after_secs }.into()
            );
        }
        let found = if db::users::is_plausible_email(&email) {
            db::users::find_credentials(&self.state.pool, &email).await?
        } else {
            None // still hashed below: malformed input answers like a wrong password
        };
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), hash),
            None => (None, None),
        };
        let valid = self.state.passwords.verify(&password, hash.as_deref()).await?;
        let user = user.filter(|u| valid && u.disabled_at.is_none()).ok_or(ApiError::Unauthorized)?;
        let mut tx = self.state.pool.begin().await?;
        let tokens = self.issue(&mut tx, user.id, Uuid::new_v4()).await?;
        tx.commit().await?;
        Ok(self.answer(tokens, wants_cookie(&session)))
    }

    /// Refresh tokens
    ///
    /// Exchanges a refresh token for a new access token and a new refresh token. Each
    /// refresh token works once: presenting one that was already exchanged revokes
    /// every token of its login (someone else has it).
    #[oai(path = "/auth/refresh", method = "post", operation_id = "refresh")]
    async fn refresh(
        &self,
        body: JsonBody<RefreshRequest>,
        /// The session cookie, used when the body has no `refresh_token`.
        #[oai(name = "ultra_refresh")]
        cookie: Cookie<Option<String>>,
        /// `cookie` must come with the session cookie: a page on another site cannot
        /// send it (cross-site request forgery).
        #[oai(name = "X-Ultra-Session")]
        session: Header<Option<String>>,
    ) -> Result<TokensResponse, Problems<{ ALWAYS | BODY | UNAUTHORIZED | FORBIDDEN }>> {
        let (presented, from_cookie) = presented(body.0, cookie.0, &session)?;
        let mut tx = self.state.pool.begin().await?;
        let token = db::refresh_tokens::find_for_update(&mut tx, &refresh::hash(&presented)).await?;
        let Some(token) = token else { return Err(ApiError::Unauthorized.into()) };
        if token.replaced_at.is_some() {
            let revoked = db::refresh_tokens::revoke_family(&mut *tx, token.family_id).await?;
            tx.commit().await?;
            tracing::warn!(user_id = %token.user_id, family = %token.family_id, revoked, "rotated refresh token reused; family revoked");
            return Err(ApiError::Unauthorized.into());
        }
        if !usable(&token) {
            return Err(ApiError::Unauthorized.into());
        }
        let user = db::users::get(&mut *tx, token.user_id).await?.filter(|u| u.disabled_at.is_none());
        let Some(user) = user else { return Err(ApiError::Unauthorized.into()) };
        // Replaced and replacement commit together, under the old token's row lock: a
        // concurrent reuse either revokes the family after this commit (new token
        // included) or has already revoked it (and this one sees `replaced_at`).
        db::refresh_tokens::mark_replaced(&mut *tx, token.id).await?;
        let tokens = self.issue(&mut tx, user.id, token.family_id).await?;
        tx.commit().await?;
        Ok(self.answer(tokens, from_cookie))
    }

    /// Log out
    ///
    /// Revokes the refresh token and every token of its login. Access tokens expire
    /// on their own (they are short-lived).
    #[oai(path = "/auth/logout", method = "post", operation_id = "logout")]
    async fn logout(
        &self,
        body: JsonBody<RefreshRequest>,
        /// The session cookie, used when the body has no `refresh_token`.
        #[oai(name = "ultra_refresh")]
        cookie: Cookie<Option<String>>,
        /// `cookie` must come with the session cookie.
        #[oai(name = "X-Ultra-Session")]
        session: Header<Option<String>>,
    ) -> Result<LoggedOut, Problems<{ ALWAYS | BODY | UNAUTHORIZED | FORBIDDEN }>> {
        let (presented, from_cookie) = presented(body.0, cookie.0, &session)?;
        let mut tx = self.state.pool.begin().await?;
        if let Some(token) = db::refresh_tokens::find_for_update(&mut tx, &refresh::hash(&presented)).await? {
            db::refresh_tokens::revoke_family(&mut *tx, token.family_id).await?;
        }
        tx.commit().await?;
        Ok(LoggedOut::Done(from_cookie.then(|| session_cookie::clear(self.state.config.is_production()))))
    }

    /// Who am I
    ///
    /// The caller's account, tier limits and today's usage.
    #[oai(path = "/me", method = "get", operation_id = "me")]
    async fn me(&self, auth: BearerAuth) -> Result<Json<Me>, Problems<{ ALWAYS | UNAUTHORIZED }>> {
        let pool = &self.state.pool;
        let user = db::users::get(pool, auth.0.user_id).await?.ok_or(ApiError::Unauthorized)?;
        let limits = self.state.tiers.for_user(&user.tier).clone();
        let db::usage::Standing { usage, active_jobs, .. } = db::usage::standing(pool, user.id).await?;
        let remaining_tokens = (limits.daily_tokens as i64 - usage.used - usage.reserved).max(0);
        Ok(Json(Me {
            id: user.id,
            email: user.email,
            tier: user.tier,
            role: user.role,
            limits,
            usage: TodayUsage {
                used_tokens: usage.used,
                reserved_tokens: usage.reserved,
                remaining_tokens,
                jobs: usage.jobs,
                active_jobs,
                cost_usd: usage.cost_micros as f64 / 1e6,
            },
        }))
    }
}

/// Whether the client asked for the refresh token as a cookie.
fn wants_cookie(session: &Header<Option<String>>) -> bool {
    session.0.as_deref().is_some_and(|s| s.trim().eq_ignore_ascii_case("cookie"))
}

/// The refresh token presented, and whether it came as the session cookie: the body's
/// if it has one, else the cookie — only with `X-Ultra-Session: cookie`, which a form
/// or a link on another site cannot send.
fn presented(
    body: RefreshRequest,
    cookie: Option<String>,
    session: &Header<Option<String>>,
) -> Result<(String, bool), ApiError> {
    match (body.refresh_token, cookie) {
        (Some(token), _) => Ok((token, false)),
        (None, Some(cookie)) if wants_cookie(session) => Ok((cookie, true)),
        (None, Some(_)) => Err(ApiError::Forbidden("the session cookie needs the `X-Ultra-Session: cookie` header")),
        (None, None) => Err(ApiError::Unauthorized),
    }
}

impl AuthApi {
    /// The tokens as JSON; with `cookie`, the refresh token as the session cookie.
    fn answer(&self, mut tokens: Tokens, cookie: bool) -> TokensResponse {
        let set_cookie = match (cookie, tokens.refresh_token.take()) {
            (true, Some(token)) => Some(session_cookie::set(
                &token,
                self.state.config.refresh_token_ttl(),
                self.state.config.is_production(),
            )),
            (_, token) => {
                tokens.refresh_token = token;
                None
            }
        };
        TokensResponse::Issued(Json(tokens), set_cookie)
    }

    /// A new access token, and a new refresh token in `family`.
    async fn issue(&self, conn: &mut sqlx::PgConnection, user_id: Uuid, family: Uuid) -> Result<Tokens, ApiError> {
        let state = &self.state;
        let access_token = state.jwt.issue(user_id).map_err(|e| ApiError::Internal(e.into()))?;
        let refresh_token = refresh::generate();
        let expires_at = Utc::now()
            + chrono::Duration::from_std(state.config.refresh_token_ttl())
                .unwrap_or_else(|_| chrono::Duration::days(30));
        db::refresh_tokens::insert(conn, user_id, family, &refresh::hash(&refresh_token), expires_at).await?;
        Ok(Tokens {
            access_token,
            refresh_token: Some(refresh_token),
            token_type: "Bearer".to_owned(),
            expires_in: state.jwt.ttl().as_secs(),
        })
    }
}

fn usable(token: &RefreshToken) -> bool {
    token.revoked_at.is_none() && token.expires_at > Utc::now()
}
