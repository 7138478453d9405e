//! `/openai/v1/batches`: OpenAI's Batch API. Creating a batch checks its input file
//! as OpenAI does — a line that is not JSON, a duplicate `custom_id`, a wrong `url`
//! or an unknown model fails the batch with `errors.data[]` naming the line — and
//! stores one row per request; the feeder (`feeder.rs`) turns them into jobs.

use std::{collections::HashSet, sync::Arc, time::Duration};

use common::db::{self, batches::WithCounts};
use poem::{
    handler,
    web::{Data, Json, Path, Query},
    Body, Request,
};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    files::{page, Page},
    principal,
    request::ChatRequest,
};
use crate::{body, error::ApiError, state::AppState};

/// The one endpoint a batch may run.
pub const ENDPOINT: &str = "/v1/chat/completions";
/// The one completion window OpenAI offers.
const WINDOW: (&str, Duration) = ("24h", Duration::from_secs(24 * 3600));
/// Most validation errors a failed batch lists.
const MOST_ERRORS: usize = 100;

#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<std::collections::BTreeMap<String, String>>,
}

fn unix(at: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    at.map_or(Value::Null, |at| json!(at.timestamp()))
}

/// OpenAI's batch object.
pub fn batch_json(found: &WithCounts) -> Value {
    let b = &found.batch;
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": b.errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at.timestamp(),
        "in_progress_at": unix(b.in_progress_at),
        "expires_at": b.expires_at.timestamp(),
        "finalizing_at": unix(b.finalizing_at),
        "completed_at": unix(b.completed_at),
        "failed_at": unix(b.failed_at),
        "expired_at": unix(b.expired_at),
        "cancelling_at": unix(b.cancelling_at),
        "cancelled_at": unix(b.cancelled_at),
        "request_counts": { "total": b.total, "completed": found.completed, "failed": found.failed },
        "metadata": b.metadata,
    })
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
        let request: Value = match serde_json::from_str(raw) {
            Ok(request) => request,
            Err(err) => {
                fail(number, "invalid_json_line", None, format!("line {number} is not JSON: {err}"));
                continue;
            }
        };
        let Some(custom_id) = request["custom_id"].as_str().filter(|id| !id.is_empty()) else {
            fail(number, "missing_required_parameter", Some("custom_id"), format!("line {number} has no `custom_id`"));
            continue;
        };
        if !seen.insert(custom_id.to_owned()) {
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
        let body = request["body"].clone();
        match serde_json::from_value::<ChatRequest>(body.clone()) {
            Err(err) => fail(number, "invalid_request", Some("body"), format!("line {number}: `body` {err}")),
            Ok(chat) if !super::models::exists(state, &chat.model) => {
                let message = format!("line {number}: the model `{}` does not exist", chat.model);
                fail(number, "model_not_found", Some("body.model"), message);
            }
            Ok(_) => lines.push(Line { number: number as i32, custom_id: custom_id.to_owned(), body }),
        }
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        errors.truncate(MOST_ERRORS);
        Err(errors)
    }
}

#[handler]
pub async fn create(req: &Request, body: Body, Data(state): Data<&Arc<AppState>>) -> poem::Result<Json<Value>> {
    let principal = principal(req)?;
    let request: CreateBatch = body::read_json(req, body).await?;
    if request.endpoint != ENDPOINT {
        return Err(ApiError::field("endpoint", format!("only `{ENDPOINT}` is supported")).into());
    }
    if request.completion_window != WINDOW.0 {
        return Err(ApiError::field("completion_window", "only `24h` is supported").into());
    }
    let not_a_file = || ApiError::field("input_file_id", "no such file");
    let file_id: Uuid = request.input_file_id.parse().map_err(|_| not_a_file())?;
    let content = db::files::content_owned(&state.pool, file_id, principal.user_id).await.map_err(ApiError::from)?;
    let content = content.ok_or_else(not_a_file)?;
    let text = String::from_utf8_lossy(&content);
    let (lines, errors) = match check_input(state, &text) {
        Ok(lines) => (lines, None),
        Err(errors) => (Vec::new(), Some(json!({ "object": "list", "data": errors }))),
    };
    let metadata = request.metadata.map(|m| json!(m));
    let new_batch = db::batches::NewBatch {
        user_id: principal.user_id,
        input_file_id: file_id,
        endpoint: ENDPOINT,
        completion_window: WINDOW.0,
        window: WINDOW.1,
        metadata: metadata.as_ref(),
    };
    let stored: Vec<db::batches::NewLine<'_>> =
        lines.iter().map(|l| db::batches::NewLine { line: l.number, custom_id: &l.custom_id, body: &l.body }).collect();
    let mut tx = state.pool.begin().await.map_err(ApiError::from)?;
    let batch = db::batches::create(&mut tx, &new_batch, &stored, errors.as_ref()).await.map_err(ApiError::from)?;
    tx.commit().await.map_err(ApiError::from)?;
    tracing::info!(batch_id = %batch.id, lines = lines.len(), status = %batch.status, "batch created");
    Ok(Json(batch_json(&WithCounts { batch, completed: 0, failed: 0 })))
}

async fn owned(state: &AppState, req: &Request, id: &str) -> Result<WithCounts, ApiError> {
    let principal = principal(req)?;
    let id: Uuid = id.parse().map_err(|_| not_found())?;
    db::batches::get_owned(&state.pool, id, principal.user_id).await?.ok_or_else(not_found)
}

#[handler]
pub async fn retrieve(
    req: &Request,
    Path(id): Path<String>,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Json<Value>> {
    Ok(Json(batch_json(&owned(state, req, &id).await?)))
}

#[handler]
pub async fn list(
    req: &Request,
    Query(page_query): Query<Page>,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Json<Value>> {
    let principal = principal(req)?;
    let (after, limit) = page_query.parse()?;
    let batches =
        db::batches::list_owned(&state.pool, principal.user_id, after, limit + 1).await.map_err(ApiError::from)?;
    Ok(Json(page(batches, limit, batch_json)))
}

/// Cancels a batch: its lines not yet run never will; running ones finish. The batch
/// is `cancelling` until they have, then `cancelled` with their results.
#[handler]
pub async fn cancel(
    req: &Request,
    Path(id): Path<String>,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Json<Value>> {
    let found = owned(state, req, &id).await?;
    let batch = &found.batch;
    if batch.status != "cancelling"
        && !db::batches::request_cancel(&state.pool, batch.id, batch.user_id).await.map_err(ApiError::from)?
    {
        return Err(
            ApiError::Conflict(format!("the batch is `{}`: it can no longer be cancelled", batch.status)).into()
        );
    }
    tracing::info!(batch_id = %batch.id, "batch cancellation requested");
    Ok(Json(batch_json(&owned(state, req, &id).await?)))
}
