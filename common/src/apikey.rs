//! API keys: `ultra_<12-char public id>_<32-char secret>`. The public part finds the
//! row; only a SHA-256 of the whole key is stored. The secret has ~190 bits of
//! entropy, so a fast hash is enough (no password-stretching needed), and the
//! `ultra_` prefix lets secret scanners recognise a leaked key.

use rand::{distr::Alphanumeric, Rng};
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "ultra_";
const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;

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
    let secret = format!("{prefix}_{}", random(SECRET_LEN));
    let hash = hash(&secret);
    GeneratedKey { secret, prefix, hash }
}

/// The public prefix of a well-formed key, or `None` for anything else.
pub fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let well_formed = id.len() == ID_LEN
        && secret.len() == SECRET_LEN
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    well_formed.then(|| &key[..KEY_PREFIX.len() + ID_LEN])
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
    }

    #[test]
    fn malformed_keys_have_no_prefix() {
        for bad in ["", "ultra_", "sk-abc", "ultra_abc_def", "ultra_ABCDEFGHIJKL_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
            assert_eq!(prefix_of(bad), None, "{bad}");
        }
    }
}
