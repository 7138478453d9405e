//! The OpenAPI document as served: poem-openapi's, made to say what the server does.
//!
//! poem-openapi derives the document from the types, but some truths are not in a
//! type, and some of its renderings defeat generated clients. So the document is
//! finished here, once at start-up, in one place:
//! - a field the server may leave empty is `nullable` (an `Option` is sent as `null`);
//! - a described field whose type is a named schema is a plain `$ref`, not an `allOf`
//!   wrapper carrying the description (generators cannot take `allOf` of an enum);
//! - request bodies are closed (`additionalProperties: false`): unknown fields are
//!   refused (`deny_unknown_fields`);
//! - what the configuration decides is an `enum`: the model ids a job may name, the
//!   patterns, the tiers;
//! - an event stream is text (`text/event-stream`), not a JSON array.
//!
//! **Decision — finish the document rather than fork the derive.** The alternative,
//! hand-written schemas per type, would drift from the types they describe.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// What the configuration allows, for the `enum`s.
pub struct Choices<'a> {
    pub models: Vec<&'a str>,
    pub patterns: Vec<&'a str>,
    pub tiers: Vec<&'a str>,
    /// `ULTRA_MAX_PROMPT_CHARS`.
    pub max_prompt_chars: usize,
    /// `ULTRA_MAX_MODELS_PER_JOB` (a tier may allow fewer).
    pub max_models: usize,
}

/// A prompt has a character that is not white space and no NUL. The white space is
/// ECMAScript's `\s` spelled out, since Python's `\s` (schemathesis, many validators)
/// means more; `jobs::is_blank` is the same list.
pub const PROMPT_PATTERN: &str = "^[^\\u0000]*[^\\t\\n\\u000b\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff\\u0000][^\\u0000]*$";

/// OpenAI's requests take fields Ultra does not know when they carry their neutral
/// value (some clients send every field), so their schemas are not closed.
/// `StreamOptions` and `CreateBatch` ignore fields they do not know, as OpenAI adds
/// options over time.
const OPEN_SCHEMAS: [&str; 5] =
    ["ChatCompletionRequest", "ChatCompletionMessage", "ContentPart", "StreamOptions", "CreateBatch"];

/// The roles a chat message may have (`developer` is OpenAI's newer `system`).
const CHAT_ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// The served document, from poem-openapi's JSON.
pub fn finish(spec: &str, choices: &Choices<'_>) -> Result<String, serde_json::Error> {
    let mut doc: Value = serde_json::from_str(spec)?;
    let request_schemas = request_schemas(&doc);
    // The OpenAI surface's models: catalog models, and `ultra/<pattern>` per pattern.
    let prefix = crate::openai::models::PATTERN_PREFIX;
    let chat_models: Vec<String> = choices
        .models
        .iter()
        .map(|m| (*m).to_owned())
        .chain(choices.patterns.iter().map(|p| format!("{prefix}{p}")))
        .collect();
    if let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(Value::as_object_mut) {
        let enums: BTreeSet<String> = schemas
            .iter()
            .filter(|(_, schema)| schema.get("enum").is_some())
            .map(|(name, _)| format!("#/components/schemas/{name}"))
            .collect();
        let enum_bodies: Map<String, Value> = schemas
            .iter()
            .filter(|(_, schema)| schema.get("enum").is_some())
            .map(|(name, schema)| (format!("#/components/schemas/{name}"), schema.clone()))
            .collect();
        for (name, schema) in schemas.iter_mut() {
            untyped_unions(schema);
            finish_object(schema, &enums, &enum_bodies);
            if request_schemas.contains(name)
                && schema.get("properties").is_some()
                && !OPEN_SCHEMAS.contains(&name.as_str())
            {
                schema["additionalProperties"] = Value::Bool(false);
            }
        }
        let ids = |values: &[&str]| Value::from(values.iter().map(|v| Value::from(*v)).collect::<Vec<_>>());
        set(schemas, "AnalyzeRequest", &["properties", "models", "items", "enum"], ids(&choices.models));
        set(schemas, "AnalyzeRequest", &["properties", "models", "minItems"], json!(1));
        set(schemas, "AnalyzeRequest", &["properties", "models", "maxItems"], json!(choices.max_models));
        set(schemas, "AnalyzeRequest", &["properties", "models", "uniqueItems"], json!(true));
        set(schemas, "AnalyzeRequest", &["properties", "prompt", "minLength"], json!(1));
        set(schemas, "AnalyzeRequest", &["properties", "prompt", "maxLength"], json!(choices.max_prompt_chars));
        set(schemas, "AnalyzeRequest", &["properties", "prompt", "pattern"], json!(PROMPT_PATTERN));
        set(schemas, "AnalyzeRequest", &["properties", "pattern", "enum"], ids(&choices.patterns));
        set(schemas, "AnalyzeOptions", &["properties", "synthesis_model", "enum"], ids(&choices.models));
        set(schemas, "AnalyzeOptions", &["properties", "min_models", "maximum"], json!(choices.max_models));
        set(schemas, "UserUpdate", &["properties", "tier", "enum"], ids(&choices.tiers));
        set(schemas, "Credentials", &["properties", "email", "format"], json!("email"));
        set(schemas, "ChatCompletionRequest", &["properties", "model", "enum"], json!(chat_models));
        set(schemas, "ChatCompletionMessage", &["properties", "role", "enum"], json!(CHAT_ROLES));
        set(schemas, "ContentPart", &["properties", "type", "enum"], json!(["text"]));
        set(schemas, "MessageContent", &["oneOf", "0", "pattern"], json!(PROMPT_PATTERN));
        set(schemas, "MessageContent", &["oneOf", "1", "minItems"], json!(1));
        set(schemas, "StopSequences", &["oneOf", "1", "maxItems"], json!(crate::openai::MAX_STOP));
        set(schemas, "UltraOptions", &["properties", "models", "minItems"], json!(1));
        set(schemas, "UltraOptions", &["properties", "models", "maxItems"], json!(choices.max_models));
        set(schemas, "UltraOptions", &["properties", "models", "uniqueItems"], json!(true));
        set(schemas, "UltraOptions", &["properties", "models", "items", "enum"], ids(&choices.models));
        set(schemas, "UltraOptions", &["properties", "synthesis_model", "enum"], ids(&choices.models));
        set(schemas, "UltraOptions", &["properties", "min_models", "minimum"], json!(1));
        set(schemas, "UltraOptions", &["properties", "min_models", "maximum"], json!(choices.max_models));
    }
    if let Some(Value::Object(id)) = doc.pointer_mut("/paths/~1openai~1v1~1models~1{id}/get/parameters/0/schema") {
        id.insert("enum".to_owned(), json!(chat_models));
    }
    inline_bodies_are_finished(&mut doc);
    event_streams_are_text(&mut doc);
    serde_json::to_string_pretty(&doc)
}

/// Nullable optional fields and plain `$ref`s, in one object schema.
fn finish_object(schema: &mut Value, enums: &BTreeSet<String>, enum_bodies: &Map<String, Value>) {
    let required: BTreeSet<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else { return };
    for (name, property) in properties.iter_mut() {
        unwrap_described_ref(property);
        if required.contains(name) {
            continue;
        }
        // An optional field is `null` when empty (the server sends `Option::None` so).
        match property.get("$ref").and_then(Value::as_str).map(str::to_owned) {
            // An enum is inlined: `allOf` of a non-object is what generators refuse.
            Some(reference) if enums.contains(&reference) => {
                let mut inlined = enum_bodies.get(&reference).cloned().unwrap_or_else(|| json!({}));
                inlined["nullable"] = Value::Bool(true);
                *property = inlined;
            }
            Some(reference) => *property = json!({ "allOf": [{ "$ref": reference }], "nullable": true }),
            None => property["nullable"] = Value::Bool(true),
        }
    }
}

/// poem-openapi types every union `object`, even one of a string and an array
/// (`MessageContent`, `StopSequences`), which no value can satisfy.
fn untyped_unions(schema: &mut Value) {
    let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) else { return };
    let not_objects = alternatives.iter().any(|a| a.get("type").is_some_and(|t| t != "object"));
    if let (true, Some(object)) = (not_objects, schema.as_object_mut()) {
        object.remove("type");
    }
}

/// `{"description": …, "allOf": [{"$ref": X}, {"description": …}]}` → `{"$ref": X}`.
fn unwrap_described_ref(property: &mut Value) {
    let Some(parts) = property.get("allOf").and_then(Value::as_array) else { return };
    let mut references = parts.iter().filter_map(|p| p.get("$ref"));
    let only_descriptions = parts
        .iter()
        .all(|p| p.get("$ref").is_some() || p.as_object().is_some_and(|o| o.keys().all(|k| k == "description")));
    if let (Some(reference), None, true) = (references.next().cloned(), references.next(), only_descriptions) {
        *property = json!({ "$ref": reference });
    }
}

/// Names of the schemas a request body reaches (directly or through its fields).
fn request_schemas(doc: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending: Vec<String> = Vec::new();
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for operation in paths.values().filter_map(Value::as_object).flat_map(|ops| ops.values()) {
            if let Some(body) = operation.get("requestBody") {
                collect_refs(body, &mut pending);
            }
        }
    }
    while let Some(reference) = pending.pop() {
        let Some(name) = reference.strip_prefix("#/components/schemas/") else { continue };
        if found.insert(name.to_owned()) {
            if let Some(schema) = doc.pointer(&format!("/components/schemas/{name}")) {
                collect_refs(schema, &mut pending);
            }
        }
    }
    found
}

fn collect_refs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            if let Some(reference) = object.get("$ref").and_then(Value::as_str) {
                into.push(reference.to_owned());
            }
            object.values().for_each(|v| collect_refs(v, into));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, into)),
        _ => {}
    }
}

/// Sets `value` at `path` inside schema `name`, if the schema and the path's parent exist.
fn set(schemas: &mut Map<String, Value>, name: &str, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut at = schemas.get_mut(name);
    for key in parents {
        at = at.and_then(|v| match key.parse::<usize>() {
            Ok(index) => v.get_mut(index),
            Err(_) => v.get_mut(*key),
        });
    }
    if let Some(Value::Object(parent)) = at {
        parent.insert((*last).to_owned(), value);
    }
}

/// A request body's schema written inline (a multipart form's) gets the same plain
/// `$ref`s as the named ones.
fn inline_bodies_are_finished(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for operation in paths.values_mut().filter_map(Value::as_object_mut).flat_map(|ops| ops.values_mut()) {
        let Some(contents) = operation.pointer_mut("/requestBody/content").and_then(Value::as_object_mut) else {
            continue;
        };
        for schema in contents.values_mut().filter_map(|c| c.get_mut("schema")) {
            if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
                properties.values_mut().for_each(unwrap_described_ref);
            }
        }
    }
}

/// poem-openapi describes an SSE body as a JSON array of its items; on the wire it is
/// text, a series of events (`id`, `event`, `data`). The items' schema stays in the
/// description's reference.
fn event_streams_are_text(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for (path, operations) in paths.iter_mut() {
        let description = if path.starts_with(crate::openai::error::PREFIX) {
            "Server-Sent Events: `data:` frames, each a `ChatCompletionChunk` as JSON (or an `OpenAiError` if \
             the job fails), then `data: [DONE]`."
        } else {
            "Server-Sent Events: `id:` the event's sequence number, `event:` its kind, `data:` the event as \
             JSON (schema `StreamItemView`)."
        };
        let Some(operations) = operations.as_object_mut() else { continue };
        for operation in operations.values_mut() {
            let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) else { continue };
            for response in responses.values_mut() {
                if let Some(stream) = response.pointer_mut("/content/text~1event-stream") {
                    // Before OpenAPI 3.2 an event stream's `schema` describes one event.
                    *stream = json!({ "schema": {
                        "type": "object",
                        "description": description,
                        "required": ["data"],
                        "properties": {
                            "id": { "type": "string" },
                            "event": { "type": "string" },
                            "data": { "type": "string" },
                        },
                    } });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices() -> Choices<'static> {
        Choices {
            models: vec!["mock/alpha"],
            patterns: vec!["direct"],
            tiers: vec!["free"],
            max_prompt_chars: 100,
            max_models: 3,
        }
    }

    #[test]
    fn optional_fields_are_nullable_and_enums_are_plain_refs() {
        let spec = json!({
            "paths": {},
            "components": { "schemas": {
                "Status": { "type": "string", "enum": ["ok", "down"] },
                "Info": { "type": "object", "properties": { "code": { "type": "string" } } },
                "View": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": { "description": "d", "allOf": [{ "$ref": "#/components/schemas/Status" }, { "description": "d" }] },
                        "finished_at": { "type": "string", "format": "date-time" },
                        "error": { "$ref": "#/components/schemas/Info" },
                        "state": { "$ref": "#/components/schemas/Status" }
                    }
                }
            }}
        });
        let doc: Value = serde_json::from_str(&finish(&spec.to_string(), &choices()).expect("finish")).expect("json");
        let view = &doc["components"]["schemas"]["View"]["properties"];
        assert_eq!(view["status"], json!({ "$ref": "#/components/schemas/Status" }));
        assert_eq!(view["finished_at"]["nullable"], true);
        assert_eq!(view["error"], json!({ "allOf": [{ "$ref": "#/components/schemas/Info" }], "nullable": true }));
        assert_eq!(view["state"], json!({ "type": "string", "enum": ["ok", "down"], "nullable": true }));
    }

    #[test]
    fn request_bodies_are_closed_and_name_what_the_configuration_allows() {
        let spec = json!({
            "paths": { "/v1/analyze": { "post": {
                "requestBody": { "content": { "application/json": { "schema": { "$ref": "#/components/schemas/AnalyzeRequest" } } } },
                "responses": { "200": { "content": { "text/event-stream": { "schema": { "type": "array" } } } } }
            }}},
            "components": { "schemas": {
                "AnalyzeRequest": { "type": "object", "required": ["models"], "properties": {
                    "models": { "type": "array", "items": { "type": "string" } },
                    "options": { "$ref": "#/components/schemas/AnalyzeOptions" }
                }},
                "AnalyzeOptions": { "type": "object", "properties": { "synthesis_model": { "type": "string" } } },
                "JobView": { "type": "object", "properties": {} }
            }}
        });
        let doc: Value = serde_json::from_str(&finish(&spec.to_string(), &choices()).expect("finish")).expect("json");
        let schemas = &doc["components"]["schemas"];
        assert_eq!(schemas["AnalyzeRequest"]["additionalProperties"], false);
        assert_eq!(schemas["AnalyzeOptions"]["additionalProperties"], false, "reached through a field");
        assert!(schemas["JobView"].get("additionalProperties").is_none(), "responses stay open");
        assert_eq!(schemas["AnalyzeRequest"]["properties"]["models"]["items"]["enum"], json!(["mock/alpha"]));
        assert_eq!(schemas["AnalyzeOptions"]["properties"]["synthesis_model"]["enum"], json!(["mock/alpha"]));
        let stream = &doc["paths"]["/v1/analyze"]["post"]["responses"]["200"]["content"]["text/event-stream"];
        assert_eq!(stream["schema"]["properties"]["data"]["type"], "string", "one event");
    }
}
