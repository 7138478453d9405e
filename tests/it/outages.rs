//! Connections dropped under the app, the way operators and networks drop them: the
//! app reconnects by itself, without a restart. Only this test's own connections are
//! dropped (by database name, or by the broker connection's name), so the tests running
//! beside it are undisturbed; Redis drops are tested through cuttable proxies
//! (`health.rs`), since Redis clients carry no name to pick ours by.

use std::time::Duration;

use crate::support::TestApp;

#[tokio::test]
async fn postgres_connections_terminated_under_the_app_are_replaced() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let first = app.submit_ok(&key, &["mock/alpha"]).await;
    app.wait_for_terminal(&key, first).await;

    let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&app.pool).await.expect("name");
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&database)
    .fetch_all(&app.pool)
    .await
    .expect("terminate");
    assert!(!killed.is_empty(), "the app had connections to terminate");

    // The next requests may meet a dead connection once; the pool replaces it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let second = loop {
        let response = app.submit(&key, &serde_json::json!({ "prompt": "again", "models": ["mock/alpha"] })).await;
        if response.status() == reqwest::StatusCode::ACCEPTED {
            break response.json::<serde_json::Value>().await.expect("JSON")["id"]
                .as_str()
                .expect("id")
                .parse()
                .expect("uuid");
        }
        assert!(tokio::time::Instant::now() < deadline, "the api never recovered: {}", response.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(app.wait_for_terminal(&key, second).await["status"], "succeeded");
    app.stop().await;
}

#[tokio::test]
async fn broker_connections_closed_by_an_operator_are_reopened() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_with_key().await;
    let first = app.submit_ok(&key, &["mock/alpha"]).await;
    assert_eq!(app.wait_for_terminal(&key, first).await["status"], "succeeded");

    let prefix = app.config.queue_prefix.clone();
    let closed = tokio::task::spawn_blocking(move || crate::support::close_broker_connections(&prefix))
        .await
        .expect("rabbitmqctl");
    assert!(closed >= 2, "the api's publisher and the worker's consumer were connected ({closed} found)");

    // Both sides reconnect on their own: the job is accepted and runs.
    let second = app.submit_ok(&key, &["mock/alpha", "mock/beta"]).await;
    assert_eq!(app.wait_for_terminal(&key, second).await["status"], "succeeded");
    app.stop().await;
}
