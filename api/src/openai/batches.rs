//! `/openai/v1/batches`: OpenAI's Batch API. Creating a batch checks its input file
//! as OpenAI does — a line that is not JSON, a duplicate `custom_id`, a wrong `url`
//! or an unknown model fails the batch with `errors.data[]` naming the line — and
//! stores one row per request; the feeder (`feeder.rs`) turns them into jobs.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use common::db::{self, batches::WithCounts};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    types::ParseFromJSON,
    Object, OpenApi,
};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    error::OpenAiProblems,
    objects::{Batch, BatchErrors, BatchList, BatchStatus, BatchTag, ListTag, RequestCounts},
    page,
    request::ChatRequest,
    Page, DEFAULT_PAGE,
};
use crate::{
    auth::BearerAuth,
    body::JsonBody,
    error::ApiError,
    problems::{ALWAYS, BODY, CONFLICT, MALFORMED, NOT_FOUND, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
};

/// The one endpoint a batch may run.
pub const ENDPOINT: &str = "/v1/chat/completions";
/// The one completion window OpenAI offers.
const WINDOW: (&str, Duration) = ("24h", Duration::from_secs(24 * 3600));
/// Most metadata pairs a batch keeps (OpenAI's limit).
const MOST_METADATA: usize = 16;
/// Most validation errors a failed batch lists.
const MOST_ERRORS: usize = 100;

#[derive(Debug, Deserialize, Object)]
pub struct CreateBatch {
    /// A file uploaded with `purpose=batch`.
    input_file_id: Uuid,
    endpoint: BatchEndpoint,
    completion_window: CompletionWindow,
    /// Up to 16 pairs, kept on the batch.
    #[serde(default)]
    #[oai(validator(max_properties = 16))] // MOST_METADATA
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, poem_openapi::Enum)]
enum BatchEndpoint {
    #[serde(rename = "/v1/chat/completions")]
    #[oai(rename = "/v1/chat/completions")]
    ChatCompletions,
}

#[derive(Debug, Deserialize, poem_openapi::Enum)]
enum CompletionWindow {
    #[serde(rename = "24h")]
    #[oai(rename = "24h")]
    Day,
}

fn unix(at: Option<chrono::DateTime<chrono::Utc>>) -> Option<i64> {
    at.map(|at| at.timestamp())
}

fn status_of(stored: &str) -> BatchStatus {
    match stored {
        "validating" => BatchStatus::Validating,
        "in_progress" => BatchStatus::InProgress,
        "finalizing" => BatchStatus::Finalizing,
        "completed" => BatchStatus::Completed,
        "expired" => BatchStatus::Expired,
        "cancelling" => BatchStatus::Cancelling,
        "cancelled" => BatchStatus::Cancelled,
        "failed" => BatchStatus::Failed,
        other => {
            tracing::error!(status = other, "unknown batch status");
            BatchStatus::Failed
        }
    }
}

/// A stored JSON column, decoded: one Ultra wrote, so a failure is a bug, logged and
/// shown as absent rather than failing every read of the batch.
fn stored<T: std::fmt::Debug>(batch_id: Uuid, column: &str, parsed: poem_openapi::types::ParseResult<T>) -> Option<T> {
    parsed.map_err(|err| tracing::error!(%batch_id, column, error = ?err, "undecodable batch column")).ok()
}

/// OpenAI's batch object.
pub fn batch_object(found: &WithCounts) -> Batch {
    let b = &found.batch;
    Batch {
        id: b.id,
        object: BatchTag::Batch,
        endpoint: b.endpoint.clone(),
        errors: b.errors.clone().and_then(|errors| stored(b.id, "errors", BatchErrors::parse_from_json(Some(errors)))),
        input_file_id: b.input_file_id,
        completion_window: b.completion_window.clone(),
        status: status_of(&b.status),
        output_file_id: b.output_file_id,
        error_file_id: b.error_file_id,
        created_at: b.created_at.timestamp(),
        in_progress_at: unix(b.in_progress_at),
        expires_at: b.expires_at.timestamp(),
        finalizing_at: unix(b.finalizing_at),
        completed_at: unix(b.completed_at),
        failed_at: unix(b.failed_at),
        expired_at: unix(b.expired_at),
        cancelling_at: unix(b.cancelling_at),
        cancelled_at: unix(b.cancelled_at),
        request_counts: RequestCounts { total: i64::from(b.total), completed: found.completed, failed: found.failed },
        metadata: b.metadata.clone().and_then(|m| stored(b.id, "metadata", BTreeMap::parse_from_json(Some(m)))),
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such batch")
}

/// One request of an input file, checked.
struct Line {
    number: i32,
    custom_id: String,
    body: Value,
}

/// The input file's requests, or the errors that fail the batch (OpenAI's
/// `{code, message, param, line}`).
fn check_input(state: &AppState, text: &str) -> Result<Vec<Line>, Vec<Value>> {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut fail = |line: usize, code: &str, param: Option<&str>, message: String| {
        errors.push(json!({ "code": code, "message": message, "param": param, "line": line }));
    };
    for (index, raw) in text.lines().enumerate().filter(|(_, raw)| !raw.trim().is_empty()) {
        let number = index + 1;
        let mut request: Value = match serde_json::from_str(raw) {
            Ok(request) => request,
            Err(err) => {
                fail(number, "invalid_json_line", None, format!("line {number} is not JSON: {err}"));
                continue;
            }
        };
        let Some(custom_id) = request["custom_id"].as_str().filter(|id| !id.is_empty()).map(str::to_owned) else {
            fail(number, "missing_required_parameter", Some("custom_id"), format!("line {number} has no `custom_id`"));
            continue;
        };
        if !seen.insert(custom_id.clone()) {
            let message = format!("line {number} repeats the `custom_id` `{custom_id}`");
            fail(number, "duplicate_custom_id", Some("custom_id"), message);
        }
        if request["method"] != "POST" {
            fail(number, "invalid_method", Some("method"), format!("line {number}: `method` must be `POST`"));
        }
        if request["url"] != ENDPOINT {
            let message = format!("line {number}: `url` must be `{ENDPOINT}`, the batch's endpoint");
            fail(number, "invalid_url", Some("url"), message);
        }
        let body = request["body"].take();
        match ChatRequest::deserialize(&body) {
            Err(err) => fail(number, "invalid_request", Some("body"), format!("line {number}: `body` {err}")),
            Ok(chat) if !super::models::exists(state, &chat.model) => {
                let message = format!("line {number}: the model `{}` does not exist", chat.model);
                fail(number, "model_not_found", Some("body.model"), message);
            }
            Ok(_) => lines.push(Line { number: number as i32, custom_id, body }),
        }
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        errors.truncate(MOST_ERRORS);
        Err(errors)
    }
}

pub struct BatchesApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/openai/v1", tag = "ApiTags::OpenAi")]
impl BatchesApi {
    /// Create a batch (OpenAI)
    ///
    /// Checks the input file first: a bad line fails the batch (`failed`, with
    /// `errors.data[]` naming each line), as OpenAI does; else every line becomes a
    /// job, admitted at a lower priority than interactive work.
    #[oai(path = "/batches", method = "post", operation_id = "openai_create_batch")]
    async fn create(
        &self,
        auth: BearerAuth,
        request: JsonBody<CreateBatch>,
    ) -> Result<Json<Batch>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | BODY | NOT_FOUND }>> {
        let (state, request) = (&self.state, request.0);
        if request.metadata.as_ref().is_some_and(|m| m.len() > MOST_METADATA) {
            return Err(ApiError::field("metadata", format!("at most {MOST_METADATA} pairs")).into());
        }
        let file_id = request.input_file_id;
        let content = db::files::content_owned(&state.pool, file_id, auth.0.user_id).await?;
        let content = content.ok_or(ApiError::NotFound("no such input file"))?;
        let text = String::from_utf8_lossy(&content);
        let (lines, errors) = match check_input(state, &text) {
            Ok(lines) => (lines, None),
            Err(errors) => (Vec::new(), Some(json!({ "object": "list", "data": errors }))),
        };
        let metadata = request.metadata.map(|m| json!(m));
        let new_batch = db::batches::NewBatch {
            user_id: auth.0.user_id,
            input_file_id: file_id,
            endpoint: ENDPOINT,
            completion_window: WINDOW.0,
            window: WINDOW.1,
            metadata: metadata.as_ref(),
        };
        let stored: Vec<db::batches::NewLine<'_>> = lines
            .iter()
            .map(|l| db::batches::NewLine { line: l.number, custom_id: &l.custom_id, body: &l.body })
            .collect();
        let mut tx = state.pool.begin().await?;
        let batch = db::batches::create(&mut tx, &new_batch, &stored, errors.as_ref()).await?;
        tx.commit().await?;
        tracing::info!(batch_id = %batch.id, lines = lines.len(), status = %batch.status, "batch created");
        Ok(Json(batch_object(&WithCounts { batch, completed: 0, failed: 0 })))
    }

    /// Retrieve a batch (OpenAI)
    #[oai(path = "/batches/:id", method = "get", operation_id = "openai_retrieve_batch")]
    async fn retrieve(
        &self,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<Json<Batch>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        Ok(Json(batch_object(&owned(&self.state, auth.0.user_id, &id).await?)))
    }

    /// List batches (OpenAI)
    ///
    /// Newest first.
    #[oai(path = "/batches", method = "get", operation_id = "openai_list_batches")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// The `last_id` of the previous page.
        after: Query<Option<Uuid>>,
        /// 1 to 100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
    ) -> Result<Json<BatchList>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | MALFORMED }>> {
        let (after, limit) = (after.0, limit.0.unwrap_or(DEFAULT_PAGE));
        let batches = db::batches::list_owned(&self.state.pool, auth.0.user_id, after, limit + 1).await?;
        let Page { data, first_id, last_id, has_more } = page(batches, limit, batch_object, |b| b.id);
        Ok(Json(BatchList { object: ListTag::List, data, first_id, last_id, has_more }))
    }

    /// Cancel a batch (OpenAI)
    ///
    /// Its lines not yet run never will; running ones finish. The batch is
    /// `cancelling` until they have, then `cancelled` with their results.
    #[oai(path = "/batches/:id/cancel", method = "post", operation_id = "openai_cancel_batch")]
    async fn cancel(
        &self,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<Json<Batch>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND | CONFLICT }>> {
        let state = &self.state;
        let found = owned(state, auth.0.user_id, &id).await?;
        let batch = &found.batch;
        if batch.status != "cancelling" && !db::batches::request_cancel(&state.pool, batch.id, batch.user_id).await? {
            let message = format!("the batch is `{}`: it can no longer be cancelled", batch.status);
            return Err(ApiError::Conflict(message).into());
        }
        tracing::info!(batch_id = %batch.id, "batch cancellation requested");
        Ok(Json(batch_object(&owned(state, auth.0.user_id, &id).await?)))
    }
}

async fn owned(state: &AppState, user_id: Uuid, id: &str) -> Result<WithCounts, ApiError> {
    let id: Uuid = id.parse().map_err(|_| not_found())?;
    db::batches::get_owned(&state.pool, id, user_id).await?.ok_or_else(not_found)
}
