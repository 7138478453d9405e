//! The per-request gate in front of every route: resolve the bearer credential once,
//! then apply the rate-limit policies that fit the route and the caller, and write
//! the `RateLimit` headers on the response. Unauthenticated routes (`register`,
//! `login`, `refresh`) are limited per client IP, login most strictly (password
//! guessing); authenticated ones per user, across every api replica. Before any
//! credential is looked up, an address that has failed too many is refused
//! ([`CredentialLookups`]).

use std::{net::IpAddr, sync::Arc};

use poem::{http::Method, Endpoint, IntoResponse, Middleware, Request, Response, Result};

use super::{
    authenticate,
    lookups::{CredentialLookups, Outcome},
    Principal,
};
use crate::{
    client_ip::ClientIps,
    error::ApiError,
    limits::{write_headers, Decision, Policy},
    state::AppState,
};

/// Per-IP limits of the unauthenticated routes, per minute.
const LOGIN_PER_MINUTE: u32 = 10;
const REGISTER_PER_MINUTE: u32 = 10;
const REFRESH_PER_MINUTE: u32 = 30;
/// Per-IP limit of `/v1` requests without valid credentials (key guessing).
const ANONYMOUS_PER_MINUTE: u32 = 60;

pub struct Gate {
    client_ips: ClientIps,
}

impl Gate {
    /// `client_ips` tells a client's address behind the trusted proxies.
    pub fn new(client_ips: ClientIps) -> Self {
        Self { client_ips }
    }
}

impl<E: Endpoint> Middleware<E> for Gate {
    type Output = GateEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        GateEndpoint { inner, client_ips: self.client_ips.clone(), lookups: CredentialLookups::default() }
    }
}

pub struct GateEndpoint<E> {
    inner: E,
    client_ips: ClientIps,
    /// This process's failed credentials per address.
    lookups: CredentialLookups,
}

impl<E: Endpoint> Endpoint for GateEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        let path = req.uri().path().to_owned();
        if !path.starts_with("/v1/") && !path.starts_with(crate::openai::error::PREFIX) {
            return self.inner.call(req).await.map(IntoResponse::into_response); // health, docs, spec
        }
        let state = req.data::<Arc<AppState>>().cloned().ok_or_else(|| ApiError::Internal("state missing".into()))?;
        let ip = client_ip(&self.client_ips, &req);
        let ticket = stream_ticket(&req);
        let token = if ticket.is_none() { bearer_token(&req) } else { None };
        let mut principal = None;
        if ticket.is_some() || token.is_some() {
            // Cheap and in-process, before anything is looked up.
            let lookup = match self.lookups.begin(&ip) {
                Ok(lookup) => lookup,
                Err(refused) => return Ok(refusal(&[refused])),
            };
            let is_ticket = ticket.is_some();
            let found = match (ticket, &token) {
                (Some((job_id, ticket)), _) => super::authenticate_ticket(&state, &ticket, job_id).await,
                (None, Some(token)) => authenticate(&state, token).await,
                (None, None) => Err(ApiError::Unauthorized),
            };
            // Only a refusal that cost a lookup counts against the address (a ticket's
            // always does; a token's when it was well-formed enough to look up).
            let looked_up = || token.as_deref().is_none_or(|token| super::needs_lookup(&state, token));
            match found {
                Ok(found) => {
                    self.lookups.settle(&ip, lookup, Outcome::Valid);
                    if is_ticket {
                        // The operation's bearer scheme wants a header; the principal it
                        // will be handed is this one, bound to this job's stream.
                        req.headers_mut()
                            .insert("authorization", poem::http::HeaderValue::from_static("Bearer stream-ticket"));
                    }
                    principal = Some(found);
                }
                // The operation answers 401.
                Err(ApiError::Unauthorized) if looked_up() => self.lookups.settle(&ip, lookup, Outcome::Invalid),
                Err(ApiError::Unauthorized) => self.lookups.settle(&ip, lookup, Outcome::Undecided),
                Err(err) => {
                    self.lookups.settle(&ip, lookup, Outcome::Undecided);
                    return Err(err.into());
                }
            }
        }

        let mut policies: Vec<(String, Policy)> = Vec::with_capacity(2);
        let is_post = req.method() == Method::POST;
        match (&principal, path.as_str()) {
            (_, "/v1/auth/login") if is_post => {
                policies.push((format!("ip:{ip}"), Policy::per_minute("login", LOGIN_PER_MINUTE)));
            }
            (_, "/v1/auth/register") if is_post => {
                policies.push((format!("ip:{ip}"), Policy::per_minute("register", REGISTER_PER_MINUTE)));
            }
            (_, "/v1/auth/refresh" | "/v1/auth/logout") if is_post => {
                policies.push((format!("ip:{ip}"), Policy::per_minute("refresh", REFRESH_PER_MINUTE)));
            }
            (Some(principal), _) => {
                let tier = state.tiers.for_user(&principal.tier);
                let user = format!("user:{}", principal.user_id);
                policies.push((user.clone(), Policy::per_minute("general", tier.requests_per_minute)));
                if is_post && (path == "/v1/analyze" || path == crate::openai::CHAT_COMPLETIONS) {
                    policies.push((user, Policy::per_minute("analyze", tier.analyze_per_minute)));
                }
            }
            (None, _) => policies.push((format!("ip:{ip}"), Policy::per_minute("anonymous", ANONYMOUS_PER_MINUTE))),
        }

        // Every policy counts the request and is reported; any refusal refuses it.
        let mut decisions = Vec::with_capacity(policies.len());
        for (key, policy) in policies {
            decisions.push(state.limiter.check(&key, policy).await);
        }
        if let Some(principal) = principal {
            req.extensions_mut().insert::<Principal>(principal);
        }
        if decisions.iter().any(|d| !d.allowed) {
            return Ok(refusal(&decisions));
        }
        let mut response = match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(err) => crate::error::into_problem(err).await,
        };
        write_headers(&decisions, response.headers_mut());
        Ok(response)
    }
}

/// The 429 for a request some of `decisions` refused, naming the policy that asks
/// for the longest wait, with every decision's headers.
fn refusal(decisions: &[Decision]) -> Response {
    let refused = decisions.iter().filter(|d| !d.allowed).max_by_key(|d| d.retry_after_secs);
    let (policy, retry_after) = refused.map_or(("unknown", 1), |d| (d.policy.name, d.retry_after_secs));
    metrics::counter!(common::metrics::RATE_LIMITED, "policy" => policy).increment(1);
    let mut response = poem::error::ResponseError::as_response(&ApiError::RateLimited { policy, retry_after });
    write_headers(decisions, response.headers_mut());
    response
}

/// `GET /v1/jobs/{id}/events?ticket=…` without an `Authorization` header.
fn stream_ticket(req: &Request) -> Option<(uuid::Uuid, String)> {
    if req.method() != Method::GET || req.headers().contains_key("authorization") {
        return None;
    }
    let job_id = req.uri().path().strip_prefix("/v1/jobs/")?.strip_suffix("/events")?.parse().ok()?;
    let ticket = req.uri().query()?.split('&').find_map(|pair| pair.strip_prefix("ticket="))?;
    Some((job_id, ticket.to_owned()))
}

fn bearer_token(req: &Request) -> Option<String> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned()).filter(|t| !t.is_empty())
}

/// The client's address (behind trusted proxies, the one they name), IPv6 by its /64
/// (one host usually holds a whole /64, so keying by /128 would hand it 2^64 buckets).
fn client_ip(client_ips: &ClientIps, req: &Request) -> String {
    let Some(peer) = req.remote_addr().as_socket_addr().map(|a| a.ip()) else {
        return "unknown".to_owned();
    };
    match client_ips.resolve(peer, req.headers()) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        IpAddr::V4(v4) => v4.to_string(),
    }
}
