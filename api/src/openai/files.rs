//! `/openai/v1/files`: upload a batch's input (multipart, `purpose=batch`, JSONL),
//! list, read, download and delete files. A batch's output and error files are files
//! too (`purpose=batch_output`). Files live in PostgreSQL, owned by their user:
//! someone else's file answers like a missing one.

use std::sync::Arc;

use common::db::{self, files::FileInfo};
use poem::{Request, RequestBody};
use poem_openapi::{
    param::{Path, Query},
    payload::{Binary, Json},
    registry::{MetaMediaType, MetaRequest, Registry},
    types::multipart::Upload,
    ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, Multipart, OpenApi,
};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use super::{
    error::OpenAiProblems,
    objects::{File, FileDeleted, FileList, FilePurpose, FileStatus, FileTag, ListTag},
    page, Page, DEFAULT_PAGE,
};
use crate::{
    auth::BearerAuth,
    error::{ApiError, FieldError},
    problems::{ALWAYS, BODY, MALFORMED, NOT_FOUND, UNAUTHORIZED},
    routes::ApiTags,
    state::AppState,
};

/// OpenAI's file object.
pub fn file_object(file: &FileInfo) -> File {
    let purpose = if file.purpose == "batch" { FilePurpose::Batch } else { FilePurpose::BatchOutput };
    File {
        id: file.id,
        object: FileTag::File,
        bytes: file.bytes,
        created_at: file.created_at.timestamp(),
        filename: file.filename.clone(),
        purpose,
        status: FileStatus::Processed,
        status_details: None,
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such file")
}

fn file_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| not_found())
}

/// What `POST /openai/v1/files` takes, as the document describes it. The request is
/// read by `Uploaded` instead: poem-openapi's `Upload` spools a file of any size to
/// disk before a handler can refuse it.
#[derive(Debug, Multipart)]
#[allow(dead_code)]
struct UploadForm {
    /// `batch`: the file is a batch's input.
    purpose: UploadPurpose,
    /// JSONL, one request a line (`ULTRA_FILE_MAX_BYTES`, `ULTRA_BATCH_MAX_LINES` at most).
    file: Upload,
}

#[derive(Debug, poem_openapi::Enum)]
enum UploadPurpose {
    #[oai(rename = "batch")]
    Batch,
}

/// An upload, read as it streams in, at most one byte past `ULTRA_FILE_MAX_BYTES`.
struct Uploaded {
    purpose: Option<String>,
    file: Option<(String, Vec<u8>)>,
}

impl<'a> ApiExtractor<'a> for Uploaded {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <UploadForm as poem_openapi::payload::Payload>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        UploadForm::request_meta()
    }

    async fn from_request(
        req: &'a Request,
        body: &mut RequestBody,
        _options: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let state = req.data::<Arc<AppState>>().ok_or_else(|| ApiError::Internal("no state".into()))?;
        let limit = state.config.file_max_bytes;
        let mut multipart =
            <poem::web::Multipart as poem::FromRequest>::from_request(req, body).await.map_err(|err| {
                use poem::error::ParseMultipartError::{ContentTypeRequired, InvalidContentType};
                match err.downcast_ref() {
                    Some(ContentTypeRequired | InvalidContentType(_)) => {
                        ApiError::UnsupportedMediaType(format!("{err}; send multipart/form-data"))
                    }
                    _ => ApiError::BadRequest(format!("malformed upload: {err}")),
                }
            })?;
        let malformed =
            |err: poem::error::ParseMultipartError| ApiError::BadRequest(format!("malformed upload: {err}"));
        let mut uploaded = Uploaded { purpose: None, file: None };
        while let Some(field) = multipart.next_field().await.map_err(malformed)? {
            match field.name() {
                Some("purpose") => uploaded.purpose = Some(field.text().await.map_err(malformed)?),
                Some("file") => {
                    let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
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
                    uploaded.file = Some((filename, content));
                }
                _ => {}
            }
        }
        Ok(uploaded)
    }
}

impl UploadForm {
    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: "multipart/form-data",
                schema: <Self as poem_openapi::payload::Payload>::schema_ref(),
            }],
            required: true,
        })
    }
}

impl Uploaded {
    /// The upload's name and content, if it is a batch input Ultra can take.
    fn check(self, state: &AppState) -> Result<(String, Vec<u8>), ApiError> {
        let mut errors = Vec::new();
        match self.purpose.as_deref() {
            Some("batch") => {}
            Some(other) => errors.push(FieldError::new("purpose", format!("`{other}` is not supported; use `batch`"))),
            None => errors.push(FieldError::new("purpose", "is required")),
        }
        let Some((filename, content)) = self.file else {
            errors.push(FieldError::new("file", "is required"));
            return Err(ApiError::validation(errors));
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
        if errors.is_empty() {
            Ok((filename, content))
        } else {
            Err(ApiError::validation(errors))
        }
    }
}

/// A file's content.
#[derive(ApiResponse)]
enum FileContent {
    /// The file as uploaded, or a batch's results: JSONL, sent as bytes (as OpenAI
    /// sends files).
    #[oai(status = 200, content_type = "application/octet-stream")]
    Ok(Binary<Vec<u8>>),
}

pub struct FilesApi {
    pub state: Arc<AppState>,
}

#[OpenApi(prefix_path = "/openai/v1", tag = "ApiTags::OpenAi")]
impl FilesApi {
    /// Upload a file (OpenAI)
    ///
    /// A batch's input: `purpose=batch`, JSONL with one request a line.
    #[oai(path = "/files", method = "post", operation_id = "openai_upload_file")]
    async fn upload(
        &self,
        auth: BearerAuth,
        upload: Uploaded,
    ) -> Result<Json<File>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | BODY }>> {
        let (filename, content) = upload.check(&self.state)?;
        let stored = db::files::insert(&self.state.pool, auth.0.user_id, "batch", &filename, &content).await?;
        Ok(Json(file_object(&stored)))
    }

    /// List files (OpenAI)
    ///
    /// Newest first.
    #[oai(path = "/files", method = "get", operation_id = "openai_list_files")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// The `last_id` of the previous page.
        after: Query<Option<Uuid>>,
        /// 1 to 100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
    ) -> Result<Json<FileList>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | MALFORMED }>> {
        let (after, limit) = (after.0, limit.0.unwrap_or(DEFAULT_PAGE));
        let files = db::files::list_owned(&self.state.pool, auth.0.user_id, after, limit + 1).await?;
        let Page { data, first_id, last_id, has_more } = page(files, limit, file_object, |f| f.id);
        Ok(Json(FileList { object: ListTag::List, data, first_id, last_id, has_more }))
    }

    /// Retrieve a file (OpenAI)
    #[oai(path = "/files/:id", method = "get", operation_id = "openai_retrieve_file")]
    async fn retrieve(
        &self,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<Json<File>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        let file = db::files::get_owned(&self.state.pool, file_id(&id)?, auth.0.user_id).await?;
        Ok(Json(file_object(&file.ok_or_else(not_found)?)))
    }

    /// Download a file (OpenAI)
    #[oai(path = "/files/:id/content", method = "get", operation_id = "openai_download_file")]
    async fn download(
        &self,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<FileContent, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        let content = db::files::content_owned(&self.state.pool, file_id(&id)?, auth.0.user_id).await?;
        Ok(FileContent::Ok(Binary(content.ok_or_else(not_found)?)))
    }

    /// Delete a file (OpenAI)
    #[oai(path = "/files/:id", method = "delete", operation_id = "openai_delete_file")]
    async fn delete(
        &self,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<Json<FileDeleted>, OpenAiProblems<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>> {
        let id = file_id(&id)?;
        if !db::files::delete_owned(&self.state.pool, id, auth.0.user_id).await? {
            return Err(not_found().into());
        }
        Ok(Json(FileDeleted { id, object: FileTag::File, deleted: true }))
    }
}
