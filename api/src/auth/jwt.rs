//! JWT access tokens: HS256 only (the algorithm is pinned, so `alg: none` or a
//! switched algorithm never verifies), with `iss`, `aud`, `sub`, `iat`, `nbf`, `exp`
//! and a `kid` header. Keys rotate: the newest signs, every configured key verifies
//! until removed. Leeway for clock skew is explicit and small.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::config::JwtKey;
use jsonwebtoken::{decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 5;
const ALGORITHM: Algorithm = Algorithm::HS256;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    /// Token id: no two tokens are alike, even issued in the same second.
    pub jti: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("token has no `kid` or an unknown one")]
    UnknownKey,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("`sub` is not a user id")]
    BadSubject,
}

struct Key {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

pub struct JwtService {
    /// Newest first: `keys[0]` signs.
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    ttl: Duration,
    validation: Validation,
}

impl JwtService {
    pub fn new(keys: &[JwtKey], issuer: &str, audience: &str, ttl: Duration) -> Self {
        let keys = keys
            .iter()
            .map(|k| Key {
                kid: k.kid.clone(),
                encoding: EncodingKey::from_secret(&k.secret),
                decoding: DecodingKey::from_secret(&k.secret),
            })
            .collect();
        let mut validation = Validation::new(ALGORITHM);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Self { keys, issuer: issuer.to_owned(), audience: audience.to_owned(), ttl, validation }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new access token for `user_id`, signed with the newest key.
    pub fn issue(&self, user_id: Uuid) -> Result<String, JwtError> {
        let key = self.keys.first().ok_or(JwtError::UnknownKey)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_string(),
            iat: now,
            nbf: now,
            exp: now + self.ttl.as_secs(),
            jti: Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(key.kid.clone());
        Ok(encode(&header, &claims, &key.encoding)?)
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: &str) -> Result<Uuid, JwtError> {
        let header = decode_header(token)?;
        let kid = header.kid.ok_or(JwtError::UnknownKey)?;
        let key = self.keys.iter().find(|k| k.kid == kid).ok_or(JwtError::UnknownKey)?;
        let data = decode::<Claims>(token, &key.decoding, &self.validation)?;
        // `iat` in the future beyond the leeway is as suspect as a future `nbf`.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if data.claims.iat > now + LEEWAY_SECS {
            return Err(JwtError::Invalid(jsonwebtoken::errors::ErrorKind::ImmatureSignature.into()));
        }
        data.claims.sub.parse().map_err(|_| JwtError::BadSubject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kid: &str, fill: char) -> JwtKey {
        JwtKey { kid: kid.to_owned(), secret: fill.to_string().repeat(32).into_bytes() }
    }

    #[test]
    fn issued_tokens_verify_and_rotation_keeps_old_ones_valid() {
        let old = JwtService::new(&[key("k1", 'a')], "ultra", "ultra-api", Duration::from_secs(60));
        let rotated = JwtService::new(&[key("k2", 'b'), key("k1", 'a')], "ultra", "ultra-api", Duration::from_secs(60));
        let user = Uuid::now_v7();
        let token = old.issue(user).expect("issue");
        assert_eq!(rotated.verify(&token).expect("old key still verifies"), user);
        let newer = rotated.issue(user).expect("issue");
        assert_eq!(decode_header(&newer).expect("header").kid.as_deref(), Some("k2"));
        assert!(old.verify(&newer).is_err(), "a removed or unknown kid does not verify");
    }
}
