//! Rate limits, budgets and concurrency: shared across replicas, atomic under races,
//! and still enforced when Redis is gone.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{problem, Options, TestApp};

/// A tier with generous rates and concurrency but a budget of exactly ten jobs of one
/// model at `max_tokens = 1000` with a one-token prompt (1001 tokens reserved each).
const RACE_TIER: &str = "[tiers.race]\nrequests_per_minute = 5000\nanalyze_per_minute = 5000\n\
                         concurrent_jobs = 1000\nmodels_per_job = 3\ndaily_tokens = 10010\n";

#[tokio::test]
async fn every_response_carries_rate_limit_and_security_headers() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_in_tier("free").await;
    let response = app.get(&key, "/v1/models").await;
    let headers = response.headers();
    assert_eq!(headers["ratelimit-policy"], "\"general\";q=60;w=60");
    assert_eq!(headers["ratelimit"], "\"general\";r=59;t=1");
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(headers[name], value, "{name}");
    }
    assert!(headers.get("strict-transport-security").is_none(), "HSTS only in production");
    // Errors carry them too.
    let missing = app.get(&key, "/v1/nope").await;
    assert_eq!(missing.headers()["x-content-type-options"], "nosniff");
    assert!(missing.headers().contains_key("ratelimit"));
    app.stop().await;
}

#[tokio::test]
async fn login_brute_force_is_throttled_per_ip() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (email, password, _) = app.account().await; // one login already spent
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(app.login(&email, "guess guess guess").await.status());
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 9);
    let blocked = app.login(&email, &password).await; // even the right password now waits
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = blocked.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body = problem(blocked, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(body["type"], "https://ultra.dev/problems/rate-limited");
    assert_eq!(statuses[9], StatusCode::TOO_MANY_REQUESTS);
    app.stop().await;
}

#[tokio::test]
async fn the_per_account_login_limit_keys_a_digest_not_the_email() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let huge = format!("{}@example.com", "x".repeat(20_000));
    assert_eq!(app.login(&huge, "guess guess guess").await.status(), StatusCode::UNAUTHORIZED);
    let client = redis::Client::open(app.config.redis_url.as_str()).expect("redis url");
    let mut redis = client.get_multiplexed_async_connection().await.expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:rl:login-account:*", app.config.redis_prefix))
        .query_async(&mut redis)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].len() < 100 && !keys[0].contains("xxxx"), "the key holds the email: {}…", &keys[0][..80]);
    app.stop().await;
}

#[tokio::test]
async fn limits_hold_across_two_api_processes_sharing_redis() {
    let mut app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let second = app.spawn_second_api().await;
    let (_, key) = app.user_in_tier("free").await; // 60 requests per minute
    let mut allowed = 0;
    let started = std::time::Instant::now();
    for i in 0..80 {
        let base = if i % 2 == 0 { app.base.clone() } else { second.clone() };
        let response = app.http.get(format!("{base}/v1/models")).bearer_auth(&key).send().await.expect("GET");
        if response.status() == StatusCode::OK {
            allowed += 1;
        } else {
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        }
    }
    // One shared budget: 60, plus one refill a second while the run lasts — not 60 per replica.
    let refills = started.elapsed().as_secs() as usize + 1;
    assert!((60..=60 + refills).contains(&allowed), "{allowed} requests passed across both replicas");
    app.stop().await;
}

#[tokio::test]
async fn without_redis_limits_still_apply_in_process() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        redis_url: Some("redis://127.0.0.1:1".into()),
        ..Default::default()
    })
    .await;
    let (_, key) = app.user_in_tier("free").await;
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..70 {
        statuses.push(app.get(&key, "/v1/models").await.status());
    }
    let allowed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refills = started.elapsed().as_secs() as usize + 1;
    assert!(statuses[..60].iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    assert!((60..=60 + refills).contains(&allowed), "{allowed} passed; the rest must be refused");
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS));
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "a missing Redis must not stall requests");
    let ready: Value = app.http.get(app.url("/health/ready")).send().await.expect("ready").json().await.expect("JSON");
    assert_eq!(ready["status"], "degraded");
    app.stop().await;
}

#[tokio::test]
async fn a_hundred_racing_submissions_never_overspend_the_budget() {
    let app =
        TestApp::spawn_with(Options { worker: false, config_toml: Some(RACE_TIER.to_owned()), ..Default::default() })
            .await;
    let (user_id, key) = app.user_in_tier("race").await;
    let body = json!({ "prompt": "race", "models": ["mock/alpha"], "options": { "max_tokens": 1000 } });
    let responses = join_all((0..100).map(|_| app.submit(&key, &body))).await;
    let mut accepted = 0;
    for response in responses {
        match response.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                let body = problem(response, StatusCode::TOO_MANY_REQUESTS).await;
                assert_eq!(body["type"], "https://ultra.dev/problems/budget-exceeded");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted, 10, "exactly the budget's worth of jobs");
    let reserved: i64 = sqlx::query_scalar("SELECT reserved FROM usage_daily WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&app.pool)
        .await
        .expect("usage");
    assert_eq!(reserved, 10_010);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_jobs_are_capped_by_tier() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, key) = app.user_in_tier("free").await; // two jobs at once
    let body = json!({ "prompt": "hi", "models": ["mock/alpha"], "options": { "max_tokens": 10 } });
    let responses = join_all((0..6).map(|_| app.submit(&key, &body))).await;
    let accepted = responses.iter().filter(|r| r.status() == StatusCode::ACCEPTED).count();
    assert_eq!(accepted, 2);
    let refused = app.submit(&key, &body).await;
    let body = problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(body["type"], "https://ultra.dev/problems/concurrency-limit");
    app.stop().await;
}

#[tokio::test]
async fn finished_jobs_settle_their_reservation_against_real_usage() {
    let app = TestApp::spawn().await;
    let (_, key) = app.user_in_tier("free").await;
    let body = json!({ "prompt": "Why is the sky blue?", "models": ["mock/alpha", "mock/beta"], "options": { "max_tokens": 500 } });
    let response = app.submit(&key, &body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id: uuid::Uuid =
        response.json::<Value>().await.expect("JSON")["id"].as_str().expect("id").parse().expect("uuid");
    let job = app.wait_for_terminal(&key, id).await;
    let spent: i64 = job["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["usage"]["input_tokens"].as_i64().unwrap_or(0) + s["usage"]["output_tokens"].as_i64().unwrap_or(0))
        .sum();
    let me: Value = app.get(&key, "/v1/me").await.json().await.expect("JSON");
    assert_eq!(me["usage"]["reserved_tokens"], 0);
    assert_eq!(me["usage"]["used_tokens"], spent);
    assert_eq!(me["usage"]["remaining_tokens"], 100_000 - spent);
    assert_eq!(me["usage"]["jobs"], 1);
    app.stop().await;
}

#[tokio::test]
async fn cors_allows_listed_origins_only() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        cors_origins: vec!["https://app.example".into()],
        ..Default::default()
    })
    .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/v1/analyze"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let allowed = preflight("https://app.example").await.expect("preflight");
    assert!(allowed.status().is_success());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://app.example");
    let refused = preflight("https://evil.example").await.expect("preflight");
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    problem(refused, StatusCode::FORBIDDEN).await;
    app.stop().await;
}
