//! Account rules: email normalisation and the password policy.

use icu_casemap::CaseMapper;
use icu_normalizer::ComposingNormalizerBorrowed;

use crate::db::types::uuid_id;
use crate::error::AppError;

uuid_id!(
    /// A user account's id.
    UserId,
    "user"
);

pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;

/// Longest email accepted, in characters (RFC 5321's path limit).
pub const EMAIL_MAX_CHARS: usize = 254;

/// An email address in its one stored spelling — trimmed, NFKC-normalised and case-folded, so
/// `ＤＡＶＥ@ex.com` and `dave@ex.com` are one address — checked for a plausible shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(input: &str) -> Result<Self, AppError> {
        let email = Self::normalize(input)?;
        let invalid = || {
            AppError::bad_input(
                "email",
                "enter a valid email address, like name@example.com",
            )
        };
        if email.chars().count() > EMAIL_MAX_CHARS
            || email.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid());
        }
        let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
        let domain_ok = domain.len() >= 3
            && domain.contains('.')
            && !domain.contains('@')
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_alphanumeric() || c == '-')
            });
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local
                .chars()
                .all(|c| c.is_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
        if domain_ok && local_ok {
            Ok(Self(email))
        } else {
            Err(invalid())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stored spelling of what someone typed, for sign-in: refused over
    /// [`EMAIL_MAX_CHARS`] before any other work.
    pub fn normalize(input: &str) -> Result<String, AppError> {
        let input = input.trim();
        if input.chars().nth(EMAIL_MAX_CHARS).is_some() {
            return Err(AppError::bad_input(
                "email",
                format!("an email address has at most {EMAIL_MAX_CHARS} characters"),
            ));
        }
        let nfkc = ComposingNormalizerBorrowed::new_nfkc();
        let folded = CaseMapper::new()
            .fold_string(&nfkc.normalize(input))
            .into_owned();
        // Folding can undo the normal form (NFKC_Casefold is NFKC ∘ fold ∘ NFKC).
        Ok(nfkc.normalize(&folded).into_owned())
    }
}

/// 8–128 characters (counted as characters, not bytes).
pub fn check_password(password: &str) -> Result<(), AppError> {
    let len = password.chars().count();
    if len < PASSWORD_MIN {
        return Err(AppError::bad_input(
            "password",
            format!("the password must have at least {PASSWORD_MIN} characters"),
        ));
    }
    if len > PASSWORD_MAX {
        return Err(AppError::bad_input(
            "password",
            format!("the password must have at most {PASSWORD_MAX} characters"),
        ));
    }
    Ok(())
}

/// An optional display name: trimmed, empty means none, at most 255 characters.
pub fn clean_full_name(name: Option<String>) -> Result<Option<String>, AppError> {
    let name = name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    if name.as_ref().is_some_and(|n| n.chars().count() > 255) {
        return Err(AppError::bad_input(
            "fullName",
            "the name must have at most 255 characters",
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        assert_eq!(
            Email::parse("a.b+tag@sub.example.io").unwrap().as_str(),
            "a.b+tag@sub.example.io"
        );
    }

    #[test]
    fn one_address_has_one_spelling() {
        for spelling in ["ｄａｖｅ@ex.com", "DAVE@EX.COM", " Dave@Ex.com "] {
            assert_eq!(Email::parse(spelling).unwrap().as_str(), "dave@ex.com");
        }
        assert_eq!(
            Email::parse("STRASSE@ex.com").unwrap(),
            Email::parse("straße@ex.com").unwrap()
        );
        assert_eq!(Email::normalize("Ⅸ@ex.com").unwrap(), "ix@ex.com");
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(
            Email::normalize(&long).unwrap_err().code(),
            "BAD_USER_INPUT"
        );
    }

    #[test]
    fn bad_emails_are_refused() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "ada@@example.com",
            "ada@exa_mple.com",
            ".ada@example.com",
            "ada@-x.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_policy_counts_characters() {
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"é".repeat(128)).is_ok());
        assert!(check_password(&"x".repeat(129)).is_err());
    }
}
