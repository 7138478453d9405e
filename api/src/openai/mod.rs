//! The OpenAI-compatible surface, under `/openai/v1`: any OpenAI SDK or tool works
//! against Ultra by changing its base URL. A chat completion is a job like any other
//! — queued, checkpointed, budgeted, rate-limited, listed in `GET /v1/jobs` with its
//! event stream — answered in OpenAI's wire format, errors included.
//!
//! Model ids contain `/` (`mock/alpha`, `ultra/critique`), sent as is by some SDKs and
//! as `%2F` by others, so `models/{id}` takes the rest of the path, decoded.

mod batches;
mod chat;
pub mod error;
pub mod feeder;
mod files;
pub mod models;
mod request;

use poem::{endpoint::BoxEndpoint, get, post, Endpoint, EndpointExt, IntoResponse, Request, Response, Route};

use crate::{auth::Principal, error::ApiError};

/// The routes, to nest at `/openai/v1`: every one for authenticated callers only (the
/// gate has resolved the bearer token, if any, to a principal).
pub fn routes() -> BoxEndpoint<'static, Response> {
    Route::new()
        .at("/models", get(models::list))
        .at("/models/*id", get(models::retrieve))
        .at("/chat/completions", post(chat::completions))
        .at("/files", get(files::list).post(files::upload))
        .at("/files/:id", get(files::retrieve).delete(files::delete))
        .at("/files/:id/content", get(files::download))
        .at("/batches", get(batches::list).post(batches::create))
        .at("/batches/:id", get(batches::retrieve))
        .at("/batches/:id/cancel", post(batches::cancel))
        .around(|endpoint, req: Request| async move {
            if req.extensions().get::<Principal>().is_none() {
                return Err(ApiError::Unauthorized.into());
            }
            endpoint.call(req).await.map(IntoResponse::into_response)
        })
        .boxed()
}

/// The caller, whom the gate resolved (every route here requires one).
fn principal(req: &Request) -> Result<Principal, ApiError> {
    req.extensions().get::<Principal>().cloned().ok_or(ApiError::Unauthorized)
}

/// The chat completions path: it waits for its job, so the request timeout does not
/// bound it (the job's deadline does).
pub const CHAT_COMPLETIONS: &str = "/openai/v1/chat/completions";
