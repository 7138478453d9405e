//! OpenAI's objects as they go on the wire, typed. poem-openapi both renders them and
//! documents them in `/openapi.json`, so the document cannot drift from what is sent.
//! The shapes are OpenAI's — an `object` tag on each, timestamps in unix seconds,
//! `null` where OpenAI sends `null` — since the SDKs parse them as OpenAI's.

use std::collections::BTreeMap;

use poem_openapi::{types::ToJSON, Enum, Object};
use uuid::Uuid;

// One tag type per object, so each schema names the one `object` value it carries.

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum ListTag {
    #[default]
    #[oai(rename = "list")]
    List,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum ModelTag {
    #[default]
    #[oai(rename = "model")]
    Model,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum FileTag {
    #[default]
    #[oai(rename = "file")]
    File,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum BatchTag {
    #[default]
    #[oai(rename = "batch")]
    Batch,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum CompletionTag {
    #[default]
    #[oai(rename = "chat.completion")]
    Completion,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum ChunkTag {
    #[default]
    #[oai(rename = "chat.completion.chunk")]
    Chunk,
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiError")]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiErrorObject")]
pub struct ErrorObject {
    pub message: String,
    /// `invalid_request_error`, `permission_error`, `requests`, `insufficient_quota`
    /// or `server_error`.
    #[oai(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorResponse {
    pub fn new(message: impl Into<String>, kind: &str, param: Option<&str>, code: Option<&str>) -> Self {
        let error = ErrorObject {
            message: message.into(),
            kind: kind.to_owned(),
            param: param.map(str::to_owned),
            code: code.map(str::to_owned),
        };
        Self { error }
    }

    pub fn to_value(&self) -> serde_json::Value {
        self.to_json().unwrap_or_default()
    }
}

/// A model a chat completion may name.
#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiModel")]
pub struct Model {
    /// `provider/model` for a catalog model; `ultra/<pattern>` for a pattern.
    pub id: String,
    pub object: ModelTag,
    /// When the model was made: unknown here, so 0.
    pub created: i64,
    pub owned_by: String,
}

#[derive(Debug, Object)]
#[oai(rename = "OpenAiModelList")]
pub struct ModelList {
    pub object: ListTag,
    pub data: Vec<Model>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
pub enum FilePurpose {
    /// A batch's input, uploaded.
    #[oai(rename = "batch")]
    Batch,
    /// A batch's output or error file, written by Ultra.
    #[oai(rename = "batch_output")]
    BatchOutput,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum FileStatus {
    /// Stored whole: files are checked at upload and never change.
    #[default]
    #[oai(rename = "processed")]
    Processed,
}

#[derive(Debug, Object)]
pub struct File {
    pub id: Uuid,
    pub object: FileTag,
    /// Its size in bytes.
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: FilePurpose,
    pub status: FileStatus,
    pub status_details: Option<String>,
}

#[derive(Debug, Object)]
pub struct FileList {
    pub object: ListTag,
    pub data: Vec<File>,
    pub first_id: Option<Uuid>,
    pub last_id: Option<Uuid>,
    /// Whether a page follows (ask for it with `after` = `last_id`).
    pub has_more: bool,
}

#[derive(Debug, Object)]
pub struct FileDeleted {
    pub id: Uuid,
    pub object: FileTag,
    pub deleted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

#[derive(Debug, Object)]
pub struct Batch {
    pub id: Uuid,
    pub object: BatchTag,
    /// The endpoint every request runs: `/v1/chat/completions`.
    pub endpoint: String,
    /// Why the input file was refused, one entry per bad line (a `failed` batch).
    pub errors: Option<BatchErrors>,
    pub input_file_id: Uuid,
    pub completion_window: String,
    pub status: BatchStatus,
    /// The requests that succeeded, one JSONL line each (once the batch has ended).
    pub output_file_id: Option<Uuid>,
    /// The requests that did not.
    pub error_file_id: Option<Uuid>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Object)]
pub struct BatchErrors {
    pub object: ListTag,
    pub data: Vec<BatchError>,
}

/// One bad line of an input file.
#[derive(Debug, Object)]
pub struct BatchError {
    /// `invalid_json_line`, `missing_required_parameter`, `duplicate_custom_id`,
    /// `invalid_method`, `invalid_url`, `invalid_request` or `model_not_found`.
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// The line, counting from 1.
    pub line: Option<i64>,
}

#[derive(Debug, Object)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

#[derive(Debug, Object)]
pub struct BatchList {
    pub object: ListTag,
    pub data: Vec<Batch>,
    pub first_id: Option<Uuid>,
    pub last_id: Option<Uuid>,
    /// Whether a page follows (ask for it with `after` = `last_id`).
    pub has_more: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum AssistantRole {
    #[default]
    #[oai(rename = "assistant")]
    Assistant,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Enum)]
pub enum FinishReason {
    /// The answer is whole.
    #[default]
    #[oai(rename = "stop")]
    Stop,
}

/// A completed chat completion.
#[derive(Debug, Object)]
pub struct ChatCompletion {
    /// The job's id (also in the `x-ultra-job-id` header and `GET /v1/jobs/{id}`).
    pub id: Uuid,
    pub object: CompletionTag,
    pub created: i64,
    /// The model the request named.
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: CompletionUsage,
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Object)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Not offered: always `null`.
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Object)]
pub struct AssistantMessage {
    pub role: AssistantRole,
    pub content: String,
    pub refusal: Option<String>,
}

/// The tokens of the job's paid calls, every model and stage together.
#[derive(Debug, Clone, Copy, Object)]
pub struct CompletionUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

impl CompletionUsage {
    pub fn new(input: i64, output: i64) -> Self {
        Self { prompt_tokens: input, completion_tokens: output, total_tokens: input + output }
    }
}

/// One `data:` frame of a streamed completion.
#[derive(Debug, Object)]
pub struct ChatCompletionChunk {
    pub id: Uuid,
    pub object: ChunkTag,
    pub created: i64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    /// One choice while text streams; none in the closing usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Only in the last chunk, when `stream_options.include_usage` asks for it.
    pub usage: Option<CompletionUsage>,
}

#[derive(Debug, Object)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<serde_json::Value>,
    /// `stop` on the last text chunk.
    pub finish_reason: Option<FinishReason>,
}

/// The text added since the previous chunk (the first chunk names the role).
#[derive(Debug, Default, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Delta {
    pub role: Option<AssistantRole>,
    pub content: Option<String>,
}
