//! Every JWT forgery we know of answers 401.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{problem, Options, TestApp};

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn sign(alg: Algorithm, kid: Option<&str>, secret: &[u8], claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign")
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
}

#[tokio::test]
async fn forged_and_invalid_tokens_are_refused() {
    let app = TestApp::spawn_with(Options { worker: false, ..Default::default() }).await;
    let (_, _, tokens) = app.account().await;
    let genuine = tokens["access_token"].as_str().expect("token").to_owned();
    assert_eq!(app.get(&genuine, "/v1/me").await.status(), StatusCode::OK);
    let victim = app.account().await.2["access_token"].as_str().expect("token").to_owned();
    let victim_sub = {
        let me: Value = app.get(&victim, "/v1/me").await.json().await.expect("JSON");
        me["id"].as_str().expect("id").to_owned()
    };

    let keys = app.config.jwt_keys().expect("keys");
    let (kid, secret) = (keys[0].kid.as_str(), keys[0].secret.as_slice());
    let (iss, aud) = (app.config.jwt_issuer.as_str(), app.config.jwt_audience.as_str());
    let t = now();
    let claims = |overrides: Value| {
        let mut base =
            json!({ "iss": iss, "aud": aud, "sub": victim_sub, "iat": t, "nbf": t, "exp": t + 600, "jti": "x" });
        if let (Some(base), Some(over)) = (base.as_object_mut(), overrides.as_object()) {
            for (k, v) in over {
                if v.is_null() {
                    base.remove(k);
                } else {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
        base
    };
    // The control: correctly signed, it works — so each refusal below is about its one flaw.
    let control = sign(Algorithm::HS256, Some(kid), secret, &claims(json!({})));
    assert_eq!(app.get(&control, "/v1/me").await.status(), StatusCode::OK);

    let parts: Vec<&str> = genuine.split('.').collect();
    let payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
    let mut tampered_payload = payload.clone();
    tampered_payload["sub"] = json!(victim_sub);

    let forgeries: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!("{}.{}.", b64(&json!({ "alg": "none", "typ": "JWT", "kid": kid })), b64(&claims(json!({})))),
        ),
        ("alg none, no signature dot", format!("{}.{}", b64(&json!({ "alg": "none" })), b64(&claims(json!({}))))),
        ("HS512 with the right secret", sign(Algorithm::HS512, Some(kid), secret, &claims(json!({})))),
        ("HS384 with the right secret", sign(Algorithm::HS384, Some(kid), secret, &claims(json!({})))),
        ("wrong key", sign(Algorithm::HS256, Some(kid), &[7u8; 32], &claims(json!({})))),
        ("unknown kid", sign(Algorithm::HS256, Some("other"), secret, &claims(json!({})))),
        ("no kid", sign(Algorithm::HS256, None, secret, &claims(json!({})))),
        (
            "expired",
            sign(
                Algorithm::HS256,
                Some(kid),
                secret,
                &claims(json!({ "exp": t - 120, "iat": t - 1000, "nbf": t - 1000 })),
            ),
        ),
        ("not yet valid", sign(Algorithm::HS256, Some(kid), secret, &claims(json!({ "nbf": t + 600 })))),
        ("issued in the future", sign(Algorithm::HS256, Some(kid), secret, &claims(json!({ "iat": t + 600 })))),
        ("wrong iss", sign(Algorithm::HS256, Some(kid), secret, &claims(json!({ "iss": "evil" })))),
        ("wrong aud", sign(Algorithm::HS256, Some(kid), secret, &claims(json!({ "aud": "other-api" })))),
        ("no exp", sign(Algorithm::HS256, Some(kid), secret, &claims(json!({ "exp": null })))),
        ("no sub", sign(Algorithm::HS256, Some(kid), secret, &claims(json!({ "sub": null })))),
        (
            "sub not a user",
            sign(Algorithm::HS256, Some(kid), secret, &claims(json!({ "sub": uuid::Uuid::now_v7().to_string() }))),
        ),
        ("tampered payload", format!("{}.{}.{}", parts[0], b64(&tampered_payload), parts[2])),
        ("truncated", genuine[..genuine.len() - 5].to_owned()),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (name, token) in forgeries {
        let response = app.get(&token, "/v1/me").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name} was accepted");
        problem(response, StatusCode::UNAUTHORIZED).await;
    }
    app.stop().await;
}
