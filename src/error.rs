//! `AppError`: the one error type at the GraphQL boundary, and its mapping to `extensions.code`.
//!
//! `AppError` deliberately does not implement `Display`: async-graphql's blanket conversion
//! would turn a `Display` error into a bare `Error` without extensions. Resolvers return
//! `AppResult` and every error goes through the `From` impl below, which sets the code.

use async_graphql::ErrorExtensions;

#[derive(Debug, Clone)]
pub enum AppError {
    BadUserInput {
        /// The input's path, e.g. `email` or `inputs.city`.
        field: std::borrow::Cow<'static, str>,
        message: String,
    },
    Unauthenticated(&'static str),
    Forbidden,
    NotFound(&'static str),
    Conflict(&'static str),
    /// A turn into a conversation whose answer is still streaming (`CONFLICT`).
    TurnInProgress {
        active: crate::conversations::domain::MessageId,
    },
    RateLimited {
        retry_after: u64,
    },
    DifyNotConfigured,
    /// The app named, or the conversation's app, is disabled or was deleted.
    AppUnavailable,
    Upstream {
        code: String,
        message: String,
        status: u16,
    },
    UpstreamUnavailable(String),
    /// MySQL cannot be reached: the client may retry shortly (HTTP 503).
    Unavailable,
    /// A per-user or per-connection limit: `limit` names it, `max` is its value.
    LimitExceeded {
        limit: &'static str,
        max: u64,
        message: String,
    },
    /// The user's token quota for the month is used up, until `resets_at`.
    QuotaExceeded {
        resets_at: chrono::DateTime<chrono::Utc>,
    },
    /// Shared so the error can be cloned, as async-graphql requires of resolver errors.
    Internal(std::sync::Arc<anyhow::Error>),
}

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn bad_input(field: &'static str, message: impl Into<String>) -> Self {
        Self::BadUserInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// `bad_input` for a field named at run time (`inputs.<variable>`).
    pub fn bad_input_owned(field: String, message: impl Into<String>) -> Self {
        Self::BadUserInput {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(std::sync::Arc::new(error.into()))
    }

    /// The message a client sees; never internal details.
    pub fn message(&self) -> String {
        match self {
            Self::BadUserInput { message, .. } => message.clone(),
            Self::Unauthenticated(message) | Self::Conflict(message) => (*message).to_owned(),
            Self::TurnInProgress { .. } => {
                "this conversation's previous answer is still streaming; wait for it (or stop it) \
                 and send again"
                    .into()
            }
            Self::Forbidden => "this operation requires an admin account".into(),
            Self::NotFound(what) => format!("{what} not found"),
            Self::RateLimited { retry_after } => {
                format!("too many attempts; retry in {retry_after} s")
            }
            Self::DifyNotConfigured => {
                "no Dify API key is configured; an admin must set one with setDifyConfig".into()
            }
            Self::Upstream {
                code,
                message,
                status,
            } => format!("Dify answered {status} {code}: {message}"),
            Self::UpstreamUnavailable(message) => format!("Dify could not be reached: {message}"),
            Self::AppUnavailable => {
                "this Dify app is disabled or was deleted; pick another app".into()
            }
            Self::Unavailable => "the database is unavailable; try again in a moment".into(),
            Self::LimitExceeded { message, .. } => message.clone(),
            Self::QuotaExceeded { resets_at } => format!(
                "your token quota for this month is used up; it resets at {}",
                resets_at.to_rfc3339()
            ),
            Self::Internal(_) => "internal server error".into(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadUserInput { .. } => "BAD_USER_INPUT",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound(_) => "NOT_FOUND",
            Self::Conflict(_) | Self::TurnInProgress { .. } => "CONFLICT",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::DifyNotConfigured => "DIFY_NOT_CONFIGURED",
            Self::AppUnavailable => "APP_UNAVAILABLE",
            Self::Upstream { .. } => "UPSTREAM_ERROR",
            Self::UpstreamUnavailable(_) => "UPSTREAM_UNAVAILABLE",
            Self::Unavailable => SERVICE_UNAVAILABLE,
            Self::LimitExceeded { .. } => "LIMIT_EXCEEDED",
            Self::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Self::Internal(_) => "INTERNAL_SERVER_ERROR",
        }
    }
}

pub const NOT_SIGNED_IN: &str = "sign in first: send Authorization: Bearer <token>";
pub const SESSION_INVALID: &str = "the token is invalid, expired or revoked; sign in again";

/// The code of [`AppError::Unavailable`]; HTTP answers carrying it have status 503.
pub const SERVICE_UNAVAILABLE: &str = "SERVICE_UNAVAILABLE";

impl From<diesel::result::Error> for AppError {
    fn from(error: diesel::result::Error) -> Self {
        if crate::db::is_unavailable(&error) {
            tracing::warn!(%error, "MySQL is unavailable");
            return Self::Unavailable;
        }
        Self::internal(error)
    }
}

impl From<crate::db::PoolError> for AppError {
    fn from(error: crate::db::PoolError) -> Self {
        use deadpool::managed::PoolError;
        match error {
            // No connection in time, or none could be opened: MySQL is away or overwhelmed.
            PoolError::Timeout(_) | PoolError::Backend(_) => {
                tracing::warn!(%error, "MySQL is unavailable");
                Self::Unavailable
            }
            other => Self::internal(anyhow::anyhow!("database pool: {other}")),
        }
    }
}

impl ErrorExtensions for AppError {
    fn extend(&self) -> async_graphql::Error {
        if let Self::Internal(error) = self {
            // The whole chain goes to the log (inside the request's span, so with its id); the
            // client only learns that something failed.
            tracing::error!(error = format!("{error:#}"), "internal error");
        }
        async_graphql::Error::new(self.message()).extend_with(|_, ext| {
            ext.set("code", self.code());
            match self {
                Self::BadUserInput { field, .. } => ext.set("field", field.as_ref()),
                Self::RateLimited { retry_after } => ext.set("retryAfter", *retry_after),
                Self::TurnInProgress { active } => ext.set("activeMessageId", active.to_string()),
                Self::LimitExceeded { limit, max, .. } => {
                    ext.set("limit", *limit);
                    ext.set("max", *max);
                }
                Self::QuotaExceeded { resets_at } => ext.set("resetsAt", resets_at.to_rfc3339()),
                Self::Upstream { code, status, .. } => {
                    ext.set("upstreamCode", code.as_str());
                    ext.set("upstreamStatus", *status);
                }
                _ => {}
            }
        })
    }
}

impl From<AppError> for async_graphql::Error {
    fn from(error: AppError) -> Self {
        error.extend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_its_api_code() {
        let cases = [
            (AppError::bad_input("email", "bad"), "BAD_USER_INPUT"),
            (AppError::Unauthenticated(NOT_SIGNED_IN), "UNAUTHENTICATED"),
            (AppError::Forbidden, "FORBIDDEN"),
            (AppError::NotFound("conversation"), "NOT_FOUND"),
            (AppError::Conflict("taken"), "CONFLICT"),
            (AppError::RateLimited { retry_after: 3 }, "RATE_LIMITED"),
            (AppError::DifyNotConfigured, "DIFY_NOT_CONFIGURED"),
            (
                AppError::Upstream {
                    code: "x".into(),
                    message: "y".into(),
                    status: 400,
                },
                "UPSTREAM_ERROR",
            ),
            (
                AppError::UpstreamUnavailable("timeout".into()),
                "UPSTREAM_UNAVAILABLE",
            ),
            (AppError::Unavailable, "SERVICE_UNAVAILABLE"),
            (
                AppError::LimitExceeded {
                    limit: "X",
                    max: 1,
                    message: "m".into(),
                },
                "LIMIT_EXCEEDED",
            ),
            (
                AppError::internal(anyhow::anyhow!("SELECT secret")),
                "INTERNAL_SERVER_ERROR",
            ),
        ];
        for (error, code) in cases {
            let gql = error.extend();
            let ext = gql.extensions.expect("extensions");
            assert_eq!(ext.get("code"), Some(&async_graphql::Value::from(code)));
        }
    }

    #[test]
    fn internal_errors_hide_their_details() {
        let gql = AppError::internal(anyhow::anyhow!("SELECT password_hash")).extend();
        assert_eq!(gql.message, "internal server error");
    }

    #[test]
    fn extensions_carry_field_retry_and_upstream() {
        let ext = AppError::bad_input("email", "bad")
            .extend()
            .extensions
            .unwrap();
        assert_eq!(ext.get("field"), Some(&async_graphql::Value::from("email")));
        let ext = AppError::RateLimited { retry_after: 7 }
            .extend()
            .extensions
            .unwrap();
        assert_eq!(
            ext.get("retryAfter"),
            Some(&async_graphql::Value::from(7u64))
        );
        let ext = AppError::Upstream {
            code: "not_found".into(),
            message: "m".into(),
            status: 404,
        }
        .extend()
        .extensions
        .unwrap();
        assert_eq!(
            ext.get("upstreamCode"),
            Some(&async_graphql::Value::from("not_found"))
        );
        assert_eq!(
            ext.get("upstreamStatus"),
            Some(&async_graphql::Value::from(404u16))
        );
    }
}
