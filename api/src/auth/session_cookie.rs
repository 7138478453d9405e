//! The session cookie: a refresh token a browser holds where the page's scripts cannot
//! read it (`HttpOnly`), sent only to `/v1/auth` (`Path`) and never from another
//! site's page (`SameSite=Strict`); `Secure` in production, where TLS is assumed in
//! front of Ultra. Using it also needs the `X-Ultra-Session: cookie` header
//! (`routes::auth`), which another site's form or link cannot send.

use std::time::Duration;

/// The cookie's name.
pub const NAME: &str = "ultra_refresh";
const PATH: &str = "/v1/auth";

/// `Set-Cookie` holding `token` for `ttl`.
pub fn set(token: &str, ttl: Duration, secure: bool) -> String {
    format!("{NAME}={token}; Path={PATH}; Max-Age={}; HttpOnly; SameSite=Strict{}", ttl.as_secs(), attributes(secure))
}

/// `Set-Cookie` that removes it.
pub fn clear(secure: bool) -> String {
    format!("{NAME}=; Path={PATH}; Max-Age=0; HttpOnly; SameSite=Strict{}", attributes(secure))
}

fn attributes(secure: bool) -> &'static str {
    if secure {
        "; Secure"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_http_only_strict_and_scoped_to_the_auth_routes() {
        let cookie = set("abc", Duration::from_secs(60), false);
        assert_eq!(cookie, "ultra_refresh=abc; Path=/v1/auth; Max-Age=60; HttpOnly; SameSite=Strict");
        assert!(set("abc", Duration::from_secs(60), true).ends_with("; Secure"), "production sends it over TLS only");
        assert_eq!(clear(false), "ultra_refresh=; Path=/v1/auth; Max-Age=0; HttpOnly; SameSite=Strict");
    }
}
