//! JWT (HS256) issue and verification, and the keys derived from `SECRET_KEY`.

use chrono::{DateTime, Utc};
use hkdf::Hkdf;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::users::domain::UserId;

/// Signing and encryption keys, each derived from `SECRET_KEY` for its own purpose.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// AES-256-GCM key for secrets stored in the database (the Dify API key).
    pub cipher_key: [u8; 32],
    token_lifetime: std::time::Duration,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    /// The user's `token_version` when issued; bumping it revokes every earlier token.
    pub ver: i32,
}

fn derive(secret: &[u8], purpose: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"rechat"), secret)
        .expand(purpose.as_bytes(), &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

impl Keys {
    pub fn new(secret: &[u8], token_lifetime: std::time::Duration) -> Self {
        let jwt = derive(secret, "jwt-hs256-v1");
        Self {
            encoding: EncodingKey::from_secret(&jwt),
            decoding: DecodingKey::from_secret(&jwt),
            cipher_key: derive(secret, "settings-aes-256-gcm-v1"),
            token_lifetime,
        }
    }

    pub fn issue(
        &self,
        user: UserId,
        token_version: i32,
    ) -> anyhow::Result<(String, DateTime<Utc>)> {
        let now = Utc::now();
        let expires_at = now + self.token_lifetime;
        let claims = Claims {
            sub: user.to_string(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            ver: token_version,
        };
        Ok((self.sign(&claims)?, expires_at))
    }

    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &self.encoding,
        )?)
    }

    /// The claims of a token with a valid signature that has not expired.
    pub fn verify(&self, token: &str) -> Option<(UserId, i32)> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        let id = uuid::Uuid::parse_str(&data.claims.sub).ok()?;
        Some((UserId(id), data.claims.ver))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn issued_tokens_verify_and_tampered_ones_do_not() {
        let keys = Keys::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let user = UserId::new();
        let (token, _) = keys.issue(user, 3).unwrap();
        assert_eq!(keys.verify(&token), Some((user, 3)));

        let other = Keys::new(b"another-secret-another-secret-xx", Duration::from_secs(60));
        assert_eq!(other.verify(&token), None);
        let mut tampered = token.clone();
        tampered.insert(tampered.len() - 3, 'x');
        assert_eq!(keys.verify(&tampered), None);
    }

    #[test]
    fn expired_tokens_are_refused() {
        let keys = Keys::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let now = Utc::now().timestamp();
        let token = keys
            .sign(&Claims {
                sub: UserId::new().to_string(),
                iat: now - 600,
                exp: now - 60,
                ver: 0,
            })
            .unwrap();
        assert_eq!(keys.verify(&token), None);
    }
}
