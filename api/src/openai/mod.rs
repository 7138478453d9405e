//! The OpenAI-compatible surface, under `/openai/v1`: any OpenAI SDK or tool works
//! against Ultra by changing its base URL. A chat completion is a job like any other
//! — queued, checkpointed, budgeted, rate-limited, listed in `GET /v1/jobs` with its
//! event stream — answered in OpenAI's wire format, errors included.
//!
//! The operations are documented in `/openapi.json` (tag `OpenAI`) beside `/v1`'s,
//! with OpenAI's objects (`objects.rs`) and error shape (`error.rs`).

mod batches;
mod chat;
pub mod error;
pub mod feeder;
mod files;
pub mod models;
mod objects;
mod request;

use std::sync::Arc;

pub use request::MAX_STOP;
use uuid::Uuid;

use crate::state::AppState;

pub type Apis = (models::ModelsApi, chat::ChatApi, files::FilesApi, batches::BatchesApi);

pub fn apis(state: &Arc<AppState>) -> Apis {
    (
        models::ModelsApi { state: state.clone() },
        chat::ChatApi { state: state.clone() },
        files::FilesApi { state: state.clone() },
        batches::BatchesApi { state: state.clone() },
    )
}

/// Model ids contain `/`: the document's `models/{id}` takes it encoded (`%2F`), and
/// this route the SDKs' unencoded form.
pub const MODEL_BY_UNENCODED_ID: &str = "/openai/v1/models/:owner/*rest";

/// The chat completions path: it waits for its job, so the request timeout does not
/// bound it (the job's deadline does).
pub const CHAT_COMPLETIONS: &str = "/openai/v1/chat/completions";

/// A list's page size when the request names none.
pub const DEFAULT_PAGE: i64 = 20;

/// A page in OpenAI's cursor shape from up to `limit + 1` rows (one more than the
/// page says whether another page follows): the items, the first and last ids, and
/// whether more follow.
pub fn page<R, T>(mut rows: Vec<R>, limit: i64, to: impl Fn(&R) -> T, id: impl Fn(&T) -> Uuid) -> Page<T> {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let data: Vec<T> = rows.iter().map(to).collect();
    Page { first_id: data.first().map(&id), last_id: data.last().map(&id), data, has_more }
}

pub struct Page<T> {
    pub data: Vec<T>,
    pub first_id: Option<Uuid>,
    pub last_id: Option<Uuid>,
    pub has_more: bool,
}
