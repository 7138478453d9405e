//! Passwords: Argon2id (m = 19456 KiB, t = 2, p = 1, OWASP's minimum), hashed on the
//! blocking pool so the async threads keep serving, and bounded by a semaphore so a
//! login storm queues instead of exhausting memory. Unknown emails are verified
//! against a dummy hash, so they take as long as wrong passwords.

use std::sync::Arc;

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString},
    Algorithm, Argon2, Params, Version,
};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Shortest and longest passwords accepted (the upper bound keeps hashing cheap to refuse).
pub const MIN_PASSWORD_CHARS: usize = 12;
pub const MAX_PASSWORD_CHARS: usize = 256;

fn argon2() -> Argon2<'static> {
    // These parameters are constants that `Params::new` accepts.
    let params = Params::new(19_456, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

pub struct Passwords {
    permits: Arc<Semaphore>,
    /// A hash of a random password: what unknown emails are verified against.
    dummy_hash: String,
}

impl Passwords {
    pub fn new(concurrency: usize) -> Self {
        let random: String = uuid::Uuid::new_v4().to_string();
        let dummy_hash = hash_blocking(&random).unwrap_or_default();
        Self { permits: Arc::new(Semaphore::new(concurrency.max(1))), dummy_hash }
    }

    pub async fn hash(&self, password: &str) -> Result<String, ApiError> {
        let password = password.to_owned();
        self.run(move || hash_blocking(&password)).await?.map_err(|e| ApiError::Internal(e.to_string().into()))
    }

    /// Whether `password` matches `hash`; with no hash (unknown user, or a user
    /// without a password) it still does the work, then answers false.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, ApiError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or(&self.dummy_hash).to_owned();
        let password = password.to_owned();
        let matches = self
            .run(move || {
                PasswordHash::new(&hash).is_ok_and(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
            })
            .await?;
        Ok(known && matches)
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        // The permit moves into the blocking task: if the request is cancelled (timeout,
        // disconnect), the hash still running keeps counting against the bound.
        let permit = self.permits.clone().acquire_owned().await.map_err(|e| ApiError::Internal(e.into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))
    }
}

fn hash_blocking(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(argon2().hash_password(password.as_bytes(), &salt)?.to_string())
}

/// The password policy; the message names what is wrong.
pub fn check_policy(password: &str, email: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
    }
    if password.trim().eq_ignore_ascii_case(email.trim()) {
        return Err("must not be the email address".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        assert!(check_policy("short", "a@b.co").is_err());
        assert!(check_policy("Alice@Example.com", "alice@example.com").is_err());
        assert!(check_policy("correct horse battery", "a@b.co").is_ok());
        assert!(check_policy(&"x".repeat(257), "a@b.co").is_err());
    }

    #[tokio::test]
    async fn hashes_are_argon2id_and_verify() {
        let passwords = Passwords::new(2);
        let hash = passwords.hash("correct horse battery").await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(passwords.verify("correct horse battery", Some(&hash)).await.expect("verify"));
        assert!(!passwords.verify("wrong horse battery", Some(&hash)).await.expect("verify"));
        assert!(!passwords.verify("correct horse battery", None).await.expect("verify"));
    }
}
