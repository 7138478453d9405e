use std::sync::Arc;

use common::catalog::{Catalog, ModelSpec, ProviderKind, ProviderSpec};
use ultra_worker::providers::{anthropic::Anthropic, gemini::Gemini, openai::OpenAi, Guarded, Provider};

/// A provider table for a local server, reading its key from `key_env`.
pub fn spec(kind: ProviderKind, base_url: &str, key_env: Option<&str>) -> ProviderSpec {
    toml::from_str(&spec_toml(kind, base_url, key_env)).expect("provider spec")
}

fn spec_toml(kind: ProviderKind, base_url: &str, key_env: Option<&str>) -> String {
    format!(
        "kind = \"{}\"\nbase_url = \"{base_url}\"\nfirst_byte_timeout_secs = 1\ntimeout_secs = 5\nbreaker_failures = 2\nbreaker_cooldown_secs = 1\n{}",
        match kind {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Mock => "mock",
        },
        key_env.map(|k| format!("api_key_env = \"{k}\"\n")).unwrap_or_default()
    )
}

pub fn model(provider: &str, upstream: &str) -> ModelSpec {
    toml::from_str(&model_toml(provider, upstream)).expect("model spec")
}

fn model_toml(provider: &str, upstream: &str) -> String {
    format!(
        "id = \"{provider}/{upstream}\"\nprovider = \"{provider}\"\nupstream = \"{upstream}\"\n\
         input_price_per_mtok = 1.0\noutput_price_per_mtok = 2.0\ncontext_window = 1000\nmax_output_tokens = 200\n"
    )
}

pub fn client(spec: &ProviderSpec) -> Arc<dyn Provider> {
    match spec.kind {
        ProviderKind::Openai => Arc::new(OpenAi::new(spec).expect("client")),
        ProviderKind::Anthropic => Arc::new(Anthropic::new(spec).expect("client")),
        ProviderKind::Gemini => Arc::new(Gemini::new(spec).expect("client")),
        ProviderKind::Mock => unreachable!("not an HTTP provider"),
    }
}

/// The provider (an OpenAI-compatible one at `base_url`) behind its guard, as the
/// worker uses it, serving `model`.
pub fn guarded(name: &str, base_url: &str, model: &ModelSpec) -> Guarded {
    let spec_text = spec_toml(ProviderKind::Openai, base_url, None);
    let spec: ProviderSpec = toml::from_str(&spec_text).expect("spec");
    let file = format!("[providers.{name}]\n{spec_text}\n[[models]]\n{}", model_toml(name, &model.upstream));
    let catalog = Catalog::from_file(toml::from_str(&file).expect("catalog tables")).expect("catalog");
    Guarded::new(name, &spec, client(&spec), &catalog, None)
}

/// A Server-Sent Events body.
pub fn sse_body(events: &[(Option<&str>, String)]) -> String {
    events
        .iter()
        .map(|(event, data)| match event {
            Some(event) => format!("event: {event}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        })
        .collect()
}

pub fn sse_response(body: String) -> wiremock::ResponseTemplate {
    wiremock::ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(body)
}
