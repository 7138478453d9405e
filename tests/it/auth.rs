//! Every `/v1` route needs a valid API key; every failure is the same 401.

use common::db;
use reqwest::StatusCode;

use crate::support::{problem, TestApp};

#[tokio::test]
async fn requests_without_a_valid_key_are_unauthorized() {
    let app = TestApp::spawn_with(crate::support::Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    // Change the last character (to one it is not: the key may end in any of them).
    let last = if key.ends_with('X') { 'Y' } else { 'X' };
    let tampered = format!("{}{last}", &key[..key.len() - 1]);
    let job_path = format!("/v1/jobs/{}", uuid::Uuid::now_v7());
    let routes: [(&str, &str); 4] =
        [("GET", "/v1/models"), ("GET", "/v1/jobs"), ("GET", job_path.as_str()), ("POST", "/v1/analyze")];
    let headers: Vec<Option<String>> = vec![
        None,
        Some("Bearer".to_owned()),
        Some("Bearer not-a-key".to_owned()),
        Some("Bearer ultra_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".to_owned()),
        Some(format!("Bearer {tampered}")),
        Some(format!("Basic {key}")),
        Some(key.clone()),
    ];
    for (method, path) in routes {
        for header in &headers {
            let mut request = app.http.request(method.parse().expect("method"), app.url(path));
            if let Some(value) = header {
                request = request.header("authorization", value);
            }
            if method == "POST" {
                request = request.json(&serde_json::json!({ "prompt": "hi", "models": ["mock/alpha"] }));
            }
            let response = request.send().await.expect("send");
            let challenge = response.headers().get("www-authenticate").map(|v| v.as_bytes().to_vec());
            let status = response.status();
            let body = problem(response, StatusCode::UNAUTHORIZED).await;
            assert_eq!(challenge.as_deref(), Some(&b"Bearer"[..]), "{method} {path} with {header:?}: {status} {body}");
        }
    }
    assert_eq!(app.get(&key, "/v1/models").await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_revoked_key_stops_working_at_once() {
    let app = TestApp::spawn_with(crate::support::Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    assert_eq!(app.get(&key, "/v1/models").await.status(), StatusCode::OK);
    let prefix = common::apikey::prefix_of(&key).expect("prefix");
    let active = db::api_keys::find_active(&app.pool, prefix).await.expect("query").expect("key exists");
    assert!(db::api_keys::revoke(&app.pool, active.key_id).await.expect("revoke"));
    problem(app.get(&key, "/v1/models").await, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}
