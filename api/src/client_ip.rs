//! The client's address, for per-IP limits. Behind reverse proxies the TCP peer is a
//! proxy; each proxy appends the address it took the request from to
//! `X-Forwarded-For` (or `Forwarded: for=`). Only hops written by the proxies the
//! operator lists (`ULTRA_TRUSTED_PROXIES`) are believed: reading from the peer
//! leftwards, the client is the first address that is not a trusted proxy. Whatever
//! lies left of it was written by the client and may be forged, so a client cannot
//! pick its own bucket by sending the header itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::cidr::{canonical, Cidr};
use poem::http::HeaderMap;

/// Hops read at most, from the right: a longer chain is not believed any further.
const MAX_HOPS: usize = 16;

/// One hop of a forwarding chain: an address, or something that names none
/// (`unknown`, an obfuscated `_name`, garbage).
type Hop = Option<IpAddr>;

/// The header the trusted proxies write (`ULTRA_FORWARDED_HEADER`). Only that one is
/// read: the other is whatever the client chose to send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=…`.
    Forwarded,
}

impl std::str::FromStr for ForwardedHeader {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            other => Err(format!("ULTRA_FORWARDED_HEADER is `{other}`: `x-forwarded-for` or `forwarded`")),
        }
    }
}

/// Resolves client addresses given the trusted proxies.
#[derive(Debug, Clone, Default)]
pub struct ClientIps {
    trusted: Vec<Cidr>,
    header: ForwardedHeader,
}

impl ClientIps {
    pub fn new(trusted: Vec<Cidr>, header: ForwardedHeader) -> Self {
        Self { trusted, header }
    }

    /// The client's address, given the connection's `peer` and the request's headers.
    /// With no trusted proxies, or a peer that is not one, the headers are ignored.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let chain = match self.header {
            ForwardedHeader::XForwardedFor => hops(headers, "x-forwarded-for", parse_forwarded_for),
            ForwardedHeader::Forwarded => hops(headers, "forwarded", parse_forwarded),
        };
        chain.map_or(peer, |hops| self.walk(peer, &hops))
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|block| block.contains(ip))
    }

    /// From the trusted `peer` leftwards: each trusted address vouches for the hop
    /// before it. The first untrusted address is the client; a hop that names no
    /// address stops the walk at the trusted proxy that wrote it (whose bucket is
    /// shared, never the client's choice); a chain of trusted hops only ends at its
    /// left-most address.
    fn walk(&self, peer: IpAddr, hops: &[Hop]) -> IpAddr {
        let mut client = peer;
        for hop in hops.iter().rev().take(MAX_HOPS) {
            if !self.is_trusted(client) {
                return client;
            }
            match hop {
                Some(ip) => client = *ip,
                None => return client,
            }
        }
        client
    }
}

/// Every hop of every `name` header, in order; `None` without such a header. A value
/// that is not text is one hop that names nothing.
fn hops(headers: &HeaderMap, name: &str, parse: fn(&str, &mut Vec<Hop>)) -> Option<Vec<Hop>> {
    let mut found = None;
    for value in headers.get_all(name) {
        let hops = found.get_or_insert_with(Vec::new);
        match value.to_str() {
            Ok(text) => parse(text, hops),
            Err(_) => hops.push(None),
        }
    }
    found
}

/// `X-Forwarded-For: client, proxy1, proxy2`.
fn parse_forwarded_for(value: &str, hops: &mut Vec<Hop>) {
    hops.extend(value.split(',').map(node));
}

/// `Forwarded: for=192.0.2.60;proto=http, for="[2001:db8::1]:4711"` (RFC 7239): one
/// element per hop, its `for` parameter naming the address.
fn parse_forwarded(value: &str, hops: &mut Vec<Hop>) {
    for element in split_unquoted(value, b',') {
        let for_node = split_unquoted(element, b';').into_iter().find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            name.trim().eq_ignore_ascii_case("for").then_some(value.trim())
        });
        hops.push(for_node.and_then(|value| node(unquote(value))));
    }
}

/// An RFC 7239 node: `192.0.2.60`, `192.0.2.60:80`, `[2001:db8::1]`, `[2001:db8::1]:4711`
/// (and, as some proxies write it in `X-Forwarded-For`, a bare `2001:db8::1`).
fn node(text: &str) -> Hop {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('[') {
        let (address, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return address.parse::<Ipv6Addr>().ok().map(|v6| canonical(IpAddr::V6(v6)));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    let (address, port) = text.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    address.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A port number, or an obfuscated one (`_` and letters, digits, `.`, `_`, `-`).
fn is_port(text: &str) -> bool {
    match text.strip_prefix('_') {
        Some(rest) => !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        None => text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u16>().is_ok(),
    }
}

/// `"text"` → `text`; anything else as it is.
fn unquote(text: &str) -> &str {
    text.strip_prefix('"').and_then(|inner| inner.strip_suffix('"')).unwrap_or(text)
}

/// `text` split at each `separator` outside a quoted string.
fn split_unquoted(text: &str, separator: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, byte) in text.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && byte == b'\\' {
            escaped = true;
        } else if byte == b'"' {
            quoted = !quoted;
        } else if byte == separator && !quoted {
            parts.push(&text[start..at]);
            start = at + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use poem::http::HeaderValue;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    fn proxies(blocks: &[&str]) -> ClientIps {
        ClientIps::new(blocks.iter().map(|b| b.parse().expect("a block")).collect(), ForwardedHeader::XForwardedFor)
    }

    fn resolve_bytes(ips: &ClientIps, peer: &str, pairs: &[(&'static str, &[u8])]) -> IpAddr {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_bytes(value).expect("a header value"));
        }
        ips.resolve(ip(peer), &headers)
    }

    fn resolve(ips: &ClientIps, peer: &str, pairs: &[(&'static str, &str)]) -> IpAddr {
        let pairs: Vec<(&'static str, &[u8])> = pairs.iter().map(|(name, value)| (*name, value.as_bytes())).collect();
        resolve_bytes(ips, peer, &pairs)
    }

    fn xff(ips: &ClientIps, peer: &str, value: &str) -> IpAddr {
        resolve(ips, peer, &[("x-forwarded-for", value)])
    }

    fn forwarded(ips: &ClientIps, value: &str) -> IpAddr {
        let ips = ClientIps { header: ForwardedHeader::Forwarded, ..ips.clone() };
        resolve(&ips, "10.0.0.1", &[("forwarded", value)])
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let ips = proxies(&["10.0.0.0/8"]);
        assert_eq!(xff(&ips, "10.0.0.1", "203.0.113.7"), ip("203.0.113.7"));
        // Through two trusted proxies: each vouches for the hop before it.
        assert_eq!(xff(&ips, "10.0.0.1", "203.0.113.7, 10.0.0.2"), ip("203.0.113.7"));
        // A forged left-most hop is the client's own writing: it is never reached.
        assert_eq!(xff(&ips, "10.0.0.1", "198.51.100.1, 203.0.113.7"), ip("203.0.113.7"));
        assert_eq!(xff(&ips, "10.0.0.1", "10.0.0.9, 203.0.113.7, 10.0.0.2"), ip("203.0.113.7"));
        // Hops spread over several header lines are one chain, in order.
        let split = [("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "203.0.113.7")];
        assert_eq!(resolve(&ips, "10.0.0.1", &split), ip("203.0.113.7"));
        // Every hop trusted: the left-most is as far as anyone can see.
        assert_eq!(xff(&ips, "10.0.0.1", "10.0.0.3, 10.0.0.2"), ip("10.0.0.3"));
        // Ports and brackets, as some proxies write them.
        assert_eq!(xff(&ips, "10.0.0.1", "203.0.113.7:5123"), ip("203.0.113.7"));
        assert_eq!(xff(&ips, "10.0.0.1", "[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(xff(&ips, "10.0.0.1", "2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(xff(&ips, "10.0.0.1", "::ffff:203.0.113.7"), ip("203.0.113.7"));
    }

    #[test]
    fn headers_count_only_from_a_trusted_peer() {
        let ips = proxies(&["10.0.0.0/8"]);
        assert_eq!(xff(&ClientIps::default(), "10.0.0.1", "203.0.113.7"), ip("10.0.0.1"), "no trusted proxies");
        assert_eq!(xff(&ips, "192.0.2.1", "203.0.113.7"), ip("192.0.2.1"), "an untrusted peer");
        assert_eq!(resolve(&ips, "10.0.0.1", &[]), ip("10.0.0.1"), "no header");
        assert_eq!(xff(&ips, "::ffff:10.0.0.1", "203.0.113.7"), ip("203.0.113.7"), "an IPv4-mapped peer");
    }

    #[test]
    fn forwarded_names_hops_by_their_for_parameter() {
        let ips = proxies(&["10.0.0.0/8"]);
        assert_eq!(forwarded(&ips, r#"for="[2001:db8::1]:4711""#), ip("2001:db8::1"));
        assert_eq!(forwarded(&ips, "for=192.0.2.60;proto=http;by=10.0.0.1"), ip("192.0.2.60"));
        assert_eq!(forwarded(&ips, r#"for=198.51.100.1, For="192.0.2.60:80";proto=https"#), ip("192.0.2.60"));
        assert_eq!(forwarded(&ips, r#"for="_hidden", for=10.0.0.2"#), ip("10.0.0.2"));
        // A quoted comma or semicolon splits nothing.
        assert_eq!(forwarded(&ips, r#"for=192.0.2.60;ext="a,b;c""#), ip("192.0.2.60"));
    }

    #[test]
    fn garbage_stops_at_the_proxy_that_passed_it_on() {
        let ips = proxies(&["10.0.0.0/8"]);
        for garbage in ["not an address", "", "203.0.113.7, unknown", "203.0.113.7:99999", "[2001:db8::1", "1.2.3"] {
            assert_eq!(xff(&ips, "10.0.0.1", garbage), ip("10.0.0.1"), "{garbage:?}");
        }
        for garbage in ["for=unknown", "proto=https", r#"for="[::1""#, "nonsense", "for=[2001:db8::1]x"] {
            assert_eq!(forwarded(&ips, garbage), ip("10.0.0.1"), "{garbage:?}");
        }
        let binary: &[u8] = b"\xff\xfe";
        assert_eq!(resolve_bytes(&ips, "10.0.0.1", &[("x-forwarded-for", binary)]), ip("10.0.0.1"));
        // Garbage left of the client does not matter.
        assert_eq!(xff(&ips, "10.0.0.1", "junk, 203.0.113.7"), ip("203.0.113.7"));
    }

    #[test]
    fn only_the_header_the_proxies_write_is_read() {
        let xff_proxies = proxies(&["10.0.0.0/8"]);
        let forwarded_proxies = ClientIps { header: ForwardedHeader::Forwarded, ..xff_proxies.clone() };
        let both = [("x-forwarded-for", "203.0.113.7"), ("forwarded", "for=198.51.100.1")];
        assert_eq!(resolve(&xff_proxies, "10.0.0.1", &both), ip("203.0.113.7"));
        assert_eq!(resolve(&forwarded_proxies, "10.0.0.1", &both), ip("198.51.100.1"));
        // A client's own `Forwarded` behind X-Forwarded-For proxies moves it nowhere.
        assert_eq!(resolve(&xff_proxies, "10.0.0.1", &[("forwarded", "for=198.51.100.1")]), ip("10.0.0.1"));
    }

    #[test]
    fn a_long_chain_is_read_only_so_far() {
        let ips = proxies(&["10.0.0.0/8"]);
        let chain: Vec<String> =
            std::iter::once("203.0.113.7".to_owned()).chain((0..40).map(|n| format!("10.0.{n}.1"))).collect();
        let client = xff(&ips, "10.0.0.1", &chain.join(", "));
        assert!(ips.is_trusted(client), "stops at a proxy ({client}), never reaching the client");
    }
}
