//! The OpenAI-compatible surface, under `/openai/v1`: any OpenAI SDK or tool works
//! against Ultra by changing its base URL. A chat completion is a job like any other
//! — queued, checkpointed, budgeted, rate-limited, listed in `GET /v1/jobs` with its
//! event stream — answered in OpenAI's wire format, errors included.
//!
//! Model ids contain `/` (`mock/alpha`, `ultra/critique`), sent as is by some SDKs and
//! as `%2F` by others, so `models/{id}` takes the rest of the path, decoded.

mod chat;
pub mod error;
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
        .around(|endpoint, req: Request| async move {
            if req.extensions().get::<Principal>().is_none() {
                return Err(ApiError::Unauthorized.into());
            }
            endpoint.call(req).await.map(IntoResponse::into_response)
        })
        .boxed()
}

/// The chat completions path: it waits for its job, so the request timeout does not
/// bound it (the job's deadline does).
pub const CHAT_COMPLETIONS: &str = "/openai/v1/chat/completions";
