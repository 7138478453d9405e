//! `Idempotency-Key` on submit: a retried request never creates a second job.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{fields, problem, Options, TestApp};

async fn submit(app: &TestApp, key: &str, idempotency: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(app.url("/v1/analyze"))
        .bearer_auth(key)
        .header("idempotency-key", idempotency)
        .json(body)
        .send()
        .await
        .expect("submit")
}

async fn jobs_of(app: &TestApp, user_id: uuid::Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&app.pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn the_same_key_and_body_return_the_original_job() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (user_id, key) = app.user_with_key().await;
    let body = json!({ "prompt": "Why is the sky blue?", "models": ["mock/alpha"] });
    let first = submit(&app, &key, "order-42", &body).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let location = first.headers()["location"].clone();
    let first: Value = first.json().await.expect("JSON");

    // Same body, other formatting: the same job comes back, nothing new is created.
    let again = app
        .http
        .post(app.url("/v1/analyze"))
        .bearer_auth(&key)
        .header("idempotency-key", "order-42")
        .header("content-type", "application/json")
        .body(r#"{ "models": ["mock/alpha"],   "prompt": "Why is the sky blue?" }"#)
        .send()
        .await
        .expect("submit");
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["location"], location);
    assert_eq!(again.json::<Value>().await.expect("JSON"), first);
    assert_eq!(jobs_of(&app, user_id).await, 1);

    // Another body under the same key is refused; another user's same key is theirs.
    let other = json!({ "prompt": "Something else", "models": ["mock/alpha"] });
    let refused = problem(submit(&app, &key, "order-42", &other).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&refused), ["Idempotency-Key"]);
    let (_, someone_else) = app.user_with_key().await;
    let theirs: Value = submit(&app, &someone_else, "order-42", &body).await.json().await.expect("JSON");
    assert_ne!(theirs["id"], first["id"]);
    problem(submit(&app, &key, "bad key with spaces", &body).await, StatusCode::BAD_REQUEST).await;
    app.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_identical_requests_create_exactly_one_job() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (user_id, key) = app.user_with_key().await;
    let body = json!({ "prompt": "Once only", "models": ["mock/alpha"] });
    let responses = join_all((0..50).map(|_| submit(&app, &key, "retry-storm", &body))).await;
    let mut ids = Vec::new();
    for response in responses {
        match response.status() {
            StatusCode::ACCEPTED => ids.push(response.json::<Value>().await.expect("JSON")["id"].clone()),
            StatusCode::CONFLICT => {
                problem(response, StatusCode::CONFLICT).await; // still in progress: retry later
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(!ids.is_empty());
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "every success names the same job");
    assert_eq!(jobs_of(&app, user_id).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_expired_key_starts_afresh() {
    let mut options = Options { worker: false, ..Default::default() };
    options.idempotency_retention_secs = 1;
    let app = TestApp::spawn_with(options).await;
    let (user_id, key) = app.user_with_key().await;
    let body = json!({ "prompt": "hi", "models": ["mock/alpha"] });
    let first: Value = submit(&app, &key, "k1", &body).await.json().await.expect("JSON");
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let second: Value = submit(&app, &key, "k1", &body).await.json().await.expect("JSON");
    assert_ne!(first["id"], second["id"]);
    assert_eq!(jobs_of(&app, user_id).await, 2);
    app.stop().await;
}
