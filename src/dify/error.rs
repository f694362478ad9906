//! Dify failures: its JSON error envelope, or no usable answer at all.

use crate::error::AppError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DifyError {
    /// Dify answered with an error: the `{code, message, status}` envelope (or the HTTP status
    /// alone when the body was not Dify's envelope, e.g. from a proxy).
    #[error("Dify error {status} {code}: {message}")]
    Api {
        code: String,
        message: String,
        status: u16,
    },
    /// Dify could not be reached, timed out, or cut the connection.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(serde::Deserialize)]
struct Envelope {
    code: Option<String>,
    message: Option<String>,
    status: Option<u16>,
}

impl DifyError {
    /// Decodes Dify's error envelope from a non-2xx answer.
    pub fn from_response(status: u16, body: &[u8]) -> Self {
        let envelope = serde_json::from_slice::<Envelope>(body).ok();
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error");
        match envelope {
            Some(Envelope {
                code,
                message,
                status: body_status,
            }) => Self::Api {
                code: code.unwrap_or_else(|| format!("http_{status}")),
                message: message
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| reason.to_owned()),
                status: body_status.unwrap_or(status),
            },
            None => Self::Api {
                code: format!("http_{status}"),
                message: reason.to_owned(),
                status,
            },
        }
    }

    /// A network error, without the URL's query or anything secret in it.
    pub fn network(error: &reqwest::Error) -> Self {
        let what = if error.is_timeout() {
            "timed out"
        } else if error.is_connect() {
            "connection failed"
        } else if error.is_body() || error.is_decode() {
            "connection cut while reading the answer"
        } else {
            "request failed"
        };
        Self::Unavailable(format!("Dify {what}"))
    }

    /// The code used in `ChatError.code`.
    pub fn code(&self) -> &str {
        match self {
            Self::Api { code, .. } => code,
            Self::Unavailable(_) => "upstream_unavailable",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Unavailable(_) => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::Api { message, .. } => message.clone(),
            Self::Unavailable(message) => message.clone(),
        }
    }
}

impl From<DifyError> for AppError {
    fn from(error: DifyError) -> Self {
        match error {
            DifyError::Api {
                code,
                message,
                status,
            } => AppError::Upstream {
                code,
                message,
                status,
            },
            DifyError::Unavailable(message) => AppError::UpstreamUnavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_envelope_and_tolerates_other_bodies() {
        let e = DifyError::from_response(
            404,
            br#"{"code":"not_found","message":"Conversation Not Exists.","status":404}"#,
        );
        assert_eq!(e.code(), "not_found");
        assert_eq!(e.status(), Some(404));
        assert_eq!(e.message(), "Conversation Not Exists.");

        let e = DifyError::from_response(502, b"<html>Bad gateway</html>");
        assert_eq!(e.code(), "http_502");
        assert_eq!(e.message(), "Bad Gateway");

        let e = DifyError::from_response(
            413,
            br#"{"code":"file_too_large","message":"","status":413}"#,
        );
        assert_eq!(e.message(), "Payload Too Large");
    }
}
