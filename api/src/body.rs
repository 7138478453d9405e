//! `JsonBody<T>`: a JSON request body parsed with serde, strictly. poem-openapi's own
//! `Json` accepts numbers for strings and does not say which field was wrong; clients
//! deserve `models[1]: invalid type: integer, expected a string`. The body is read
//! with a hard size limit, so an oversized upload is refused without being buffered.

use poem::{Request, RequestBody};
use poem_openapi::{
    registry::{MetaMediaType, MetaRequest, Registry},
    types::Type,
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};

/// Largest request body read when no limit is configured.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// The body size limit, stored in the request's data by the app.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

pub struct JsonBody<T>(pub T);

impl<'a, T> ApiExtractor<'a> for JsonBody<T>
where
    T: DeserializeOwned + Type + Send,
{
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType { content_type: "application/json", schema: T::schema_ref() }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _options: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        read_json(request, body.take()?).await.map(JsonBody).map_err(Into::into)
    }
}

/// Reads a JSON request body within the request's size limit and parses it: the one
/// reading every JSON endpoint shares, documented (`JsonBody`) or not.
async fn read_json<T: DeserializeOwned>(request: &Request, body: poem::Body) -> Result<T, ApiError> {
    let content_type = request.content_type().unwrap_or_default();
    if !is_json(content_type) {
        let shown = if content_type.is_empty() { "none".to_owned() } else { format!("`{content_type}`") };
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {shown} is not supported; send application/json"
        )));
    }
    let limit = request.data::<BodyLimit>().map_or(DEFAULT_BODY_LIMIT, |l| l.0);
    let bytes = body.into_bytes_limit(limit).await.map_err(|err| match err {
        poem::error::ReadBodyError::PayloadTooLarge => {
            ApiError::PayloadTooLarge(format!("request body exceeds {limit} bytes"), None)
        }
        other => ApiError::BadRequest(format!("cannot read request body: {other}")),
    })?;
    parse(&bytes)
}

/// `application/json` or `application/*+json`, with optional parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Malformed JSON is a 400; well-formed JSON of the wrong shape is a 422 naming the field.
/// Every request body is an object: serde would also take a struct from an array of
/// its fields in order, which no client means.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => ApiError::Validation(vec![FieldError::new("body", "must be a JSON object")]),
            Err(err) => ApiError::BadRequest(format!("malformed JSON: {err}")),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            ApiError::BadRequest(format!("malformed JSON: {inner}"))
        } else {
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::Validation(vec![FieldError::new(field, strip_position(&inner.to_string()))])
        }
    })?;
    // Trailing data after the document is malformed JSON, not a second request.
    de.end().map_err(|err| ApiError::BadRequest(format!("malformed JSON: {err}")))?;
    Ok(value)
}

/// For an optional field holding a struct (`#[serde(default, deserialize_with =
/// "body::object")]`): an object or `null`, never the array serde would also take.
pub fn object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::de::Error;
    match <Option<serde_json::Value> as serde::Deserialize>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value @ serde_json::Value::Object(_)) => {
            serde_path_to_error::deserialize(value).map(Some).map_err(|err| {
                // The outer path names this field; the message names the field inside it.
                D::Error::custom(format!("{}: {}", err.path(), err.inner()))
            })
        }
        Some(_) => Err(D::Error::custom("invalid type: expected an object")),
    }
}

/// serde_json appends " at line 1 column 42"; the field path already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        tags: Vec<String>,
    }

    fn field_of(err: ApiError) -> String {
        match err {
            ApiError::Validation(errors) => errors[0].field.clone(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = parse::<Sample>(br#"{"name": "a", "tags": ["x", 5]}"#).expect_err("invalid");
        assert_eq!(field_of(err), "tags[1]");
        let err = parse::<Sample>(br#"{"name": 5, "tags": []}"#).expect_err("invalid");
        assert_eq!(field_of(err), "name");
    }

    #[test]
    fn unknown_and_missing_fields_are_422() {
        assert!(matches!(
            parse::<Sample>(br#"{"name": "a", "tags": [], "tier": "pro"}"#),
            Err(ApiError::Validation(_))
        ));
        assert!(matches!(parse::<Sample>(br#"{"name": "a"}"#), Err(ApiError::Validation(_))));
    }

    #[derive(Debug, serde::Deserialize)]
    struct Outer {
        #[serde(default, deserialize_with = "object")]
        inner: Option<Sample>,
    }

    #[test]
    fn an_object_is_never_taken_from_an_array() {
        // serde alone would read both as `Sample { name: "a", tags: [] }`.
        assert_eq!(field_of(parse::<Sample>(br#" ["a", []]"#).expect_err("array body")), "body");
        assert_eq!(field_of(parse::<Outer>(br#"{"inner": ["a", []]}"#).expect_err("array field")), "inner");
        let err = parse::<Outer>(br#"{"inner": {"name": "a", "tags": [5]}}"#).expect_err("wrong type inside");
        assert!(err.to_string().contains("tags[0]") || format!("{err:?}").contains("tags[0]"), "{err:?}");
        let inner = parse::<Outer>(br#"{"inner": {"name": "a", "tags": []}}"#).expect("object").inner;
        assert_eq!(inner.map(|s| s.name).as_deref(), Some("a"));
        assert!(parse::<Outer>(br#"{"inner": null}"#).expect("null").inner.is_none());
    }

    #[test]
    fn malformed_json_is_400() {
        assert!(matches!(parse::<Sample>(br#"{"name": "a""#), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse::<Sample>(br#"{"name": "a", "tags": []} trailing"#), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse::<Sample>(b""), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse::<Sample>(b"[1,"), Err(ApiError::BadRequest(_))), "malformed, array or not");
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/problem+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }
}
