//! Administration: only users with the `admin` role.

use std::sync::Arc;

use common::{
    db,
    domain::QueuedReason,
    job::{EventData, QueuedData},
};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    body::JsonBody,
    error::{ApiError, FieldError},
    problems::{Problems, ALWAYS, BODY, FORBIDDEN, MALFORMED, NOT_FOUND, UNAUTHORIZED},
    queues::QueuesSnapshot,
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

impl AdminUserView {
    fn of(user: db::users::User) -> Self {
        Self {
            disabled: user.disabled_at.is_some(),
            account: Account {
                id: user.id,
                email: user.email,
                tier: user.tier,
                role: user.role,
                created_at: user.created_at,
            },
        }
    }
}

#[derive(Debug, Object)]
pub struct UserPage {
    /// Newest first.
    pub users: Vec<AdminUserView>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Object)]
pub struct DeadLetterView {
    pub job_id: Uuid,
    pub user_id: Uuid,
    pub attempts: i32,
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Object)]
pub struct DeadLetterList {
    /// Jobs whose message the broker gave up on, newest first (at most 100).
    pub dead_letters: Vec<DeadLetterView>,
}

#[derive(Debug, Object)]
pub struct Replayed {
    pub job_id: Uuid,
    /// `queued` again.
    pub status: common::domain::JobStatus,
}

pub struct AdminApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/v1/admin", tag = "ApiTags::Admin")]
impl AdminApi {
    /// Queue depths and backlogs
    ///
    /// RabbitMQ's ready messages and consumers for every queue (work, dead letter,
    /// retry delays), and PostgreSQL's outbox backlog, jobs queued and running, and
    /// dead-lettered jobs. Scale workers on the work queue's depth; a growing outbox
    /// backlog means the broker is not taking messages. If RabbitMQ is down, `queues`
    /// is empty and `broker_error` says why.
    #[oai(path = "/queues", method = "get", operation_id = "queues")]
    async fn queues(
        &self,
        auth: BearerAuth,
    ) -> Result<Json<QueuesSnapshot>, Problems<{ ALWAYS | UNAUTHORIZED | FORBIDDEN }>> {
        require_admin(&auth)?;
        Ok(Json(QueuesSnapshot::take(&self.state).await?))
    }

    /// List dead-lettered jobs
    #[oai(path = "/dead-letters", method = "get", operation_id = "dead_letters")]
    async fn dead_letters(
        &self,
        auth: BearerAuth,
    ) -> Result<Json<DeadLetterList>, Problems<{ ALWAYS | UNAUTHORIZED | FORBIDDEN }>> {
        require_admin(&auth)?;
        let letters = db::jobs::dead_letters(&self.state.pool, 100).await?;
        let dead_letters = letters
            .into_iter()
            .map(|d| DeadLetterView {
                job_id: d.id,
                user_id: d.user_id,
                attempts: d.attempts,
                failed_at: d.finished_at,
            })
            .collect();
        Ok(Json(DeadLetterList { dead_letters }))
    }

    /// Replay a dead-lettered job
    ///
    /// Puts it back in the queue; it resumes, skipping the steps it finished. Its budget
    /// reservation is taken again for today. Anything but a dead-lettered job is 404.
    #[oai(path = "/dead-letters/:job_id/replay", method = "post", operation_id = "replay")]
    async fn replay(
        &self,
        auth: BearerAuth,
        job_id: Path<Uuid>,
        trace: poem::web::Data<&common::trace::TraceContext>,
    ) -> Result<Json<Replayed>, Problems<{ ALWAYS | UNAUTHORIZED | FORBIDDEN | NOT_FOUND }>> {
        let traceparent = trace.0.to_string();
        require_admin(&auth)?;
        let state = &self.state;
        let mut tx = state.pool.begin().await?;
        let job =
            db::jobs::requeue_dead_letter(&mut tx, job_id.0).await?.ok_or(ApiError::NotFound("no such dead letter"))?;
        let today = db::usage::today(&mut *tx).await?;
        db::usage::reserve_again(&mut tx, job.user_id, today, job.id).await?;
        let data = EventData::Queued(QueuedData::requeued(Some(QueuedReason::Replayed)));
        let event = db::events::append(&mut tx, job.id, &data).await?;
        let outbox_id = db::outbox::insert(&mut *tx, job.id, job.attempts + 1, Some(&traceparent)).await?;
        tx.commit().await?;
        state.events.publish(&event).await;
        let message = common::queue::JobMessage::new(job.id, job.attempts + 1);
        crate::relay::publish_now(state, outbox_id, &message, Some(&traceparent)).await;
        tracing::info!(admin = %auth.0.user_id, job_id = %job.id, "dead letter replayed");
        Ok(Json(Replayed { job_id: job.id, status: job.status }))
    }

    /// List users
    ///
    /// Newest first; `email` keeps those whose address contains it.
    #[oai(path = "/users", method = "get", operation_id = "list_users")]
    async fn list_users(
        &self,
        auth: BearerAuth,
        /// Part of an email address.
        #[oai(validator(max_length = 254))]
        email: Query<Option<String>>,
        /// Page size (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<Uuid>>,
    ) -> Result<Json<UserPage>, Problems<{ ALWAYS | UNAUTHORIZED | FORBIDDEN | MALFORMED }>> {
        require_admin(&auth)?;
        let limit = limit.0.unwrap_or(50).min(100);
        let users = db::users::list(&self.state.pool, email.0.as_deref(), cursor.0, i64::from(limit) + 1).await?;
        let (users, next_cursor) = super::paged(users, limit, |user| user.id);
        Ok(Json(UserPage { users: users.into_iter().map(AdminUserView::of).collect(), next_cursor }))
    }

    /// Change a user's tier or disable them
    #[oai(path = "/users/:id", method = "patch", operation_id = "update_user")]
    async fn update_user(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<UserUpdate>,
    ) -> Result<Json<AdminUserView>, Problems<{ ALWAYS | UNAUTHORIZED | FORBIDDEN | NOT_FOUND | BODY }>> {
        require_admin(&auth)?;
        let update = body.0;
        if let Some(tier) = &update.tier {
            if self.state.tiers.get(tier).is_none() {
                let known: Vec<&str> = self.state.tiers.names().collect();
                return Err(ApiError::validation(vec![FieldError::new(
                    "tier",
                    format!("unknown tier `{tier}`; known: {}", known.join(", ")),
                )])
                .into());
            }
        }
        let user = db::users::update_admin(&self.state.pool, id.0, update.tier.as_deref(), update.disabled)
            .await?
            .ok_or(ApiError::NotFound("user not found"))?;
        tracing::info!(admin = %auth.0.user_id, user_id = %user.id, tier = %user.tier, disabled = user.disabled_at.is_some(), "user updated by an administrator");
        Ok(Json(AdminUserView::of(user)))
    }
}

fn require_admin(auth: &BearerAuth) -> Result<(), ApiError> {
    if auth.0.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden("administrators only"))
    }
}
