//! The Batch API on `/openai/v1`: files, batches of chat completions run as jobs,
//! their output and error files, validation as OpenAI reports it, cancellation, and
//! ownership. The official SDK drives it in `tests/openai/` as well.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{Options, TestApp};

pub(crate) fn line(custom_id: &str, body: Value) -> String {
    json!({ "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body }).to_string()
}

pub(crate) fn hello(model: &str, text: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": text }] })
}

async fn upload(app: &TestApp, key: &str, content: String) -> reqwest::Response {
    let file = reqwest::multipart::Part::text(content).file_name("input.jsonl");
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", file);
    app.http.post(app.url("/openai/v1/files")).bearer_auth(key).multipart(form).send().await.expect("upload")
}

pub(crate) async fn upload_ok(app: &TestApp, key: &str, lines: &[String]) -> String {
    let response = upload(app, key, lines.join("\n") + "\n").await;
    assert_eq!(response.status(), StatusCode::OK);
    let file: Value = response.json().await.expect("JSON");
    assert_eq!((file["object"].as_str(), file["purpose"].as_str()), (Some("file"), Some("batch")));
    file["id"].as_str().expect("id").to_owned()
}

pub(crate) async fn create_batch(app: &TestApp, key: &str, file_id: &str) -> Value {
    let body = json!({ "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h" });
    let response =
        app.http.post(app.url("/openai/v1/batches")).bearer_auth(key).json(&body).send().await.expect("create");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("JSON")
}

pub(crate) async fn wait_for_end(app: &TestApp, key: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let batch: Value = app.get(key, &format!("/openai/v1/batches/{id}")).await.json().await.expect("JSON");
        if ["completed", "failed", "cancelled", "expired"].contains(&batch["status"].as_str().unwrap_or_default()) {
            return batch;
        }
        assert!(tokio::time::Instant::now() < deadline, "batch {id} did not end: {batch}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A file's lines, as JSON.
async fn lines_of(app: &TestApp, key: &str, file_id: &Value) -> Vec<Value> {
    let id = file_id.as_str().expect("a file id");
    let text = app.get(key, &format!("/openai/v1/files/{id}/content")).await.text().await.expect("content");
    text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

#[tokio::test]
async fn every_line_runs_once_and_lands_in_the_output_or_the_error_file() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let mut lines: Vec<String> =
        (0..6).map(|i| line(&format!("q{i}"), hello("mock/alpha", &format!("Q {i}")))).collect();
    // Valid JSON the api refuses when it runs the line: an error-file line, not a failed batch.
    lines.push(line(
        "two-choices",
        json!({ "model": "mock/beta", "messages": [{ "role": "user", "content": "x" }], "n": 2 }),
    ));
    let file_id = upload_ok(&app, &key, &lines).await;
    let created = create_batch(&app, &key, &file_id).await;
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["request_counts"]["total"], 7);

    let batch = wait_for_end(&app, &key, created["id"].as_str().expect("id")).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"], json!({ "total": 7, "completed": 6, "failed": 1 }));
    let output = lines_of(&app, &key, &batch["output_file_id"]).await;
    let mut ids: Vec<&str> = output.iter().filter_map(|l| l["custom_id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["q0", "q1", "q2", "q3", "q4", "q5"], "each line once");
    for record in &output {
        assert_eq!(record["response"]["status_code"], 200);
        let completion = &record["response"]["body"];
        assert_eq!(completion["object"], "chat.completion");
        assert!(completion["choices"][0]["message"]["content"].as_str().is_some_and(|c| c.starts_with("[mock/alpha]")));
        assert!(completion["usage"]["total_tokens"].as_i64() > Some(0));
    }
    let errors = lines_of(&app, &key, &batch["error_file_id"]).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0]["custom_id"].as_str(), errors[0]["response"]["status_code"].as_u64()),
        (Some("two-choices"), Some(400))
    );
    assert_eq!(errors[0]["response"]["body"]["error"]["param"], "n");

    // Each line was a job like any other.
    let listed: Value = app.get(&key, "/v1/jobs?limit=100").await.json().await.expect("JSON");
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(6));
    app.stop().await;
}

#[tokio::test]
async fn a_bad_input_file_fails_the_batch_naming_each_line() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let lines = [
        line("a", hello("mock/alpha", "fine")),
        "{ not json".to_owned(),
        line("a", hello("mock/alpha", "the same custom_id")),
        json!({ "custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": hello("mock/alpha", "x") })
            .to_string(),
        line("d", hello("mock/omega", "no such model")),
    ];
    let file_id = upload_ok(&app, &key, &lines).await;
    let batch = create_batch(&app, &key, &file_id).await;
    assert_eq!(batch["status"], "failed");
    let found: Vec<(u64, &str)> = batch["errors"]["data"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| (e["line"].as_u64().unwrap_or(0), e["code"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        found,
        [(2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "invalid_url"), (5, "model_not_found")]
    );
    let listed: Value = app.get(&key, "/v1/jobs").await.json().await.expect("JSON");
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(0), "no line ran");
    app.stop().await;
}

#[tokio::test]
async fn files_and_batches_are_their_owners_alone_and_size_is_bounded() {
    let app = TestApp::spawn_with(Options { file_max_bytes: Some(2_000), ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let (_, other) = app.user_with_key().await;
    let file_id = upload_ok(&app, &key, &[line("a", hello("mock/alpha", "hi"))]).await;
    let batch = create_batch(&app, &key, &file_id).await;
    let batch_id = batch["id"].as_str().expect("id");
    for path in [
        format!("/openai/v1/files/{file_id}"),
        format!("/openai/v1/files/{file_id}/content"),
        format!("/openai/v1/batches/{batch_id}"),
    ] {
        let response = app.get(&other, &path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = response.json().await.expect("JSON");
        assert!(body["error"]["message"].is_string(), "OpenAI's error shape: {body}");
    }
    let listed: Value = app.get(&other, "/openai/v1/batches").await.json().await.expect("JSON");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0));
    // Someone else's file is no input for a batch either; metadata is bounded as OpenAI's.
    let create = |body: Value, key: String| {
        let request = app.http.post(app.url("/openai/v1/batches")).bearer_auth(key).json(&body);
        async move { request.send().await.expect("create").status() }
    };
    let body = |metadata: Value| {
        json!({ "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                "metadata": metadata })
    };
    assert_eq!(create(body(Value::Null), other.clone()).await, StatusCode::NOT_FOUND);
    let seventeen: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    assert_eq!(create(body(Value::Object(seventeen)), key.clone()).await, StatusCode::BAD_REQUEST);

    let too_big = upload(&app, &key, line("a", hello("mock/alpha", &"x".repeat(3_000)))).await;
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let deleted: Value = app
        .http
        .delete(app.url(&format!("/openai/v1/files/{file_id}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("delete")
        .json()
        .await
        .expect("JSON");
    assert_eq!(deleted["deleted"], true);
    assert_eq!(app.get(&key, &format!("/openai/v1/files/{file_id}")).await.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn a_cancelled_batch_runs_no_more_lines_and_reports_what_ran() {
    // Slow models: the batch is still running when it is cancelled.
    let app = TestApp::spawn_with(Options { mock_latency_ms: 1_500, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let lines: Vec<String> = (0..20).map(|i| line(&format!("q{i}"), hello("mock/alpha", &format!("Q {i}")))).collect();
    let file_id = upload_ok(&app, &key, &lines).await;
    let batch = create_batch(&app, &key, &file_id).await;
    let id = batch["id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let cancelled = app
        .http
        .post(app.url(&format!("/openai/v1/batches/{id}/cancel")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancelled.status(), StatusCode::OK);
    let cancelled: Value = cancelled.json().await.expect("JSON");
    assert_eq!(cancelled["status"], "cancelling");

    let ended = wait_for_end(&app, &key, &id).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    let counts = &ended["request_counts"];
    let (completed, failed) = (counts["completed"].as_i64().unwrap_or(0), counts["failed"].as_i64().unwrap_or(0));
    assert_eq!(completed + failed, 20, "every line is accounted for: {counts}");
    assert!(completed < 20, "lines not yet run never ran: {counts}");
    let errors = lines_of(&app, &key, &ended["error_file_id"]).await;
    assert!(errors.iter().any(|e| e["response"]["body"]["error"]["code"] == "batch_cancelled"), "{errors:?}");
    // Nothing of the batch is still queued or running.
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(active, 0);
    let again = app.http.post(app.url(&format!("/openai/v1/batches/{id}/cancel"))).bearer_auth(&key).send().await;
    assert_eq!(again.expect("cancel").status(), StatusCode::CONFLICT);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_holds_at_most_half_its_users_job_slots_and_interactive_work_goes_on() {
    // 16 slots: batch lines may hold 3 of them, so the user's share is what binds.
    let app = TestApp::spawn_with(Options { mock_latency_ms: 300, concurrency: 16, ..Default::default() }).await;
    // `basic` allows 5 jobs at once: its batches get 2.
    let (_, key) = app.user_in_tier("basic").await;
    let lines: Vec<String> = (0..8).map(|i| line(&format!("q{i}"), hello("mock/alpha", &format!("Q {i}")))).collect();
    let file_id = upload_ok(&app, &key, &lines).await;
    let batch = create_batch(&app, &key, &file_id).await;
    let id: uuid::Uuid = batch["id"].as_str().expect("id").parse().expect("uuid");

    let interactive = app.submit_ok(&key, &["mock/beta"]).await;
    let mut most = 0;
    let ended = loop {
        let in_flight: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE batch_id = $1 AND status IN ('queued', 'running')")
                .bind(id)
                .fetch_one(&app.pool)
                .await
                .expect("count");
        most = most.max(in_flight);
        let batch: Value = app.get(&key, &format!("/openai/v1/batches/{id}")).await.json().await.expect("JSON");
        if batch["status"] != "in_progress" {
            break batch;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    assert_eq!(ended["status"], "completed");
    assert_eq!(ended["request_counts"]["completed"], 8);
    assert_eq!(most, 2, "the user's share of lines at once, no more");
    assert_eq!(app.wait_for_terminal(&key, interactive).await["status"], "succeeded");
    let before_the_batch: bool = sqlx::query_scalar(
        "SELECT (SELECT finished_at FROM jobs WHERE id = $1) < (SELECT max(finished_at) FROM jobs WHERE batch_id = $2)",
    )
    .bind(interactive)
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .expect("ends");
    assert!(before_the_batch, "the interactive job did not wait for the batch to end");
    app.stop().await;
}

/// A batch's lines are jobs like any other: workers killed mid-batch lose none and run
/// none twice.
#[tokio::test]
async fn a_batch_survives_workers_killed_mid_run() {
    use crate::processes::{spawn_worker_with, terminate, wait_ready};

    // 16 slots: 3 batch lines at once; each takes 200 ms, so lines are running when
    // the workers die.
    let options = Options { worker: false, concurrency: 16, mock_latency_ms: 200, ..Default::default() };
    let app = TestApp::spawn_with(options).await;
    let (_, key) = app.user_in_tier("enterprise").await;
    let mut workers = vec![spawn_worker_with(&app, 8).await, spawn_worker_with(&app, 8).await];
    for worker in &workers {
        wait_ready(&app, worker).await;
    }
    let lines: Vec<String> = (0..60).map(|i| line(&format!("q{i}"), hello("mock/alpha", &format!("Q {i}")))).collect();
    let file_id = upload_ok(&app, &key, &lines).await;
    let batch = create_batch(&app, &key, &file_id).await;
    let id = batch["id"].as_str().expect("id").to_owned();
    let batch_id: uuid::Uuid = id.parse().expect("uuid");
    let running = || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE batch_id = $1 AND status = 'running'")
            .bind(batch_id)
            .fetch_one(&app.pool)
    };
    for _ in 0..2 {
        // Every worker dies while a line runs, so that line is surely on a dead one.
        while running().await.expect("count") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for victim in workers.drain(..) {
            let pid = victim.child.id().expect("pid").to_string();
            let killed = std::process::Command::new("kill").args(["-KILL", &pid]).status().expect("kill");
            assert!(killed.success(), "worker {pid} killed");
        }
        workers = vec![spawn_worker_with(&app, 8).await, spawn_worker_with(&app, 8).await];
    }
    let ended = wait_for_end(&app, &key, &id).await;
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["request_counts"], json!({ "total": 60, "completed": 60, "failed": 0 }));
    let output = lines_of(&app, &key, &ended["output_file_id"]).await;
    let mut ids: Vec<&str> = output.iter().filter_map(|l| l["custom_id"].as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 60, "every line once in the output");
    // One job per line, each answered by one recorded step.
    let audit = testkit::audit::delivery(&app.pool).await.expect("audit");
    assert_eq!(audit, testkit::audit::DeliveryAudit { jobs: 60, ..Default::default() });
    let rerun: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE batch_id = $1 AND attempts > 1")
        .bind(batch_id)
        .fetch_one(&app.pool)
        .await
        .expect("attempts");
    assert!(rerun >= 1, "a line cut off by a kill ran again on another worker");
    for worker in workers {
        assert!(terminate(worker).await.0.success());
    }
    app.stop().await;
}
