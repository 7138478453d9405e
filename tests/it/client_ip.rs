//! Per-IP limits see the client, not the proxy in front of the api — but only through
//! proxies the operator trusts — and an address that fails too many credentials is
//! refused before the database is asked about the next one.

use std::time::Instant;

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::support::{problem, Options, TestApp};

/// A login for an account nobody has (so the per-account limit stays out of the way),
/// sent as if through a proxy that wrote `x_forwarded_for`.
async fn login_through_proxy(app: &TestApp, x_forwarded_for: &str) -> StatusCode {
    let body = json!({ "email": format!("{}@example.com", Uuid::new_v4().simple()), "password": "guess guess guess" });
    let request = app.http.post(app.url("/v1/auth/login")).header("x-forwarded-for", x_forwarded_for);
    request.json(&body).send().await.expect("login").status()
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_bucket() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        trusted_proxies: vec!["127.0.0.0/8".to_owned()],
        ..Default::default()
    })
    .await;
    // Thirty clients behind one proxy address: one login each, none limited.
    for n in 0..30 {
        assert_eq!(login_through_proxy(&app, &format!("203.0.113.{n}")).await, StatusCode::UNAUTHORIZED, "client {n}");
    }
    // One client, whatever it writes left of the proxy's hop, is one bucket (10 a minute).
    let mut statuses = Vec::new();
    for n in 0..11 {
        statuses.push(login_through_proxy(&app, &format!("10.9.{n}.1, 198.51.100.7")).await);
    }
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{statuses:?}");
    assert_eq!(statuses[10], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    app.stop().await;
}

#[tokio::test]
async fn without_trusted_proxies_forwarding_headers_are_ignored() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let mut statuses = Vec::new();
    for n in 0..11 {
        statuses.push(login_through_proxy(&app, &format!("203.0.113.{n}")).await);
    }
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{statuses:?}");
    assert_eq!(statuses[10], StatusCode::TOO_MANY_REQUESTS, "every login came from the peer: {statuses:?}");
    app.stop().await;
}

/// `GET /v1/models` with a well-formed API key nobody issued: refusing it takes a
/// database lookup.
async fn with_unknown_key(app: &TestApp) -> reqwest::Response {
    app.get(&common::apikey::generate().secret, "/v1/models").await
}

#[tokio::test]
async fn unknown_api_keys_are_refused_before_the_database_once_an_address_has_failed_enough() {
    let app = TestApp::spawn_with(Options { worker: false, proxied: true, ..Default::default() }).await;
    let started = Instant::now();
    // Sixty at once: each is looked up, and fails.
    let first = join_all((0..60).map(|_| with_unknown_key(&app))).await;
    let statuses: Vec<StatusCode> = first.iter().map(reqwest::Response::status).collect();
    assert!(statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{statuses:?}");

    // With the database gone, a lookup could only end in 503: a 429 is answered
    // before any lookup. (Each second since the start frees one lookup, which then
    // meets the missing database.)
    let postgres = &app.proxies.as_ref().expect("proxied").postgres;
    postgres.cut();
    let next = join_all((0..20).map(|_| with_unknown_key(&app))).await;
    let refills = started.elapsed().as_secs() as usize;
    let mut limited = 0;
    for response in next {
        match response.status() {
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                let policy = response.headers()["ratelimit-policy"].to_str().expect("ascii").to_owned();
                assert!(policy.contains("\"credentials\""), "{policy}");
                assert!(response.headers().contains_key("retry-after"));
                let body = problem(response, StatusCode::TOO_MANY_REQUESTS).await;
                assert_eq!(body["type"], "https://ultra.dev/problems/rate-limited");
            }
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(limited >= 20 - refills.min(20), "only {limited} of 20 refused before a lookup ({refills} s in)");
    postgres.restore();
    app.stop().await;
}
