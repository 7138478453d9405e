//! Signing secrets and signatures. A secret is `whsec_` and the base64 of 24 random
//! bytes; a signature is `v1,` and the base64 HMAC-SHA256, under the secret's bytes,
//! of `{webhook-id}.{webhook-timestamp}.{body}`. While a rotated secret's grace
//! lasts, `webhook-signature` carries one signature per secret, space-separated, and a
//! receiver holding either verifies.

use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "whsec_";
const SECRET_BYTES: usize = 24;

/// A new signing secret, `whsec_…`.
pub fn new_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", STANDARD.encode(bytes))
}

/// A secret that is not `whsec_` and base64 (only a damaged row can hold one).
#[derive(Debug, thiserror::Error)]
#[error("a webhook secret is not `whsec_` followed by base64")]
pub struct BadSecret;

/// `v1,<base64>`: the signature of one message under one secret.
pub fn sign(secret: &str, message_id: &str, timestamp: i64, body: &str) -> Result<String, BadSecret> {
    let key = STANDARD.decode(secret.strip_prefix(PREFIX).unwrap_or(secret)).map_err(|_| BadSecret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| BadSecret)?;
    mac.update(message_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` header: a signature per secret, space-separated.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a str>,
    message_id: &str,
    timestamp: i64,
    body: &str,
) -> Result<String, BadSecret> {
    let signatures: Result<Vec<String>, BadSecret> =
        secrets.into_iter().map(|secret| sign(secret, message_id, timestamp, body)).collect();
    Ok(signatures?.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the spec's reference implementations (standard-webhooks,
    /// libraries/python/tests): this secret, id, timestamp and body sign as shown.
    #[test]
    fn signs_as_the_reference_implementation_does() {
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(signature.ok().as_deref(), Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
    }

    #[test]
    fn a_new_secret_is_whsec_and_24_random_bytes() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        let bytes = STANDARD.decode(a.strip_prefix(PREFIX).unwrap_or_default());
        assert_eq!(bytes.map(|b| b.len()).ok(), Some(SECRET_BYTES));
    }

    #[test]
    fn during_a_rotation_both_secrets_sign() {
        let (old, new) = (new_secret(), new_secret());
        let header = signature_header([new.as_str(), old.as_str()], "msg_1", 1, "{}").unwrap_or_default();
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], sign(&new, "msg_1", 1, "{}").unwrap_or_default());
        assert_eq!(parts[1], sign(&old, "msg_1", 1, "{}").unwrap_or_default());
    }
}
