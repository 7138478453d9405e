//! A chat completion request as OpenAI's SDKs send it, checked and turned into a job:
//! which pattern runs over which models, the job's options and its conversation.
//! Fields Ultra cannot honour (tools, images, audio, …) are refused by name rather
//! than ignored; ones sent at their neutral value (`null`, `0`, `false`, empty) are
//! taken as absent, since some clients send every field.

use std::collections::BTreeMap;

use common::{
    domain::ChatRole,
    job::{ChatInput, ChatMessage, JobOptions},
    patterns::PatternSpec,
};
use poem_openapi::{Object, Union};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::models::PATTERN_PREFIX;
use crate::{
    error::{ApiError, FieldError},
    jobs,
    state::AppState,
};

/// A chat completion request. Fields Ultra does not know are taken when sent at their
/// neutral value and refused by name otherwise (`other`), so the schema stays open.
#[derive(Debug, Serialize, Deserialize, Object)]
#[oai(rename = "ChatCompletionRequest")]
pub struct ChatRequest {
    /// A catalog model (`mock/alpha`), or `ultra/<pattern>` to run a pattern over
    /// several models and answer with its synthesis.
    pub model: String,
    #[oai(validator(min_items = 1))]
    pub messages: Vec<Message>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default, deserialize_with = "crate::body::object")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    #[oai(validator(minimum(value = "1"), maximum(value = "32768")))]
    pub max_tokens: Option<u32>,
    /// Wins over `max_tokens`.
    #[serde(default)]
    #[oai(validator(minimum(value = "1"), maximum(value = "32768")))]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    #[oai(validator(minimum(value = "0"), maximum(value = "2")))]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Choices to return: only 1.
    #[serde(default)]
    #[oai(validator(minimum(value = "1"), maximum(value = "1")))]
    pub n: Option<u32>,
    /// The caller's end user: accepted, as OpenAI does, for the caller's own records.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Ultra's own options (the SDKs' `extra_body`).
    #[serde(default, deserialize_with = "crate::body::object")]
    pub ultra: Option<UltraOptions>,
    /// Everything else: refused unless neutral.
    #[serde(flatten)]
    #[oai(skip)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize, Object)]
pub struct StreamOptions {
    /// Send the usage in a last chunk before `[DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Up to 4 sequences at which the models stop.
#[derive(Debug, Serialize, Deserialize, Union)]
#[serde(untagged)]
#[oai(one_of, rename = "StopSequences")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `{"ultra": {…}}`: how a `ultra/<pattern>` model runs.
#[derive(Debug, Default, Serialize, Deserialize, Object)]
#[serde(deny_unknown_fields)]
#[oai(deny_unknown_fields)]
pub struct UltraOptions {
    /// The models the pattern runs over (default `ULTRA_DEFAULT_MODELS`); only with
    /// an `ultra/<pattern>` model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub synthesis_model: Option<String>,
    #[serde(default)]
    pub min_models: Option<u32>,
    #[serde(default)]
    pub cache: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, Object)]
#[oai(rename = "ChatCompletionMessage")]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant` (tools are not supported).
    pub role: String,
    pub content: Content,
    /// A participant's name: accepted and not used.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(flatten)]
    #[oai(skip)]
    pub other: BTreeMap<String, Value>,
}

/// Text, or text parts (other kinds of part are refused).
#[derive(Debug, Serialize, Deserialize, Union)]
#[serde(untagged)]
#[oai(one_of, rename = "MessageContent")]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Serialize, Deserialize, Object)]
#[oai(rename = "ContentPart")]
pub struct Part {
    /// `text`.
    #[serde(rename = "type")]
    #[oai(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(flatten)]
    #[oai(skip)]
    pub other: BTreeMap<String, Value>,
}

/// What the request asks for, as a job.
pub struct Planned {
    pub pattern: String,
    pub spec: PatternSpec,
    pub models: Vec<String>,
    pub options: JobOptions,
    pub chat: ChatInput,
    /// The conversation as the job's prompt.
    pub prompt: String,
}

/// Why a request cannot become a job.
pub enum Refusal {
    /// The model names nothing Ultra serves (OpenAI's 404 `model_not_found`).
    UnknownModel(String),
    Invalid(ApiError),
}

impl From<ApiError> for Refusal {
    fn from(err: ApiError) -> Self {
        Refusal::Invalid(err)
    }
}

/// `null`, `false`, `0`, `""`, `[]` or `{}`: what a client sends for "not set".
fn is_neutral(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Most stop sequences OpenAI takes.
pub const MAX_STOP: usize = 4;

impl ChatRequest {
    pub fn wants_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage == Some(true))
    }

    /// Checks everything at once and plans the job.
    pub fn plan(&self, state: &AppState, tier: &str) -> Result<Planned, Refusal> {
        let mut errors = Vec::new();
        for (name, _) in self.other.iter().filter(|(_, value)| !is_neutral(value)) {
            errors.push(FieldError::new(name, "is not supported by Ultra"));
        }
        if self.n.is_some_and(|n| n != 1) {
            errors.push(FieldError::new("n", "only 1 choice is supported"));
        }
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            errors.push(FieldError::new("temperature", "must be between 0 and 2"));
        }
        if self.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            errors.push(FieldError::new("top_p", "must be between 0 and 1"));
        }
        for (field, value) in [("max_tokens", self.max_tokens), ("max_completion_tokens", self.max_completion_tokens)] {
            if value.is_some_and(|m| !(1..=32_768).contains(&m)) {
                errors.push(FieldError::new(field, "must be between 1 and 32768"));
            }
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(one)) => vec![one.clone()],
            Some(Stop::Many(many)) => many.clone(),
        };
        if stop.len() > MAX_STOP {
            errors.push(FieldError::new("stop", format!("at most {MAX_STOP} sequences")));
        }
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let messages = self.messages(&mut errors);

        let (pattern, spec, models) = self.target(state, tier, &mut errors)?;
        let ultra = self.ultra.as_ref();
        // As `/v1/analyze` checks its options.
        if let Some(model) = ultra.and_then(|u| u.synthesis_model.as_deref()) {
            errors.extend(jobs::check_synthesis_model(state, "ultra.synthesis_model", model));
        }
        if let Some(min) = ultra.and_then(|u| u.min_models) {
            errors.extend(jobs::check_min_models(state, "ultra.min_models", min));
        }
        let chat = ChatInput { messages, top_p: self.top_p, stop };
        let prompt = chat.transcript();
        let limit = state.config.max_prompt_chars;
        let chars = prompt.chars().count();
        if chars > limit {
            return Err(ApiError::PayloadTooLarge(
                format!("the messages have {chars} characters; the limit is {limit}"),
                Some(FieldError::new("messages", format!("at most {limit} characters"))),
            )
            .into());
        }
        if !errors.is_empty() {
            return Err(ApiError::validation(errors).into());
        }
        let options = JobOptions {
            temperature: self.temperature,
            max_tokens,
            cache: ultra.and_then(|u| u.cache),
            synthesis_model: ultra.and_then(|u| u.synthesis_model.clone()),
            min_models: ultra.and_then(|u| u.min_models),
            timeout_s: None,
            webhook_url: None,
            unknown: Default::default(),
        };
        Ok(Planned { pattern, spec, models, options, chat, prompt })
    }

    /// The conversation, text only.
    fn messages(&self, errors: &mut Vec<FieldError>) -> Vec<ChatMessage> {
        if self.messages.is_empty() {
            errors.push(FieldError::new("messages", "name at least one message"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (index, message) in self.messages.iter().enumerate() {
            let at = |field: &str| format!("messages[{index}].{field}");
            let role = match message.role.as_str() {
                "system" | "developer" => ChatRole::System,
                "user" => ChatRole::User,
                "assistant" => ChatRole::Assistant,
                other => {
                    errors
                        .push(FieldError::new(at("role"), format!("role `{other}` is not supported (tools are not)")));
                    continue;
                }
            };
            for (name, _) in message.other.iter().filter(|(_, value)| !is_neutral(value)) {
                errors.push(FieldError::new(at(name), "is not supported by Ultra"));
            }
            let content = match &message.content {
                Content::Text(text) => text.clone(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for (part_index, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(part_text)) => text.push_str(part_text),
                            ("text", None) => errors.push(FieldError::new(
                                format!("messages[{index}].content[{part_index}].text"),
                                "is required",
                            )),
                            (kind, _) => errors.push(FieldError::new(
                                format!("messages[{index}].content[{part_index}]"),
                                format!("content of type `{kind}` is not supported; send text"),
                            )),
                        }
                    }
                    text
                }
            };
            // As a `/v1` prompt: some providers refuse an empty message outright.
            if content.contains('\0') {
                errors.push(FieldError::new(at("content"), "must not contain NUL characters"));
            } else if content.chars().all(jobs::is_blank) {
                errors.push(FieldError::new(at("content"), "must not be blank"));
            }
            messages.push(ChatMessage { role, content });
        }
        messages
    }

    /// The pattern and models `model` stands for: a catalog model alone (`direct`), or
    /// `ultra/<pattern>` over the request's models or the default set.
    fn target(
        &self,
        state: &AppState,
        tier: &str,
        errors: &mut Vec<FieldError>,
    ) -> Result<(String, PatternSpec, Vec<String>), Refusal> {
        let ultra_models = self.ultra.as_ref().and_then(|u| u.models.clone());
        if state.catalog.get(&self.model).is_some() {
            if ultra_models.is_some() {
                errors.push(FieldError::new("ultra.models", "only for `ultra/<pattern>` models"));
            }
            let spec =
                state.patterns.get("direct").cloned().ok_or_else(|| Refusal::UnknownModel(self.model.clone()))?;
            return Ok(("direct".to_owned(), spec, vec![self.model.clone()]));
        }
        let pattern = self.model.strip_prefix(PATTERN_PREFIX).filter(|name| !name.is_empty());
        let Some((name, spec)) = pattern.and_then(|name| state.patterns.get(name).map(|spec| (name, spec.clone())))
        else {
            return Err(Refusal::UnknownModel(self.model.clone()));
        };
        let tier = state.tiers.for_user(tier);
        let allowed = (tier.models_per_job as usize).min(state.config.max_models_per_job);
        let models = match ultra_models {
            Some(models) => {
                errors.extend(jobs::check_model_names(state, "ultra.models", &models, allowed));
                models
            }
            // The default set, as many as the tier allows.
            None => state.default_models.iter().take(allowed).cloned().collect(),
        };
        Ok((name.to_owned(), spec, models))
    }
}
