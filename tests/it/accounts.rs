//! Accounts and tokens, tried the way an attacker would.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{fields, problem, Options, TestApp};

#[tokio::test]
async fn register_login_me_refresh_and_logout() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (email, _, tokens) = app.account().await;
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 900);
    let access = tokens["access_token"].as_str().expect("access token").to_owned();
    let refresh = tokens["refresh_token"].as_str().expect("refresh token").to_owned();

    let me = app.get(&access, "/v1/me").await;
    assert_eq!(me.headers()["cache-control"], "no-store");
    let me: Value = me.json().await.expect("JSON");
    assert_eq!(me["email"], email);
    assert_eq!(me["tier"], "free");
    assert_eq!(me["role"], "user");
    assert_eq!(me["limits"]["requests_per_minute"], 60);
    assert_eq!(me["limits"]["analyze_per_minute"], 10);
    assert_eq!(me["usage"]["used_tokens"], 0);

    // Refresh rotates: new tokens, and the old refresh token is spent.
    let rotated = post(&app, "/v1/auth/refresh", &json!({ "refresh_token": refresh })).await;
    assert_eq!(rotated.status(), StatusCode::OK);
    let rotated: Value = rotated.json().await.expect("JSON");
    let second_refresh = rotated["refresh_token"].as_str().expect("refresh").to_owned();
    assert_ne!(second_refresh, refresh);
    assert_eq!(app.get(rotated["access_token"].as_str().expect("access"), "/v1/me").await.status(), StatusCode::OK);

    // Logout revokes the login's refresh tokens.
    let out = post(&app, "/v1/auth/logout", &json!({ "refresh_token": second_refresh })).await;
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    let after = post(&app, "/v1/auth/refresh", &json!({ "refresh_token": second_refresh })).await;
    problem(after, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

#[tokio::test]
async fn reusing_a_rotated_refresh_token_revokes_the_whole_family() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, _, tokens) = app.account().await;
    let stolen = tokens["refresh_token"].as_str().expect("refresh").to_owned();
    let legit: Value =
        post(&app, "/v1/auth/refresh", &json!({ "refresh_token": stolen })).await.json().await.expect("JSON");
    let legit_refresh = legit["refresh_token"].as_str().expect("refresh").to_owned();

    // The thief replays the old token: refused, and the family is burnt.
    problem(post(&app, "/v1/auth/refresh", &json!({ "refresh_token": stolen })).await, StatusCode::UNAUTHORIZED).await;
    let legit_again = post(&app, "/v1/auth/refresh", &json!({ "refresh_token": legit_refresh })).await;
    problem(legit_again, StatusCode::UNAUTHORIZED).await;
    problem(post(&app, "/v1/auth/refresh", &json!({ "refresh_token": "made-up" })).await, StatusCode::UNAUTHORIZED)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn registration_enforces_the_policy_and_refuses_mass_assignment() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let cases = [
        (json!({ "email": "a@example.com", "password": "short" }), vec!["password"]),
        (json!({ "email": "alice@example.com", "password": "Alice@Example.com" }), vec!["password"]),
        (json!({ "email": "not-an-email", "password": "correct horse battery" }), vec!["email"]),
        (json!({ "email": "m@example.com", "password": "correct horse battery", "tier": "enterprise" }), vec!["tier"]),
        (json!({ "email": "m@example.com", "password": "correct horse battery", "role": "admin" }), vec!["role"]),
        (json!({ "email": "m@example.com", "password": "correct horse battery", "balance": 1e9 }), vec!["balance"]),
    ];
    for (body, expected) in cases {
        let response = post(&app, "/v1/auth/register", &body).await;
        let problem = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&problem), expected, "{body}");
    }
    // Nothing above created an account, let alone a privileged one.
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.pool).await.expect("count");
    assert_eq!(users, 0);

    assert_eq!(app.register("  Bob@Example.COM ", "correct horse battery").await.status(), StatusCode::CREATED);
    problem(app.register("bob@example.com", "another good password").await, StatusCode::CONFLICT).await;
    let login = app.login("BOB@example.com", "correct horse battery").await;
    assert_eq!(login.status(), StatusCode::OK, "emails are normalised");
    app.stop().await;
}

#[tokio::test]
async fn wrong_email_and_wrong_password_answer_identically() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (email, _, _) = app.account().await;
    let mut timings = [Vec::new(), Vec::new()];
    let mut bodies = Vec::new();
    for _ in 0..3 {
        for (i, (who, password)) in
            [(email.as_str(), "wrong password here"), ("nobody@example.com", "wrong password here")]
                .into_iter()
                .enumerate()
        {
            let start = std::time::Instant::now();
            let response = app.login(who, password).await;
            timings[i].push(start.elapsed());
            bodies.push(problem(response, StatusCode::UNAUTHORIZED).await);
        }
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    // Both paths hash: an unknown email is not answered measurably faster.
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (known, unknown) = (median(&mut timings[0]), median(&mut timings[1]));
    assert!(unknown * 4 >= known, "unknown email {unknown:?} vs wrong password {known:?}");
    app.stop().await;
}

#[tokio::test]
async fn api_keys_are_self_service_and_private() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, _, alice) = app.account().await;
    let (_, _, mallory) = app.account().await;
    let alice = alice["access_token"].as_str().expect("token").to_owned();
    let mallory = mallory["access_token"].as_str().expect("token").to_owned();

    let created = app.http.post(app.url("/v1/api-keys")).bearer_auth(&alice).json(&json!({ "name": "laptop" })).send();
    let created = created.await.expect("create");
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.expect("JSON");
    let key = created["key"].as_str().expect("key shown once").to_owned();
    assert!(key.starts_with("ultra_") && key.starts_with(created["prefix"].as_str().expect("prefix")));
    assert_eq!(app.get(&key, "/v1/me").await.status(), StatusCode::OK);
    // A key cannot mint keys: a leaked one must not outlive its revocation.
    let minted = app.http.post(app.url("/v1/api-keys")).bearer_auth(&key).json(&json!({ "name": "x" })).send();
    problem(minted.await.expect("create"), StatusCode::FORBIDDEN).await;

    let listed = app.get(&alice, "/v1/api-keys").await.text().await.expect("body");
    assert!(!listed.contains(&key) && !listed.contains("hash"), "{listed}");
    let listed: Value = serde_json::from_str(&listed).expect("JSON");
    assert_eq!(listed["api_keys"][0]["name"], "laptop");
    assert!(listed["api_keys"][0]["last_used_at"].is_string());
    let theirs: Value = app.get(&mallory, "/v1/api-keys").await.json().await.expect("JSON");
    assert_eq!(theirs["api_keys"], json!([]));

    let id = created["id"].as_str().expect("id");
    let path = app.url(&format!("/v1/api-keys/{id}"));
    problem(app.http.delete(&path).bearer_auth(&mallory).send().await.expect("delete"), StatusCode::NOT_FOUND).await;
    assert_eq!(app.get(&key, "/v1/me").await.status(), StatusCode::OK, "someone else cannot revoke it");
    let revoked = app.http.delete(&path).bearer_auth(&alice).send().await.expect("delete");
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    problem(app.get(&key, "/v1/me").await, StatusCode::UNAUTHORIZED).await;
    problem(app.http.delete(&path).bearer_auth(&alice).send().await.expect("delete"), StatusCode::NOT_FOUND).await;

    let bad_name = app.http.post(app.url("/v1/api-keys")).bearer_auth(&alice).json(&json!({ "name": "" })).send();
    problem(bad_name.await.expect("create"), StatusCode::UNPROCESSABLE_ENTITY).await;
    app.stop().await;
}

#[tokio::test]
async fn only_admins_change_tiers_and_disabling_cuts_access_at_once() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, _, user_tokens) = app.account().await;
    let user_token = user_tokens["access_token"].as_str().expect("token").to_owned();
    let me: Value = app.get(&user_token, "/v1/me").await.json().await.expect("JSON");
    let user_id = me["id"].as_str().expect("id").to_owned();
    let (_, user_key) = {
        let key = app.http.post(app.url("/v1/api-keys")).bearer_auth(&user_token).json(&json!({ "name": "k" })).send();
        let key: Value = key.await.expect("key").json().await.expect("JSON");
        ((), key["key"].as_str().expect("key").to_owned())
    };
    let (admin_id, admin_key) = app.user_with_key().await;
    sqlx::query("UPDATE users SET role = 'admin' WHERE id = $1")
        .bind(admin_id)
        .execute(&app.pool)
        .await
        .expect("promote");

    let patch = |token: &str, body: Value| {
        app.http.patch(app.url(&format!("/v1/admin/users/{user_id}"))).bearer_auth(token.to_owned()).json(&body).send()
    };
    // A user cannot raise their own tier, nor sneak in a role.
    problem(patch(&user_token, json!({ "tier": "enterprise" })).await.expect("patch"), StatusCode::FORBIDDEN).await;
    problem(patch(&user_key, json!({ "tier": "enterprise" })).await.expect("patch"), StatusCode::FORBIDDEN).await;
    let sneaky =
        problem(patch(&admin_key, json!({ "role": "admin" })).await.expect("patch"), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&sneaky.await), ["role"]);
    problem(patch(&admin_key, json!({ "tier": "platinum" })).await.expect("patch"), StatusCode::UNPROCESSABLE_ENTITY)
        .await;

    let updated = patch(&admin_key, json!({ "tier": "premium" })).await.expect("patch");
    assert_eq!(updated.status(), StatusCode::OK);
    let me: Value = app.get(&user_token, "/v1/me").await.json().await.expect("JSON");
    assert_eq!((me["tier"].as_str(), me["role"].as_str()), (Some("premium"), Some("user")));

    let disabled = patch(&admin_key, json!({ "disabled": true })).await.expect("patch");
    assert_eq!(disabled.status(), StatusCode::OK);
    problem(app.get(&user_token, "/v1/me").await, StatusCode::UNAUTHORIZED).await;
    problem(app.get(&user_key, "/v1/me").await, StatusCode::UNAUTHORIZED).await;
    let refresh = user_tokens["refresh_token"].as_str().expect("refresh");
    problem(post(&app, "/v1/auth/refresh", &json!({ "refresh_token": refresh })).await, StatusCode::UNAUTHORIZED).await;

    let missing = app.http.patch(app.url(&format!("/v1/admin/users/{}", uuid::Uuid::now_v7())));
    problem(
        missing.bearer_auth(&admin_key).json(&json!({ "disabled": true })).send().await.expect("patch"),
        StatusCode::NOT_FOUND,
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn every_route_with_an_id_hides_other_users_resources() {
    let app = TestApp::spawn().await;
    let alice = app.account().await.2["access_token"].as_str().expect("token").to_owned();
    let (_, mallory) = app.user_with_key().await;
    let job = app.submit_ok(&alice, &["mock/alpha"]).await;
    app.wait_for_terminal(&alice, job).await;
    let key: Value = app
        .http
        .post(app.url("/v1/api-keys"))
        .bearer_auth(&alice)
        .json(&json!({ "name": "x" }))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("JSON");
    let key_id = key["id"].as_str().expect("id");
    for response in [
        app.get(&mallory, &format!("/v1/jobs/{job}")).await,
        app.events(&mallory, job, None).await,
        app.http.delete(app.url(&format!("/v1/api-keys/{key_id}"))).bearer_auth(&mallory).send().await.expect("delete"),
    ] {
        problem(response, StatusCode::NOT_FOUND).await;
    }
    app.stop().await;
}

async fn post(app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.http.post(app.url(path)).json(body).send().await.expect("POST")
}
