//! The web console's server side: the page and its assets (types, caching, the
//! Content-Security-Policy), and the session cookie the console signs in with — its
//! flags, and the header without which it is refused (cross-site request forgery).
//! The console itself runs in a real browser in tests/console/.

use reqwest::{
    header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, SET_COOKIE},
    StatusCode,
};
use serde_json::{json, Value};

use crate::support::{problem, TestApp};

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> String {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_their_types_caching_and_policy() {
    let app = TestApp::spawn().await;
    let page = app.http.get(app.url("/")).send().await.expect("GET /");
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(header(&page, CONTENT_TYPE), "text/html; charset=utf-8");
    assert_eq!(header(&page, CACHE_CONTROL), "no-cache", "the page is revalidated on every load");
    let policy = header(&page, CONTENT_SECURITY_POLICY);
    for directive in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
        assert!(policy.contains(directive), "{directive} missing from {policy}");
    }
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    let etag = header(&page, ETAG);
    let html = page.text().await.expect("HTML");
    assert!(!html.contains("<script>") && !html.contains(" style="), "inline script or style in the page");

    // The page names its assets by their hash; each is served with its type, for a year.
    let assets: Vec<&str> = html.split('"').filter(|part| part.starts_with("/assets/")).collect();
    assert_eq!(assets.len(), 2, "{html}");
    for (path, content_type) in [(assets[0], "text/css; charset=utf-8"), (assets[1], "text/javascript; charset=utf-8")]
    {
        let asset = app.http.get(app.url(path)).send().await.expect("GET asset");
        assert_eq!(asset.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&asset, CONTENT_TYPE), content_type, "{path}");
        assert_eq!(header(&asset, CACHE_CONTROL), "public, max-age=31536000, immutable", "{path}");
        assert_eq!(header(&asset, CONTENT_SECURITY_POLICY), policy);
    }
    // A module the page imports by relative path sits beside it.
    let module = assets[1].replace("app.js", "api.js");
    assert_eq!(app.http.get(app.url(&module)).send().await.expect("GET").status(), StatusCode::OK);

    // Revalidation: the same page answers 304; an unknown hash or name is a 404.
    let again = app.http.get(app.url("/")).header(IF_NONE_MATCH, &etag).send().await.expect("GET /");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let stale = assets[1].replace("/assets/", "/assets/0000");
    problem(app.http.get(app.url(&stale)).send().await.expect("GET"), StatusCode::NOT_FOUND).await;
    let unknown = assets[1].replace("app.js", "secrets.js");
    problem(app.http.get(app.url(&unknown)).send().await.expect("GET"), StatusCode::NOT_FOUND).await;
    // The api keeps its own policy.
    let api = app.http.get(app.url("/health/live")).send().await.expect("GET");
    assert_eq!(header(&api, CONTENT_SECURITY_POLICY), "frame-ancestors 'none'");
    assert_eq!(header(&api, CACHE_CONTROL), "no-store");
    app.stop().await;
}

#[tokio::test]
async fn the_session_cookie_is_http_only_strict_and_needs_its_header() {
    let app = TestApp::spawn().await;
    let (email, password, _) = app.account().await;
    let login = app
        .http
        .post(app.url("/v1/auth/login"))
        .header("X-Ultra-Session", "cookie")
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), StatusCode::OK);
    let cookie = header(&login, SET_COOKIE);
    assert!(cookie.starts_with("ultra_refresh="), "{cookie}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/v1/auth", "Max-Age="] {
        assert!(cookie.contains(flag), "{flag} missing from {cookie}");
    }
    assert!(!cookie.contains("Secure"), "development serves plain HTTP: {cookie}");
    let body: Value = login.json().await.expect("JSON");
    assert!(body["access_token"].is_string());
    assert!(body.get("refresh_token").is_none(), "the token the cookie holds is not in the body too: {body}");
    let token = cookie.split(';').next().and_then(|c| c.strip_prefix("ultra_refresh=")).expect("value").to_owned();

    // The cookie without its header is what another site's form would send: refused.
    let refresh = |with_header: bool| {
        let request = app.http.post(app.url("/v1/auth/refresh")).header("Cookie", format!("ultra_refresh={token}"));
        let request = if with_header { request.header("X-Ultra-Session", "cookie") } else { request };
        request.json(&json!({})).send()
    };
    problem(refresh(false).await.expect("refresh"), StatusCode::FORBIDDEN).await;
    let refreshed = refresh(true).await.expect("refresh");
    assert_eq!(refreshed.status(), StatusCode::OK);
    let rotated = header(&refreshed, SET_COOKIE);
    assert!(rotated.starts_with("ultra_refresh=") && !rotated.contains(&token), "the cookie is rotated: {rotated}");
    let rotated = rotated.split(';').next().and_then(|c| c.strip_prefix("ultra_refresh=")).expect("value").to_owned();

    // Signing out revokes the session and clears the cookie.
    let logout = app
        .http
        .post(app.url("/v1/auth/logout"))
        .header("Cookie", format!("ultra_refresh={rotated}"))
        .header("X-Ultra-Session", "cookie")
        .json(&json!({}))
        .send()
        .await
        .expect("logout");
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    assert!(header(&logout, SET_COOKIE).contains("Max-Age=0"), "the cookie is not cleared");
    let after = app.http.post(app.url("/v1/auth/refresh")).json(&json!({ "refresh_token": rotated })).send().await;
    problem(after.expect("refresh"), StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}
