//! Reading jobs: ownership, listing, pagination.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{problem, TestApp};

#[tokio::test]
async fn another_users_job_is_not_found() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user_with_key().await;
    let (_, mallory) = app.user_with_key().await;
    let id = app.submit_ok(&alice, &["mock/alpha"]).await;
    app.wait_for_terminal(&alice, id).await;

    let theirs = problem(app.get(&mallory, &format!("/v1/jobs/{id}")).await, StatusCode::NOT_FOUND).await;
    let missing =
        problem(app.get(&mallory, &format!("/v1/jobs/{}", uuid::Uuid::now_v7())).await, StatusCode::NOT_FOUND).await;
    assert_eq!(theirs, missing, "another user's job must look exactly like a missing one");
    problem(app.events(&mallory, id, None).await, StatusCode::NOT_FOUND).await;
    problem(app.get(&mallory, "/v1/jobs/not-a-uuid").await, StatusCode::NOT_FOUND).await;

    let listed: Value = app.get(&mallory, "/v1/jobs").await.json().await.expect("JSON");
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(0));
    app.stop().await;
}

#[tokio::test]
async fn jobs_are_listed_newest_first_page_by_page_and_by_status() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.submit_ok(&key, &["mock/alpha"]).await);
    }
    for id in &ids {
        app.wait_for_terminal(&key, *id).await;
    }
    ids.reverse();

    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=2".to_owned();
    loop {
        let response = app.get(&key, &path).await;
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await.expect("JSON");
        let jobs = page["jobs"].as_array().expect("jobs");
        assert!(jobs.len() <= 2);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().expect("id").parse::<uuid::Uuid>().expect("uuid")));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/jobs?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let succeeded: Value = app.get(&key, "/v1/jobs?status=succeeded").await.json().await.expect("JSON");
    assert_eq!(succeeded["jobs"].as_array().map(Vec::len), Some(5));
    let queued: Value = app.get(&key, "/v1/jobs?status=queued").await.json().await.expect("JSON");
    assert_eq!(queued["jobs"].as_array().map(Vec::len), Some(0));
    problem(app.get(&key, "/v1/jobs?status=done").await, StatusCode::BAD_REQUEST).await;
    problem(app.get(&key, "/v1/jobs?limit=0").await, StatusCode::BAD_REQUEST).await;
    problem(app.get(&key, "/v1/jobs?cursor=zzz").await, StatusCode::BAD_REQUEST).await;
    app.stop().await;
}

#[tokio::test]
async fn the_catalog_lists_the_mock_models() {
    let app = TestApp::spawn_with(crate::support::Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_with_key().await;
    let catalog: Value = app.get(&key, "/v1/models").await.json().await.expect("JSON");
    let ids: Vec<&str> =
        catalog["models"].as_array().expect("models").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["mock/alpha", "mock/beta", "mock/gamma"]);
    assert!(catalog["models"]
        .as_array()
        .expect("models")
        .iter()
        .all(|m| m["available"] == true && m["provider"] == "mock"));

    let spec: Value = app.http.get(app.url("/openapi.json")).send().await.expect("spec").json().await.expect("JSON");
    for path in [
        "/v1/analyze",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/models",
        "/health/live",
        "/health/ready",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    assert!(spec["paths"]["/v1/analyze"]["post"]["responses"]["422"].is_object());
    let docs = app.http.get(app.url("/docs")).send().await.expect("docs");
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.expect("html").contains("swagger"));
    app.stop().await;
}
