//! Housekeeping: rows past their retention are purged; nothing still in use is.

use std::time::Duration;

use common::db::retention::{purge, Retention};
use reqwest::StatusCode;
use uuid::Uuid;

use crate::support::{Options, TestApp};

#[tokio::test]
async fn a_purge_deletes_what_is_past_retention_and_nothing_in_use() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (email, _, _) = app.account().await; // a login: one refresh token
    let (user_id, key) = app.user_with_key().await;
    let ended = app.submit_ok(&key, &["mock/alpha"]).await;
    let waiting = app.submit_ok(&key, &["mock/alpha"]).await; // no worker: stays queued
    let cancelled = app.http.post(app.url(&format!("/v1/jobs/{ended}/cancel"))).bearer_auth(&key).send().await;
    assert_eq!(cancelled.expect("cancel").status(), StatusCode::OK);
    let execute = |sql: &'static str| sqlx::query(sql).execute(&app.pool);
    execute("UPDATE refresh_tokens SET expires_at = now() - interval '8 days'").await.expect("age the token");
    sqlx::query("INSERT INTO usage_daily (user_id, day, used) VALUES ($1, current_date - 500, 7)")
        .bind(user_id)
        .execute(&app.pool)
        .await
        .expect("an old usage day");
    sqlx::query("UPDATE jobs SET finished_at = now() - interval '31 days' WHERE id = $1")
        .bind(ended)
        .execute(&app.pool)
        .await
        .expect("age the job");

    for age in ["31 days", "1 day"] {
        sqlx::query(
            "INSERT INTO files (id, user_id, purpose, filename, bytes, content, created_at)
                     VALUES ($1, $2, 'batch', 'in.jsonl', 2, '{}', now() - $3::interval)",
        )
        .bind(Uuid::now_v7())
        .bind(user_id)
        .bind(age)
        .execute(&app.pool)
        .await
        .expect("a file");
    }

    // Webhook deliveries: one ended long ago, one ended lately, one still pending.
    let endpoint = common::db::webhooks::NewEndpoint {
        user_id,
        url: "https://hooks.example.com/",
        events: None,
        secret: "whsec_AAAA",
    };
    let endpoint = common::db::webhooks::create(&app.pool, &endpoint).await.expect("endpoint").id;
    for (status, ended) in [("succeeded", Some("31 days")), ("failed", Some("1 day")), ("pending", None)] {
        sqlx::query(
            "INSERT INTO webhook_deliveries (endpoint_id, event_type, body, status, finished_at)
             VALUES ($1, 'job.succeeded', '{}', $2, now() - $3::interval)",
        )
        .bind(endpoint)
        .bind(status)
        .bind(ended)
        .execute(&app.pool)
        .await
        .expect("a delivery");
    }

    let purged = purge(&app.pool, &app.config.retention()).await.expect("purge");
    assert_eq!(
        (purged.job_events, purged.refresh_tokens, purged.usage_days, purged.files, purged.webhook_deliveries),
        (2, 1, 1, 1, 1),
        "{purged:?} for {email}"
    );
    let events = |id: Uuid| app.count("SELECT count(*) FROM job_events WHERE job_id = $1", id);
    assert_eq!((events(ended).await, events(waiting).await), (0, 1), "only the ended job's events go");
    let today: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_daily WHERE user_id = $1 AND day = current_date")
        .bind(user_id)
        .fetch_one(&app.pool)
        .await
        .expect("today");
    assert_eq!(today, 1, "today's usage (with its reservation) is kept");

    // Within retention nothing goes.
    let week = Duration::from_secs(7 * 86_400);
    let long = Retention {
        idempotency_keys: week,
        job_events: week * 10,
        refresh_tokens: week * 2,
        usage_days: week * 100,
        files: week * 10,
        webhook_deliveries: week * 10,
    };
    assert_eq!(purge(&app.pool, &long).await.expect("purge"), Default::default());
    app.stop().await;
}
