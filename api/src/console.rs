//! The web console (`api/console/`): plain JavaScript modules, HTML and CSS, embedded
//! in the binary and served by the api itself, so `ultra all` and a browser are all
//! a user needs. It calls only the public API.
//!
//! The assets are served under `/assets/<hash>/`, the hash of all of them together:
//! their URLs change whenever any changes, so they are cached for a year
//! (`immutable`) and modules importing each other by relative path stay consistent.
//! The page itself (`/`) names them and is revalidated on every load (`no-cache`,
//! with an `ETag`). Every console response carries a Content-Security-Policy that
//! allows scripts, styles and connections from this origin only and no inline script.

use std::{collections::HashMap, sync::Arc};

use poem::{
    get, handler,
    http::{header, Method, StatusCode},
    web::{Data, Path},
    Endpoint, EndpointExt, IntoResponse, Middleware, Request, Response, Route,
};
use sha2::{Digest, Sha256};

/// What a console page may load and run: this origin only, no inline script, no
/// plugin, no framing, no `<base>` rewriting.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The files: name, content type, bytes.
const FILES: [(&str, &str, &[u8]); 3] = [
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../console/api.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../console/style.css")),
];
const INDEX: &str = include_str!("../console/index.html");

struct Asset {
    content_type: &'static str,
    bytes: &'static [u8],
}

/// The console's page and assets, with their hash.
pub struct Console {
    hash: String,
    index: String,
    index_etag: String,
    assets: HashMap<&'static str, Asset>,
}

impl Console {
    pub fn new() -> Self {
        let mut digest = Sha256::new();
        for (name, _, bytes) in FILES {
            digest.update(name.as_bytes());
            digest.update(bytes);
        }
        digest.update(INDEX.as_bytes());
        let hash = hex_prefix(&digest.finalize());
        let mut index = INDEX.to_owned();
        for (name, _, _) in FILES {
            index = index.replace(&format!("{{{{{name}}}}}"), &format!("/assets/{hash}/{name}"));
        }
        let index_etag = format!("\"{hash}\"");
        let assets = FILES.iter().map(|&(name, content_type, bytes)| (name, Asset { content_type, bytes })).collect();
        Self { hash, index, index_etag, assets }
    }

    /// Adds `GET /assets/:hash/:name` to `route`.
    pub fn serve(self: Arc<Self>, route: Route) -> Route {
        route.at("/assets/:hash/:name", get(serve_asset).data(self))
    }

    /// The page, for `GET /`.
    fn page(&self, request: &Request) -> Response {
        let builder = Response::builder()
            .header(header::CACHE_CONTROL, "no-cache")
            .header(header::ETAG, self.index_etag.as_str())
            .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
        if not_modified(request, &self.index_etag) {
            return builder.status(StatusCode::NOT_MODIFIED).finish();
        }
        builder.content_type("text/html; charset=utf-8").body(self.index.clone())
    }
}

/// Serves the page at `/`, which a route cannot hold beside the OpenAPI service
/// nested at `/` (poem gives `/` to the nest).
pub struct Root(pub Arc<Console>);

impl<E: Endpoint> Middleware<E> for Root {
    type Output = RootEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        RootEndpoint { console: self.0.clone(), inner }
    }
}

pub struct RootEndpoint<E> {
    console: Arc<Console>,
    inner: E,
}

impl<E: Endpoint> Endpoint for RootEndpoint<E> {
    type Output = Response;

    async fn call(&self, request: Request) -> poem::Result<Response> {
        if request.uri().path() == "/" && (request.method() == Method::GET || request.method() == Method::HEAD) {
            return Ok(self.console.page(&request));
        }
        self.inner.call(request).await.map(IntoResponse::into_response)
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn not_modified(request: &Request, etag: &str) -> bool {
    request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim().trim_start_matches("W/") == etag))
}

#[handler]
fn serve_asset(
    request: &Request,
    Path((hash, name)): Path<(String, String)>,
    console: Data<&Arc<Console>>,
) -> poem::Result<Response> {
    // An old hash (a page loaded before an upgrade) gets today's file only if it is
    // the same: otherwise 404, and the page's reload fetches the new set.
    let Some(asset) = console.assets.get(name.as_str()).filter(|_| hash == console.hash) else {
        return Err(crate::error::ApiError::NotFound("no such console asset").into());
    };
    let etag = format!("\"{hash}\"");
    let builder = Response::builder()
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header(header::ETAG, etag.as_str())
        .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
    if not_modified(request, &etag) {
        return Ok(builder.status(StatusCode::NOT_MODIFIED).finish());
    }
    Ok(builder.content_type(asset.content_type).body(asset.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_asset_by_the_sets_hash() {
        let console = Console::new();
        assert!(!console.index.contains("{{"), "a placeholder is left: {}", console.index);
        for (name, _, _) in FILES.iter().filter(|(name, _, _)| *name != "api.js") {
            assert!(console.index.contains(&format!("/assets/{}/{name}", console.hash)), "{name} not linked");
        }
        assert_eq!(console.hash.len(), 16);
    }

    #[test]
    fn the_policy_allows_no_inline_script_and_no_other_origin() {
        assert!(CONTENT_SECURITY_POLICY.contains("script-src 'self';"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-inline"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-eval"));
        assert!(!CONTENT_SECURITY_POLICY.contains('*'));
    }
}
