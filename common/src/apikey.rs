//! API keys: `ultra_<12-char public id>_<32-char secret><6-char checksum>`. The
//! public part finds the row; only a SHA-256 of the whole key is stored. The secret
//! has ~190 bits of entropy, so a fast hash is enough (no password stretching). The
//! `ultra_` prefix and the checksum let secret scanners recognise a leaked key
//! without asking us, and let the api refuse a mistyped key without a lookup.

use rand::{distr::Alphanumeric, Rng};
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "ultra_";
const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A freshly generated key. `secret` is shown to its owner once and never stored.
pub struct GeneratedKey {
    /// The whole key, as the client sends it.
    pub secret: String,
    /// The public lookup part, `ultra_<id>`.
    pub prefix: String,
    pub hash: Vec<u8>,
}

pub fn generate() -> GeneratedKey {
    let mut rng = rand::rng();
    let mut random =
        |len: usize| -> String { (&mut rng).sample_iter(&Alphanumeric).take(len).map(char::from).collect() };
    let prefix = format!("{KEY_PREFIX}{}", random(ID_LEN).to_lowercase());
    let body = format!("{prefix}_{}", random(SECRET_LEN));
    let secret = format!("{body}{}", checksum(&body));
    let hash = hash(&secret);
    GeneratedKey { secret, prefix, hash }
}

/// The public prefix of a well-formed key, or `None` for anything else.
pub fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let well_formed = id.len() == ID_LEN
        && secret.len() == SECRET_LEN + CHECKSUM_LEN
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    if !well_formed {
        return None;
    }
    let (body, check) = key.split_at(key.len() - CHECKSUM_LEN);
    (checksum(body) == check).then(|| &key[..KEY_PREFIX.len() + ID_LEN])
}

/// Six base62 characters from the first 32 bits of the body's SHA-256.
fn checksum(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    let mut n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Compares a presented key with a stored hash without an early exit.
pub fn verify(key: &str, stored_hash: &[u8]) -> bool {
    let presented = hash(key);
    presented.len() == stored_hash.len()
        && presented.iter().zip(stored_hash).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let key = generate();
        assert_eq!(prefix_of(&key.secret), Some(key.prefix.as_str()));
        assert!(verify(&key.secret, &key.hash));
        assert!(!verify(&format!("{}x", key.secret), &key.hash));
        assert_ne!(generate().secret, key.secret);
        assert_eq!(key.secret.len(), KEY_PREFIX.len() + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN);
    }

    #[test]
    fn a_mistyped_key_fails_its_checksum() {
        let key = generate().secret;
        let mut typo = key.clone().into_bytes();
        let at = KEY_PREFIX.len() + ID_LEN + 5;
        typo[at] = if typo[at] == b'a' { b'b' } else { b'a' };
        assert_eq!(prefix_of(&String::from_utf8(typo).expect("ascii")), None);
    }

    #[test]
    fn malformed_keys_have_no_prefix() {
        for bad in [
            "",
            "ultra_",
            "sk-abc",
            "ultra_abc_def",
            "ultra_ABCDEFGHIJKL_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "ultra_abcdefghijkl_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa000000",
        ] {
            assert_eq!(prefix_of(bad), None, "{bad}");
        }
    }
}
