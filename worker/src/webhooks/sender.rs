//! One attempt of one delivery: check the URL, sign, POST, read a little of the
//! answer. The client resolves names itself and refuses one that reaches a
//! non-public address, so the check holds for the address really connected to (a
//! name cannot resolve one way when checked and another when used); it follows no
//! redirect and uses no proxy from the environment.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{
    db::webhooks::{Attempt, Claimed},
    webhooks::{address::Policy, message_id, signing::signature_header},
};
use reqwest::{
    dns::{Addrs, Name, Resolve, Resolving},
    header::{CONTENT_TYPE, USER_AGENT},
    Client,
};
use tokio::time::Instant;

use crate::providers::http::retry_after_within;

/// Most of a response body read; the rest is not waited for.
const BODY_LIMIT: usize = 1024;
/// Longest excerpt of a response or an error kept with the delivery (and logged).
const EXCERPT_CHARS: usize = 200;
/// Longest `Retry-After` believed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// Sends deliveries under the operator's address policy.
#[derive(Clone)]
pub struct Sender {
    client: Client,
    policy: Policy,
}

/// What an attempt got, and what the receiver asked for.
pub struct Sent {
    pub attempt: Attempt,
    pub succeeded: bool,
    pub retry_after: Option<Duration>,
}

impl Sender {
    pub fn new(policy: Policy, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = Client::builder()
            .dns_resolver(Arc::new(CheckedResolver { policy }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()?;
        Ok(Self { client, policy })
    }

    /// One attempt of `delivery`: 2xx succeeds; any other status, a refused URL, a
    /// transport error or the timeout fails.
    pub async fn send(&self, delivery: &Claimed) -> Sent {
        let started = Instant::now();
        let failed = |error: String| Sent {
            attempt: Attempt { status_code: None, latency: started.elapsed(), error: Some(excerpt(&error)) },
            succeeded: false,
            retry_after: None,
        };
        // Checked again at every attempt: an address in the URL, and the scheme, under
        // today's policy.
        let url = match self.policy.check(&delivery.url) {
            Ok(url) => url,
            Err(problem) => return failed(format!("the URL {problem}")),
        };
        let id = message_id(delivery.id);
        let timestamp = chrono::Utc::now().timestamp();
        let secrets = std::iter::once(delivery.secret.as_str()).chain(delivery.previous_secret.as_deref());
        let signature = match signature_header(secrets, &id, timestamp, &delivery.body) {
            Ok(signature) => signature,
            Err(err) => return failed(err.to_string()),
        };
        let request = self
            .client
            .post(url)
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("Ultra-Webhooks/", env!("CARGO_PKG_VERSION")))
            .body(delivery.body.clone());
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(err) => return failed(describe(err)),
        };
        let status = response.status();
        let retry_after = retry_after_within(response.headers(), MAX_RETRY_AFTER);
        // A little of the body says why a receiver refused; more is never waited for.
        let mut body = Vec::new();
        while body.len() < BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(BODY_LIMIT - body.len())]),
                Ok(None) | Err(_) => break,
            }
        }
        let succeeded = status.is_success();
        let error = (!succeeded).then(|| {
            let text = String::from_utf8_lossy(&body);
            excerpt(&format!("HTTP {}{}{}", status.as_u16(), if text.is_empty() { "" } else { ": " }, text.trim()))
        });
        Sent {
            attempt: Attempt { status_code: Some(status.as_u16()), latency: started.elapsed(), error },
            succeeded,
            retry_after: if succeeded { None } else { retry_after },
        }
    }
}

/// A transport error and its causes, one line (reqwest's own text omits the cause,
/// which says what really happened: refused, reset, a refused address).
/// The URL is left out: its query may carry a receiver's token.
fn describe(err: reqwest::Error) -> String {
    if err.is_timeout() {
        return "timed out".to_owned();
    }
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// At most `EXCERPT_CHARS` characters of `text`, control characters replaced: safe to
/// store, show and log.
fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(EXCERPT_CHARS).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    out
}

/// Resolves a name and refuses it if any of its addresses is not allowed: the
/// connection can then only go to an address that was checked.
struct CheckedResolver {
    policy: Policy,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addresses.iter().find(|a| !policy.allows(a.ip())) {
                // The address stays in the log: a user reading the delivery's error must
                // not learn how the workers' network resolves names.
                tracing::info!(%host, address = %bad.ip(), "webhook host resolves to a non-public address");
                return Err(format!("{host} resolves to an address that is not public").into());
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    const STRICT: Policy = Policy { require_https: false, allow_private: false };

    /// A name passes the URL check (it is not an address) but resolves to loopback: the
    /// resolver the connection goes through refuses it.
    #[tokio::test]
    async fn a_name_that_resolves_to_a_private_address_is_refused_after_dns() {
        let resolver = CheckedResolver { policy: STRICT };
        let name = Name::from_str("localhost").unwrap_or_else(|_| unreachable!("a host name"));
        let refused = resolver.resolve(name).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("not public"), "{refused:?}");
        let allowed = CheckedResolver { policy: Policy { allow_private: true, ..STRICT } };
        let name = Name::from_str("localhost").unwrap_or_else(|_| unreachable!("a host name"));
        assert!(allowed.resolve(name).await.is_ok(), "allowed private addresses are refused");
    }

    #[test]
    fn an_excerpt_is_short_and_on_one_line() {
        let long = format!("line one\nline two\r\n{}", "x".repeat(500));
        let short = excerpt(&long);
        assert!(!short.contains('\n') && !short.contains('\r'));
        assert_eq!(short.chars().count(), EXCERPT_CHARS + 1);
    }
}
