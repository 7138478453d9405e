//! The OpenAI-compatible surface (`/openai/v1`): its wire format, its errors in
//! OpenAI's shape, and its completions being jobs like any other. The official SDK
//! drives it in `tests/openai/` as well.

use reqwest::StatusCode;
use serde_json::{json, Value};
use wiremock::{
    matchers::{body_partial_json, method, path},
    Mock, MockServer, ResponseTemplate,
};

use crate::support::{Options, TestApp};

async fn chat(app: &TestApp, key: &str, body: &Value) -> reqwest::Response {
    app.http.post(app.url("/openai/v1/chat/completions")).bearer_auth(key).json(body).send().await.expect("request")
}

/// The OpenAI error object of a response with `status`.
async fn openai_error(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert!(response.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with("application/json")));
    let body: Value = response.json().await.expect("JSON");
    let error = body["error"].clone();
    assert!(error["message"].is_string() && error["type"].is_string(), "{body}");
    error
}

fn hello() -> Value {
    json!([{ "role": "system", "content": "Be brief." }, { "role": "user", "content": "Say hello" }])
}

#[tokio::test]
async fn models_list_the_catalog_and_one_virtual_model_per_pattern() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let list: Value = app.get(&key, "/openai/v1/models").await.json().await.expect("JSON");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    for expected in ["mock/alpha", "mock/beta", "ultra/direct", "ultra/critique"] {
        assert!(ids.contains(&expected), "{expected} in {ids:?}");
    }
    // The id's slash, unencoded (older SDKs) or encoded (newer ones).
    for path in ["/openai/v1/models/mock/alpha", "/openai/v1/models/mock%2Falpha"] {
        let model: Value = app.get(&key, path).await.json().await.expect("JSON");
        assert_eq!((model["id"].as_str(), model["object"].as_str()), (Some("mock/alpha"), Some("model")), "{path}");
    }
    let missing = openai_error(app.get(&key, "/openai/v1/models/mock/omega").await, StatusCode::NOT_FOUND).await;
    assert_eq!(missing["code"], "model_not_found");
    app.stop().await;
}

#[tokio::test]
async fn a_completion_is_a_job_with_real_usage() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let response = chat(&app, &key, &json!({ "model": "mock/alpha", "messages": hello() })).await;
    assert_eq!(response.status(), StatusCode::OK);
    let job_id = response.headers()["x-ultra-job-id"].to_str().expect("header").to_owned();
    let completion: Value = response.json().await.expect("JSON");
    assert_eq!(completion["id"], job_id);
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["model"], "mock/alpha");
    let choice = &completion["choices"][0];
    assert_eq!(
        (choice["message"]["role"].as_str(), choice["finish_reason"].as_str()),
        (Some("assistant"), Some("stop"))
    );

    // The same job through `/v1`: its answer is the completion's, its usage the sum of its steps.
    let job = app.wait_for_terminal(&key, job_id.parse().expect("uuid")).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(choice["message"]["content"], job["result"]["answers"][0]["output"]);
    let usage = &completion["usage"];
    assert_eq!(usage["prompt_tokens"], job["usage"]["input_tokens"]);
    assert_eq!(usage["completion_tokens"], job["usage"]["output_tokens"]);
    assert!(usage["prompt_tokens"].as_i64() > Some(0));
    let tokens = |name: &str| usage[name].as_i64().unwrap_or(-1);
    assert_eq!(tokens("total_tokens"), tokens("prompt_tokens") + tokens("completion_tokens"));
    // `/v1` shows the conversation as the job's prompt.
    let listed: Value = app.get(&key, "/v1/jobs").await.json().await.expect("JSON");
    assert_eq!(listed["jobs"][0]["id"], job_id);
    app.stop().await;
}

#[tokio::test]
async fn a_streamed_completion_sends_the_same_answer_in_chunks_then_usage_and_done() {
    // A mock model that writes 50 tokens a second, so the answer streams in pieces.
    let slow = "[providers.mock]\nkind = \"mock\"\nmock_latency_ms = 0\nmock_tokens_per_second = 50\n\n\
                [[models]]\nid = \"mock/slow\"\nprovider = \"mock\"\nupstream = \"slow\"\n";
    let app = TestApp::spawn_with(Options { config_toml: Some(slow.to_owned()), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let whole: Value =
        chat(&app, &key, &json!({ "model": "mock/slow", "messages": hello() })).await.json().await.expect("JSON");
    let body = json!({
        "model": "mock/slow", "messages": hello(), "stream": true, "stream_options": { "include_usage": true },
    });
    let response = chat(&app, &key, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with("text/event-stream")));
    let text = response.text().await.expect("body");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk")).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, whole["choices"][0]["message"]["content"].as_str().expect("content"));
    assert!(
        chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())).count()
            > 1,
        "streamed in pieces: {text}"
    );
    let finish = chunks.iter().rev().find(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())).expect("finish");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert!(usage["total_tokens"].as_i64() > Some(0), "{usage}");
    app.stop().await;
}

#[tokio::test]
async fn a_pattern_model_runs_the_pattern_over_the_named_models() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let body = json!({
        "model": "ultra/critique", "messages": hello(), "ultra": { "models": ["mock/alpha", "mock/beta"] },
    });
    let response = chat(&app, &key, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let job_id = response.headers()["x-ultra-job-id"].to_str().expect("header").to_owned();
    let completion: Value = response.json().await.expect("JSON");
    let job = app.wait_for_terminal(&key, job_id.parse().expect("uuid")).await;
    assert_eq!(job["pattern"], "critique");
    assert_eq!(job["models"], json!(["mock/alpha", "mock/beta"]));
    assert_eq!(completion["choices"][0]["message"]["content"], job["result"]["output"], "the synthesis answers");
    app.stop().await;
}

#[tokio::test]
async fn what_ultra_cannot_do_is_refused_in_openais_error_shape() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let tools = json!({ "model": "mock/alpha", "messages": hello(), "tools": [{ "type": "function" }] });
    let error = openai_error(chat(&app, &key, &tools).await, StatusCode::BAD_REQUEST).await;
    assert_eq!((error["type"].as_str(), error["param"].as_str()), (Some("invalid_request_error"), Some("tools")));

    let image = json!({ "model": "mock/alpha", "messages": [{ "role": "user", "content": [
        { "type": "text", "text": "What is this?" }, { "type": "image_url", "image_url": { "url": "http://x/y.png" } },
    ] }] });
    let error = openai_error(chat(&app, &key, &image).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(error["param"], "messages[0].content[1]");

    // Ultra's own options are checked as `/v1/analyze` checks them.
    let quorum = json!({ "model": "ultra/critique", "messages": hello(), "ultra": { "min_models": 0 } });
    assert_eq!(
        openai_error(chat(&app, &key, &quorum).await, StatusCode::BAD_REQUEST).await["param"],
        "ultra.min_models"
    );

    // Found by schemathesis: each limit holds whatever else the request sends.
    let five_stops = json!({ "model": "mock/alpha", "messages": hello(), "stop": ["", "", "", "", ""] });
    assert_eq!(openai_error(chat(&app, &key, &five_stops).await, StatusCode::BAD_REQUEST).await["param"], "stop");
    let zero = json!({ "model": "mock/alpha", "messages": hello(), "max_tokens": 0, "max_completion_tokens": 5 });
    assert_eq!(openai_error(chat(&app, &key, &zero).await, StatusCode::BAD_REQUEST).await["param"], "max_tokens");
    let positional = json!({ "model": "ultra/critique", "messages": hello(), "ultra": [null, null] });
    assert_eq!(openai_error(chat(&app, &key, &positional).await, StatusCode::BAD_REQUEST).await["param"], "ultra");
    let blank = json!({ "model": "mock/alpha", "messages": [{ "role": "user", "content": " " }] });
    let error = openai_error(chat(&app, &key, &blank).await, StatusCode::BAD_REQUEST).await;
    assert_eq!(error["param"], "messages[0].content");
    // A long list of bogus model names is one error, as on `/v1/analyze`.
    let names: Vec<String> = (0..2_000).map(|i| format!("nope/{i}")).collect();
    let many = json!({ "model": "ultra/critique", "messages": hello(), "ultra": { "models": names } });
    let response = chat(&app, &key, &many).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.expect("body").len() < 1_000, "one error, not one per name");

    let two = json!({ "model": "mock/alpha", "messages": hello(), "n": 2 });
    assert_eq!(openai_error(chat(&app, &key, &two).await, StatusCode::BAD_REQUEST).await["param"], "n");

    let unknown = json!({ "model": "mock/omega", "messages": hello() });
    let error = openai_error(chat(&app, &key, &unknown).await, StatusCode::NOT_FOUND).await;
    assert_eq!(error["code"], "model_not_found");

    // Neutral values of fields Ultra does not have are what some clients always send.
    let neutral =
        json!({ "model": "mock/alpha", "messages": hello(), "tools": null, "presence_penalty": 0, "logprobs": false });
    assert_eq!(chat(&app, &key, &neutral).await.status(), StatusCode::OK);

    let malformed = app
        .http
        .post(app.url("/openai/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .expect("request");
    openai_error(malformed, StatusCode::BAD_REQUEST).await;
    let anonymous = app.http.post(app.url("/openai/v1/chat/completions")).json(&tools).send().await.expect("request");
    assert_eq!(openai_error(anonymous, StatusCode::UNAUTHORIZED).await["code"], "invalid_api_key");
    let anonymous = app.http.get(app.url("/openai/v1/models")).send().await.expect("request");
    openai_error(anonymous, StatusCode::UNAUTHORIZED).await;
    let wrong_method = app.http.delete(app.url("/openai/v1/models")).bearer_auth(&key).send().await.expect("request");
    assert_eq!(wrong_method.headers().get("allow").and_then(|v| v.to_str().ok()), Some("GET"));
    openai_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await;
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_answers_with_the_first_job() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let body = json!({ "model": "mock/alpha", "messages": hello() });
    let send = || {
        app.http
            .post(app.url("/openai/v1/chat/completions"))
            .bearer_auth(&key)
            .header("idempotency-key", "chat-once")
            .json(&body)
            .send()
    };
    let first: Value = send().await.expect("first").json().await.expect("JSON");
    let second: Value = send().await.expect("second").json().await.expect("JSON");
    assert_eq!(first["id"], second["id"]);
    let listed: Value = app.get(&key, "/v1/jobs").await.json().await.expect("JSON");
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(1));
    app.stop().await;
}

/// The whole conversation reaches the provider, as messages, with the sampling options.
#[tokio::test]
async fn providers_receive_every_message_not_only_the_last() {
    let server = MockServer::start().await;
    let answer = [
        json!({ "choices": [{ "index": 0, "delta": { "content": "Hello!" }, "finish_reason": "stop" }] }),
        json!({ "choices": [], "usage": { "prompt_tokens": 12, "completion_tokens": 2 } }),
    ];
    let mut sse: String = answer.iter().map(|c| format!("data: {c}\n\n")).collect();
    sse.push_str("data: [DONE]\n\n");
    let conversation = json!([
        { "role": "system", "content": "Be brief." },
        { "role": "user", "content": "My name is Ada." },
        { "role": "assistant", "content": "Hi Ada." },
        { "role": "user", "content": "What is my name?" },
    ]);
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(body_partial_json(json!({ "model": "llama3", "messages": conversation, "top_p": 0.5, "stop": ["\n\n"] })))
        .respond_with(
            ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(sse),
        )
        .expect(1)
        .mount(&server)
        .await;
    let catalog = format!(
        "[providers.local]\nkind = \"openai\"\nbase_url = \"{}/v1\"\n\n[[models]]\nid = \"local/llama\"\n\
         provider = \"local\"\nupstream = \"llama3\"\n",
        server.uri()
    );
    let app = TestApp::spawn_with(Options { config_toml: Some(catalog), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let body = json!({ "model": "local/llama", "messages": conversation, "top_p": 0.5, "stop": "\n\n" });
    let response = chat(&app, &key, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let completion: Value = response.json().await.expect("JSON");
    assert_eq!(completion["choices"][0]["message"]["content"], "Hello!");
    assert_eq!(completion["usage"], json!({ "prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14 }));
    app.stop().await;
}
