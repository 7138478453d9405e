//! IP address blocks (`10.0.0.0/8`, `2001:db8::/32`, or one address), for the list of
//! reverse proxies whose forwarding headers the api believes (`ULTRA_TRUSTED_PROXIES`).
//! A dozen lines of bit masking, so no crate for it.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// The addresses that share the first `prefix` bits of `network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A list entry that is neither an address nor a block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or CIDR block")]
pub struct CidrError(String);

impl Cidr {
    /// The block of `prefix` bits around `address` (host bits are ignored, so
    /// `10.1.2.3/8` is `10.0.0.0/8`). An IPv4-mapped IPv6 block is its IPv4 block.
    fn new(address: IpAddr, prefix: u8) -> Self {
        match address {
            IpAddr::V4(v4) => Self { network: IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(v4), prefix))), prefix },
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => Self::new(IpAddr::V4(v4), prefix - 96),
                _ => Self { network: IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(v6), prefix))), prefix },
            },
        }
    }

    /// Whether `ip` is in the block; an IPv4-mapped IPv6 address counts as its IPv4
    /// address (a dual-stack socket reports IPv4 peers that way).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => mask_v4(u32::from(ip), self.prefix) == u32::from(network),
            (IpAddr::V6(network), IpAddr::V6(ip)) => mask_v6(u128::from(ip), self.prefix) == u128::from(network),
            _ => false,
        }
    }
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) as the IPv4 address it
/// carries: one client, one form.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn mask_v4(bits: u32, prefix: u8) -> u32 {
    bits & u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

fn mask_v6(bits: u128, prefix: u8) -> u128 {
    bits & u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `address/prefix`, or a bare address (a block of one).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let invalid = || CidrError(text.to_owned());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| invalid())?;
        let longest = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) if prefix.bytes().all(|b| b.is_ascii_digit()) => {
                prefix.parse::<u8>().ok().filter(|p| *p <= longest).ok_or_else(invalid)?
            }
            Some(_) => return Err(invalid()),
            None => longest,
        };
        Ok(Self::new(address, prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("a valid block")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn blocks_contain_their_addresses_only() {
        let private = cidr("10.0.0.0/8");
        assert!(private.contains(ip("10.255.1.2")));
        assert!(!private.contains(ip("11.0.0.1")));
        assert!(private.contains(ip("::ffff:10.1.2.3")), "an IPv4-mapped peer is its IPv4 address");
        assert!(!private.contains(ip("2001:db8::1")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
    }

    #[test]
    fn a_bare_address_is_a_block_of_one_and_host_bits_are_ignored() {
        assert_eq!(cidr("192.0.2.7"), cidr("192.0.2.7/32"));
        assert!(cidr("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!cidr("192.0.2.7").contains(ip("192.0.2.8")));
        assert_eq!(cidr("10.1.2.3/8"), cidr("10.0.0.0/8"));
        assert_eq!(cidr(" 127.0.0.0/8 ").to_string(), "127.0.0.0/8");
        assert_eq!(cidr("::1").to_string(), "::1/128");
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0.0/", "10.0.0.0/+8", "10.0.0/8", "proxy.local", "10.0.0.0/8/8"]
        {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        let refused = "nope".parse::<Cidr>().expect_err("not an address");
        assert_eq!(refused.to_string(), "`nope` is not an IP address or CIDR block");
    }
}
