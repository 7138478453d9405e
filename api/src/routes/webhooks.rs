//! Webhook endpoints (Standard Webhooks): register, list, change, delete, rotate the
//! signing secret, send a test ping; and each endpoint's deliveries, which can be
//! retried. The deliveries themselves are written when a job or batch ends and sent
//! by the workers (`worker::webhooks`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::{
    db::{
        self,
        webhooks::{Delivery, Endpoint, EndpointChange, NotRetried},
    },
    domain::{DeliveryStatus, WebhookEventType},
    webhooks::{self, address::Policy, signing},
};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    types::MaybeUndefined,
    ApiResponse, Object, OpenApi,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    body::JsonBody,
    error::{ApiError, FieldError},
    problems::{Problems, ALWAYS, BODY, CONFLICT, MALFORMED, NOT_FOUND, UNAUTHORIZED},
    routes::{auth::NoContent, ApiTags},
    state::AppState,
};

/// Endpoints one user may register.
const MAX_ENDPOINTS_PER_USER: i64 = 20;
const MAX_URL_CHARS: usize = 2048;
const MAX_PAGE: u32 = 100;

#[derive(Debug, Deserialize, Object)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where to POST: `https` (in development `http` too), reaching a public address.
    pub url: String,
    /// The event types to send; absent: every type, those added later included.
    #[serde(default)]
    #[oai(skip_serializing_if_is_none)]
    pub events: Option<Vec<WebhookEventType>>,
}

#[derive(Debug, Deserialize, Object)]
#[serde(deny_unknown_fields)]
pub struct WebhookChange {
    #[serde(default)]
    #[oai(skip_serializing_if_is_none)]
    pub url: Option<String>,
    /// A list of event types, or `null` for every type.
    #[serde(default)]
    pub events: MaybeUndefined<Vec<WebhookEventType>>,
    /// `false` stops deliveries (pending ones fail); `true` resumes them and clears the
    /// endpoint's failure record.
    #[serde(default)]
    #[oai(skip_serializing_if_is_none)]
    pub enabled: Option<bool>,
}

#[derive(Debug, Object)]
pub struct WebhookView {
    pub id: Uuid,
    pub url: String,
    /// The event types sent here.
    pub events: Vec<WebhookEventType>,
    /// Whether every event type is sent, those added later included.
    pub all_events: bool,
    pub enabled: bool,
    /// Why it was disabled: by its owner, or after failing too long.
    pub disabled_reason: Option<String>,
    pub disabled_at: Option<DateTime<Utc>>,
    /// Since when every attempt has failed.
    pub failing_since: Option<DateTime<Utc>>,
    /// Until when the secret before the last rotation still signs.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl WebhookView {
    fn of(endpoint: Endpoint) -> Self {
        let events = match &endpoint.events {
            Some(names) => names.iter().filter_map(|name| name.parse().ok()).collect(),
            None => subscribable().collect(),
        };
        Self {
            id: endpoint.id,
            url: endpoint.url,
            events,
            all_events: endpoint.events.is_none(),
            enabled: endpoint.enabled,
            disabled_reason: endpoint.disabled_reason,
            disabled_at: endpoint.disabled_at,
            failing_since: endpoint.failing_since,
            previous_secret_expires_at: endpoint.previous_secret_expires_at.filter(|at| *at > Utc::now()),
            created_at: endpoint.created_at,
            updated_at: endpoint.updated_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct CreatedWebhook {
    #[oai(flatten)]
    pub endpoint: WebhookView,
    /// The signing secret (`whsec_…`): shown this once and at rotations, never again.
    pub secret: String,
}

#[derive(Debug, Object)]
pub struct RotatedSecret {
    /// The new signing secret: shown this once.
    pub secret: String,
    /// Until then the previous secret signs too (a second signature in
    /// `webhook-signature`), so receivers can switch without losing a delivery.
    pub previous_secret_expires_at: DateTime<Utc>,
}

#[derive(Debug, Object)]
pub struct WebhookList {
    /// Oldest first: the first enabled one signs jobs' one-off `webhook_url`s.
    pub webhooks: Vec<WebhookView>,
}

#[derive(Debug, Object)]
pub struct DeliveryView {
    pub id: Uuid,
    /// The `webhook-id` header it is sent with, the same on every attempt.
    pub message_id: String,
    pub endpoint_id: Uuid,
    /// Where it goes: a job's one-off `webhook_url`, else the endpoint's URL.
    pub url: Option<String>,
    pub event_type: WebhookEventType,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// When the next attempt is due, while `pending`.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// An attempt is under way.
    pub in_flight: bool,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The last response's status, if one came.
    pub last_status_code: Option<i32>,
    pub last_latency_ms: Option<i32>,
    /// What went wrong last: a transport error or the start of the response.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl DeliveryView {
    fn of(delivery: Delivery) -> Self {
        let pending = delivery.status == DeliveryStatus::Pending;
        Self {
            id: delivery.id,
            message_id: webhooks::message_id(delivery.id),
            endpoint_id: delivery.endpoint_id,
            url: delivery.url,
            event_type: delivery.event_type,
            status: delivery.status,
            attempts: delivery.attempts,
            next_attempt_at: pending.then_some(delivery.next_attempt_at),
            in_flight: pending && delivery.claimed_until.is_some_and(|until| until > Utc::now()),
            last_attempt_at: delivery.last_attempt_at,
            last_status_code: delivery.last_status_code,
            last_latency_ms: delivery.last_latency_ms,
            last_error: delivery.last_error,
            created_at: delivery.created_at,
            finished_at: delivery.finished_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct DeliveryPage {
    /// Newest first.
    pub deliveries: Vec<DeliveryView>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

#[derive(ApiResponse)]
pub enum CreateWebhookResponse {
    #[oai(status = 201)]
    Created(Json<CreatedWebhook>),
}

#[derive(ApiResponse)]
pub enum DeliveryQueued {
    /// Queued: the delivery task sends it within moments.
    #[oai(status = 202)]
    Queued(Json<DeliveryView>),
}

/// The types an endpoint can subscribe to (a test ping is sent to any endpoint).
fn subscribable() -> impl Iterator<Item = WebhookEventType> {
    WebhookEventType::ALL.iter().copied().filter(|t| *t != WebhookEventType::WebhookTest)
}

pub struct WebhooksApi {
    pub state: Arc<AppState>,
}

impl WebhooksApi {
    fn policy(&self) -> Policy {
        Policy::from_config(&self.state.config)
    }

    async fn owned(&self, auth: &BearerAuth, id: Uuid) -> Result<Endpoint, ApiError> {
        db::webhooks::get_owned(&self.state.pool, id, auth.0.user_id)
            .await?
            .ok_or(ApiError::NotFound("webhook endpoint not found"))
    }
}

/// Checks a URL under `policy`: the field's error, or the URL as given.
pub fn check_url(policy: &Policy, field: &str, url: &str, errors: &mut Vec<FieldError>) {
    if url.chars().count() > MAX_URL_CHARS {
        errors.push(FieldError::new(field, format!("at most {MAX_URL_CHARS} characters")));
    } else if let Err(problem) = policy.check(url) {
        errors.push(FieldError::new(field, problem));
    }
}

/// The event list as stored: `None` for every type; each type once.
fn check_events(events: Option<&[WebhookEventType]>, errors: &mut Vec<FieldError>) -> Option<Vec<String>> {
    let events = events?;
    if events.is_empty() {
        errors.push(FieldError::new("events", "list at least one event type, or leave it out for every type"));
    }
    if events.contains(&WebhookEventType::WebhookTest) {
        errors.push(FieldError::new(
            "events",
            "`webhook.test` is sent by POST /v1/webhooks/{id}/test to any endpoint; it needs no subscription",
        ));
    }
    let mut names: Vec<String> = events.iter().map(|t| t.as_str().to_owned()).collect();
    names.sort();
    names.dedup();
    Some(names)
}

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Webhooks")]
impl WebhooksApi {
    /// Register a webhook endpoint
    ///
    /// Jobs and batches that end send their event here, signed as Standard Webhooks
    /// say (`webhook-id`, `webhook-timestamp`, `webhook-signature`) with the secret
    /// this answer shows once.
    #[oai(path = "/webhooks", method = "post", operation_id = "create_webhook")]
    async fn create_webhook(
        &self,
        auth: BearerAuth,
        body: JsonBody<NewWebhook>,
    ) -> Result<CreateWebhookResponse, Problems<{ ALWAYS | UNAUTHORIZED | CONFLICT | BODY }>> {
        let request = body.0;
        let mut errors = Vec::new();
        let url = request.url.trim();
        check_url(&self.policy(), "url", url, &mut errors);
        let events = check_events(request.events.as_deref(), &mut errors);
        if !errors.is_empty() {
            return Err(ApiError::validation(errors).into());
        }
        // Under the user's row lock, so that concurrent creations cannot pass the limit.
        let mut tx = self.state.pool.begin().await?;
        db::usage::lock_user(&mut tx, auth.0.user_id).await?;
        if db::webhooks::count_owned(&mut *tx, auth.0.user_id).await? >= MAX_ENDPOINTS_PER_USER {
            return Err(ApiError::Conflict(format!(
                "at most {MAX_ENDPOINTS_PER_USER} webhook endpoints; delete one first"
            ))
            .into());
        }
        let secret = signing::new_secret();
        let new =
            db::webhooks::NewEndpoint { user_id: auth.0.user_id, url, events: events.as_deref(), secret: &secret };
        let endpoint = db::webhooks::create(&mut *tx, &new).await?;
        tx.commit().await?;
        tracing::info!(endpoint_id = %endpoint.id, "webhook endpoint registered");
        Ok(CreateWebhookResponse::Created(Json(CreatedWebhook { endpoint: WebhookView::of(endpoint), secret })))
    }

    /// List webhook endpoints
    #[oai(path = "/webhooks", method = "get", operation_id = "list_webhooks")]
    async fn list_webhooks(&self, auth: BearerAuth) -> Result<Json<WebhookList>, Problems<{ ALWAYS | UNAUTHORIZED }>> {
        let endpoints = db::webhooks::list_owned(&self.state.pool, auth.0.user_id).await?;
        Ok(Json(WebhookList { webhooks: endpoints.into_iter().map(WebhookView::of).collect() }))
    }

    /// Get a webhook endpoint
    #[oai(path = "/webhooks/:id", method = "get", operation_id = "get_webhook")]
    async fn get_webhook(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<Json<WebhookView>, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        Ok(Json(WebhookView::of(self.owned(&auth, id.0).await?)))
    }

    /// Change a webhook endpoint
    ///
    /// Only the fields sent change.
    #[oai(path = "/webhooks/:id", method = "patch", operation_id = "update_webhook")]
    async fn update_webhook(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<WebhookChange>,
    ) -> Result<Json<WebhookView>, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND | BODY }>> {
        let change = body.0;
        let mut errors = Vec::new();
        let url = change.url.as_deref().map(str::trim);
        if let Some(url) = url {
            check_url(&self.policy(), "url", url, &mut errors);
        }
        let events = match &change.events {
            MaybeUndefined::Undefined => None,
            MaybeUndefined::Null => Some(None),
            MaybeUndefined::Value(events) => Some(check_events(Some(events), &mut errors)),
        };
        if !errors.is_empty() {
            return Err(ApiError::validation(errors).into());
        }
        let change =
            EndpointChange { url, events: events.as_ref().map(|events| events.as_deref()), enabled: change.enabled };
        let mut tx = self.state.pool.begin().await?;
        let updated = db::webhooks::update_owned(&mut tx, id.0, auth.0.user_id, &change).await?;
        tx.commit().await?;
        Ok(Json(WebhookView::of(updated.ok_or(ApiError::NotFound("webhook endpoint not found"))?)))
    }

    /// Delete a webhook endpoint
    ///
    /// Its deliveries go with it, pending ones too.
    #[oai(path = "/webhooks/:id", method = "delete", operation_id = "delete_webhook")]
    async fn delete_webhook(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<NoContent, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        if db::webhooks::delete_owned(&self.state.pool, id.0, auth.0.user_id).await? {
            Ok(NoContent::Done)
        } else {
            Err(ApiError::NotFound("webhook endpoint not found").into())
        }
    }

    /// Rotate a webhook endpoint's signing secret
    ///
    /// Answers the new secret. For `ULTRA_WEBHOOK_ROTATION_GRACE_SECS` (a day) every
    /// delivery carries two signatures, under the new and the previous secret, so a
    /// receiver verifies with either while it switches.
    #[oai(path = "/webhooks/:id/rotate-secret", method = "post", operation_id = "rotate_webhook_secret")]
    async fn rotate_secret(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<Json<RotatedSecret>, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        let secret = signing::new_secret();
        let grace = std::time::Duration::from_secs(self.state.config.webhook_rotation_grace_secs);
        let rotated = db::webhooks::rotate_secret(&self.state.pool, id.0, auth.0.user_id, &secret, grace)
            .await?
            .ok_or(ApiError::NotFound("webhook endpoint not found"))?;
        let previous_secret_expires_at = rotated.previous_secret_expires_at.unwrap_or_else(Utc::now);
        tracing::info!(endpoint_id = %rotated.id, "webhook secret rotated");
        Ok(Json(RotatedSecret { secret, previous_secret_expires_at }))
    }

    /// Send a test ping
    ///
    /// Queues a `webhook.test` delivery to the endpoint, whatever its event types;
    /// follow it in the endpoint's deliveries.
    #[oai(path = "/webhooks/:id/test", method = "post", operation_id = "test_webhook")]
    async fn test_webhook(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<DeliveryQueued, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND | CONFLICT }>> {
        let endpoint = self.owned(&auth, id.0).await?;
        if !endpoint.enabled {
            return Err(ApiError::Conflict("the endpoint is disabled; enable it with PATCH first".into()).into());
        }
        let body = webhooks::test_body(endpoint.id, Utc::now());
        let delivery = db::webhooks::enqueue_test(&self.state.pool, endpoint.id, &body).await?;
        Ok(DeliveryQueued::Queued(Json(DeliveryView::of(delivery))))
    }

    /// List an endpoint's deliveries
    ///
    /// Newest first: status, attempts, the last response's code and latency, the next
    /// attempt.
    #[oai(path = "/webhooks/:id/deliveries", method = "get", operation_id = "list_webhook_deliveries")]
    async fn list_deliveries(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Only deliveries with this status.
        status: Query<Option<DeliveryStatus>>,
        /// Page size (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<Uuid>>,
    ) -> Result<Json<DeliveryPage>, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND | MALFORMED }>> {
        let endpoint = self.owned(&auth, id.0).await?;
        let limit = limit.0.unwrap_or(20).min(MAX_PAGE);
        let deliveries =
            db::webhooks::list_deliveries(&self.state.pool, endpoint.id, status.0, cursor.0, i64::from(limit) + 1)
                .await?;
        let (deliveries, next_cursor) = super::paged(deliveries, limit, |delivery| delivery.id);
        Ok(Json(DeliveryPage { deliveries: deliveries.into_iter().map(DeliveryView::of).collect(), next_cursor }))
    }

    /// Retry a delivery
    ///
    /// A pending delivery is sent at once rather than at its next attempt; a failed
    /// (or succeeded) one is sent again with its schedule started over, under the
    /// same `webhook-id`. 409 while an attempt is under way or the endpoint is disabled.
    #[oai(
        path = "/webhooks/:id/deliveries/:delivery_id/retry",
        method = "post",
        operation_id = "retry_webhook_delivery"
    )]
    async fn retry_delivery(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        delivery_id: Path<Uuid>,
    ) -> Result<DeliveryQueued, Problems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND | CONFLICT }>> {
        let endpoint = self.owned(&auth, id.0).await?;
        if !endpoint.enabled {
            return Err(ApiError::Conflict("the endpoint is disabled; enable it with PATCH first".into()).into());
        }
        match db::webhooks::retry(&self.state.pool, endpoint.id, delivery_id.0).await? {
            Ok(delivery) => Ok(DeliveryQueued::Queued(Json(DeliveryView::of(delivery)))),
            Err(NotRetried::Unknown) => Err(ApiError::NotFound("delivery not found").into()),
            Err(NotRetried::InFlight) => {
                Err(ApiError::Conflict("an attempt is under way; retry once it has ended".into()).into())
            }
        }
    }
}
