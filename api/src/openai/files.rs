//! `/openai/v1/files`: upload a batch's input (multipart, `purpose=batch`, JSONL),
//! list, read, download and delete files. A batch's output and error files are files
//! too (`purpose=batch_output`). Files live in PostgreSQL, owned by their user:
//! someone else's file answers like a missing one.

use std::sync::Arc;

use common::db::{self, files::FileInfo};
use poem::{
    handler,
    web::{Data, Json, Multipart, Path, Query},
    IntoResponse, Request, Response,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use super::principal;
use crate::{
    error::{ApiError, FieldError},
    state::AppState,
};

/// OpenAI's file object.
pub fn file_json(file: &FileInfo) -> Value {
    json!({
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at.timestamp(),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": null,
    })
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such file")
}

fn file_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| not_found())
}

#[handler]
pub async fn upload(
    req: &Request,
    mut multipart: Multipart,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Response> {
    let principal = principal(req)?;
    let limit = state.config.file_max_bytes;
    let (mut purpose, mut file) = (None, None);
    let malformed = |err: poem::error::ParseMultipartError| ApiError::BadRequest(format!("malformed upload: {err}"));
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(malformed)?),
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                // At most one byte past the limit is read: enough to know it is too large.
                let mut content = Vec::new();
                let mut reader = Box::pin(field.into_async_read().take(limit as u64 + 1));
                reader
                    .read_to_end(&mut content)
                    .await
                    .map_err(|e| ApiError::BadRequest(format!("cannot read the upload: {e}")))?;
                if content.len() > limit {
                    return Err(ApiError::PayloadTooLarge(
                        format!("the file exceeds {limit} bytes"),
                        Some(FieldError::new("file", format!("at most {limit} bytes"))),
                    )
                    .into());
                }
                file = Some((filename, content));
            }
            _ => {}
        }
    }
    let mut errors = Vec::new();
    match purpose.as_deref() {
        Some("batch") => {}
        Some(other) => errors.push(FieldError::new("purpose", format!("`{other}` is not supported; use `batch`"))),
        None => errors.push(FieldError::new("purpose", "is required")),
    }
    let Some((filename, content)) = file else {
        errors.push(FieldError::new("file", "is required"));
        return Err(ApiError::validation(errors).into());
    };
    match std::str::from_utf8(&content) {
        Err(_) => errors.push(FieldError::new("file", "must be UTF-8 JSONL")),
        Ok(text) => {
            let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
            let most = state.config.batch_max_lines;
            if lines == 0 {
                errors.push(FieldError::new("file", "holds no request"));
            } else if lines > most {
                errors.push(FieldError::new("file", format!("{lines} lines; at most {most}")));
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors).into());
    }
    let stored = db::files::insert(&state.pool, principal.user_id, "batch", &filename, &content)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(file_json(&stored)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct Page {
    after: Option<String>,
    limit: Option<i64>,
}

/// A page of a list in OpenAI's cursor shape, from up to `limit + 1` rows (one more
/// than the page says whether another page follows).
pub fn page<T>(mut rows: Vec<T>, limit: i64, to_json: impl Fn(&T) -> Value) -> Value {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let data: Vec<Value> = rows.iter().map(to_json).collect();
    let first = data.first().map(|d| d["id"].clone());
    let last = data.last().map(|d| d["id"].clone());
    json!({ "object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more })
}

impl Page {
    /// The cursor and the page size (1 to 100, default 20).
    pub fn parse(&self) -> Result<(Option<Uuid>, i64), ApiError> {
        let after = match self.after.as_deref() {
            None | Some("") => None,
            Some(raw) => Some(raw.parse().map_err(|_| ApiError::field("after", "not an id from this list"))?),
        };
        let limit = self.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::field("limit", "must be between 1 and 100"));
        }
        Ok((after, limit))
    }
}

#[handler]
pub async fn list(
    req: &Request,
    Query(page_query): Query<Page>,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Json<Value>> {
    let principal = principal(req)?;
    let (after, limit) = page_query.parse()?;
    let files =
        db::files::list_owned(&state.pool, principal.user_id, after, limit + 1).await.map_err(ApiError::from)?;
    Ok(Json(page(files, limit, file_json)))
}

#[handler]
pub async fn retrieve(
    req: &Request,
    Path(id): Path<String>,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Json<Value>> {
    let principal = principal(req)?;
    let file = db::files::get_owned(&state.pool, file_id(&id)?, principal.user_id).await.map_err(ApiError::from)?;
    Ok(Json(file_json(&file.ok_or_else(not_found)?)))
}

#[handler]
pub async fn download(
    req: &Request,
    Path(id): Path<String>,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Response> {
    let principal = principal(req)?;
    let content =
        db::files::content_owned(&state.pool, file_id(&id)?, principal.user_id).await.map_err(ApiError::from)?;
    let content = content.ok_or_else(not_found)?;
    Ok(Response::builder().content_type("application/jsonl").body(content))
}

#[handler]
pub async fn delete(
    req: &Request,
    Path(id): Path<String>,
    Data(state): Data<&Arc<AppState>>,
) -> poem::Result<Json<Value>> {
    let principal = principal(req)?;
    let id = file_id(&id)?;
    if !db::files::delete_owned(&state.pool, id, principal.user_id).await.map_err(ApiError::from)? {
        return Err(not_found().into());
    }
    Ok(Json(json!({ "id": id, "object": "file", "deleted": true })))
}
