//! The Dify API key at rest: AES-256-GCM with a random nonce, and the preview shown to admins.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use secrecy::{ExposeSecret, SecretString};

const NONCE_LEN: usize = 12;
/// Bound to the ciphertext so it cannot be moved to another column.
const AAD: &[u8] = b"rechat:settings:dify_api_key";

/// `nonce || ciphertext+tag`.
pub fn encrypt(key: &[u8; 32], plaintext: &SecretString) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let payload = aes_gcm::aead::Payload {
        msg: plaintext.expose_secret().as_bytes(),
        aad: AAD,
    };
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(&nonce, payload)
            .expect("AES-GCM encryption of a short key"),
    );
    out
}

/// `None` when the data was not encrypted under this key (e.g. `SECRET_KEY` changed).
pub fn decrypt(key: &[u8; 32], data: &[u8]) -> Option<SecretString> {
    if data.len() <= NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = data.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new(key.into());
    let plain = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            aes_gcm::aead::Payload {
                msg: ciphertext,
                aad: AAD,
            },
        )
        .ok()?;
    String::from_utf8(plain).ok().map(SecretString::from)
}

/// First 4 + "..." + last 4 characters; keys too short for that show only "...".
pub fn preview(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "...".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let key = [7u8; 32];
        let secret = SecretString::from("app-abcdefghijklmnop");
        let sealed = encrypt(&key, &secret);
        assert!(!sealed.windows(8).any(|w| w == b"abcdefgh"));
        assert_eq!(
            decrypt(&key, &sealed).unwrap().expose_secret(),
            "app-abcdefghijklmnop"
        );
        assert!(decrypt(&[8u8; 32], &sealed).is_none());
        assert!(decrypt(&key, &sealed[..5]).is_none());
        assert_ne!(encrypt(&key, &secret), sealed, "nonces are random");
    }

    #[test]
    fn previews_never_show_the_middle() {
        assert_eq!(preview("app-abcdefghijklmnop"), "app-...mnop");
        assert_eq!(preview("short"), "...");
    }
}
