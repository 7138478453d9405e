//! The problem responses each operation declares. `ApiError` can take every status;
//! an operation returns `Problems<CAN>`, where `CAN` names the statuses it can really
//! answer, so the OpenAPI document lists those and no others (a `GET /v1/jobs/{id}`
//! cannot answer "email already registered"). Every `ApiError` converts into any
//! `Problems`, so handlers keep using `?`.

use poem_openapi::{
    registry::{MetaResponses, Registry},
    ApiResponse,
};

use crate::error::ApiError;

/// 400: malformed JSON, header or parameter.
pub const MALFORMED: u32 = 1 << 0;
/// 401: missing or bad credentials.
pub const UNAUTHORIZED: u32 = 1 << 1;
/// 403: not allowed to the caller.
pub const FORBIDDEN: u32 = 1 << 2;
/// 404: nothing the caller can see by that id.
pub const NOT_FOUND: u32 = 1 << 3;
/// 409: conflicts with existing state.
pub const CONFLICT: u32 = 1 << 4;
/// 413, 415, 422: a request body too large, not JSON, or invalid.
pub const BODY: u32 = MALFORMED | (1 << 5) | (1 << 6) | (1 << 7);
/// 429, 500, 503: any `/v1` operation (rate limits, and the server or a dependency failing).
pub const ALWAYS: u32 = (1 << 8) | (1 << 9) | (1 << 10);

/// The bit of a problem status.
const fn bit(status: u16) -> u32 {
    match status {
        400 => MALFORMED,
        401 => UNAUTHORIZED,
        403 => FORBIDDEN,
        404 => NOT_FOUND,
        409 => CONFLICT,
        413 => 1 << 5,
        415 => 1 << 6,
        422 => 1 << 7,
        429 => 1 << 8,
        500 => 1 << 9,
        503 => 1 << 10,
        _ => 0,
    }
}

/// An operation's error: an `ApiError`, documented as only the statuses in `CAN`.
#[derive(Debug)]
pub struct Problems<const CAN: u32>(pub ApiError);

impl<const CAN: u32, E: Into<ApiError>> From<E> for Problems<CAN> {
    fn from(err: E) -> Self {
        Self(err.into())
    }
}

impl<const CAN: u32> From<Problems<CAN>> for poem::Error {
    fn from(problems: Problems<CAN>) -> Self {
        problems.0.into()
    }
}

impl<const CAN: u32> ApiResponse for Problems<CAN> {
    fn meta() -> MetaResponses {
        let mut meta = ApiError::meta();
        meta.responses.retain(|response| response.status.is_some_and(|status| bit(status) & CAN != 0));
        meta
    }

    fn register(registry: &mut Registry) {
        ApiError::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_documents_only_what_it_can_answer() {
        let statuses = |meta: MetaResponses| meta.responses.iter().filter_map(|r| r.status).collect::<Vec<_>>();
        assert_eq!(statuses(Problems::<{ ALWAYS | UNAUTHORIZED | NOT_FOUND }>::meta()), [401, 404, 429, 500, 503]);
        assert_eq!(
            statuses(Problems::<{ ALWAYS | BODY | CONFLICT }>::meta()),
            [400, 409, 413, 415, 422, 429, 500, 503]
        );
        // Every status ApiError documents has a bit.
        assert!(statuses(ApiError::meta()).into_iter().all(|status| bit(status) != 0));
    }
}
