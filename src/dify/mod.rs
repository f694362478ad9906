//! The Dify Service API: a typed client, the SSE frame parser and the typed stream events.

pub mod client;
pub mod error;
pub mod events;
pub mod sse;

pub use client::{AppMode, DifyClient};
pub use error::DifyError;

/// Dify's base URL always ends in `/v1` here; users may configure it with or without.
pub fn normalize_base_url(mut url: url::Url) -> url::Url {
    let path = url.path().trim_end_matches('/').to_owned();
    let path = if path.ends_with("/v1") {
        path
    } else {
        format!("{path}/v1")
    };
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    url
}
