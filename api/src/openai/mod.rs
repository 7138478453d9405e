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
