//! Which URLs may receive a webhook, so that a user cannot point Ultra at the
//! network it runs in (server-side request forgery). A URL is `http(s)` with a host,
//! no credentials, and in production `https`; every address it reaches must be
//! public — not loopback, private, link-local (cloud metadata at 169.254.169.254),
//! shared, documentation, multicast or reserved — unless the operator allows private
//! addresses (`ULTRA_WEBHOOK_ALLOW_PRIVATE`, which production refuses). A name is
//! checked after DNS, at delivery, by the resolver the sender connects with
//! (`worker::webhooks`); an address written in the URL is checked here.

use std::{net::IpAddr, sync::LazyLock};

use url::{Host, Url};

use crate::{cidr::Cidr, config::Config};

/// What the operator allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub require_https: bool,
    pub allow_private: bool,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        Self { require_https: config.is_production(), allow_private: config.webhook_allow_private }
    }

    /// Whether a delivery may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip)
    }

    /// `text` as a webhook URL, or what is wrong with it.
    pub fn check(&self, text: &str) -> Result<Url, String> {
        let url = Url::parse(text.trim()).map_err(|err| format!("is not a URL ({err})"))?;
        match url.scheme() {
            "https" => {}
            "http" if !self.require_https => {}
            "http" => return Err("must be https".to_owned()),
            other => return Err(format!("must be https, not {other}")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials".to_owned());
        }
        match url.host() {
            None => return Err("has no host".to_owned()),
            Some(Host::Ipv4(ip)) if !self.allows(IpAddr::V4(ip)) => return Err(refused(IpAddr::V4(ip))),
            Some(Host::Ipv6(ip)) if !self.allows(IpAddr::V6(ip)) => return Err(refused(IpAddr::V6(ip))),
            Some(Host::Domain(name)) if !self.allow_private && is_local_name(name) => {
                return Err(format!("names a local host ({name})"))
            }
            Some(_) => {}
        }
        Ok(url)
    }
}

/// Why a URL's address is refused.
pub fn refused(ip: IpAddr) -> String {
    format!("reaches {ip}, which is not a public address")
}

/// Names that never leave the machine or its network, refused before any lookup.
fn is_local_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.ends_with(".local") || name.ends_with(".internal")
}

/// Blocks that are not the public internet (IANA's special-purpose registries). An
/// IPv4-mapped IPv6 address counts as its IPv4 address; NAT64, 6to4 and Teredo are
/// refused whole, since each can carry a private IPv4 address inside.
static NOT_PUBLIC: LazyLock<Vec<Cidr>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "::/96",
        "::ffff:0:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "2002::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ]
    .iter()
    .map(|block| block.parse().unwrap_or_else(|_| unreachable!("{block} is a CIDR block")))
    .collect()
});

/// Whether `ip` is on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    !NOT_PUBLIC.iter().any(|block| block.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Policy = Policy { require_https: true, allow_private: false };
    const DEVELOPMENT: Policy = Policy { require_https: false, allow_private: false };
    const PERMISSIVE: Policy = Policy { require_https: false, allow_private: true };

    #[test]
    fn private_loopback_link_local_and_unique_local_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fc12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "::7f00:1",
            "ff02::1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap_or_else(|_| panic!("{ip}"));
            assert!(!is_public(ip), "{ip} counted as public");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::200e"] {
            let ip: IpAddr = ip.parse().unwrap_or_else(|_| panic!("{ip}"));
            assert!(is_public(ip), "{ip} refused");
        }
    }

    #[test]
    fn urls_naming_private_addresses_are_refused_in_every_spelling() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://10.0.0.7/hook",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/hook",
            "http://[fd12::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://2130706433/hook",
            "http://0x7f.1/hook",
            "http://0177.0.0.1/hook",
            "http://localhost:9000/hook",
            "http://api.localhost/hook",
        ] {
            assert!(DEVELOPMENT.check(url).is_err(), "{url} accepted");
            assert!(PERMISSIVE.check(url).is_ok(), "{url} refused though private addresses are allowed");
        }
    }

    #[test]
    fn production_wants_https_and_every_mode_wants_a_plain_http_url() {
        assert_eq!(STRICT.check("http://hooks.example.com/x").err().as_deref(), Some("must be https"));
        assert!(STRICT.check("https://hooks.example.com/x").is_ok());
        assert!(DEVELOPMENT.check("http://hooks.example.com/x").is_ok());
        for url in ["ftp://example.com/", "file:///etc/passwd", "https://user:pw@example.com/", "not a url", "https://"]
        {
            assert!(PERMISSIVE.check(url).is_err(), "{url} accepted");
        }
    }
}
