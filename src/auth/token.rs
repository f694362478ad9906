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

/// Clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 5;

/// What a verified token says: whose it is, the token version it was issued under, and when it
/// stops being accepted (leeway included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub user: UserId,
    pub token_version: i32,
    pub expires_at: DateTime<Utc>,
}

impl Session {
    pub fn is_expired(&self) -> bool {
        Utc::now() >= self.expires_at
    }
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

    /// The session a token carries, when its signature is valid and it has not expired.
    pub fn verify(&self, token: &str) -> Option<Session> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        let id = uuid::Uuid::parse_str(&data.claims.sub).ok()?;
        Some(Session {
            user: UserId(id),
            token_version: data.claims.ver,
            expires_at: DateTime::from_timestamp(data.claims.exp + LEEWAY_SECS as i64, 0)?,
        })
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
        let session = keys.verify(&token).unwrap();
        assert_eq!((session.user, session.token_version), (user, 3));
        assert!(!session.is_expired());

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
