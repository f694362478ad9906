//! What several gateway processes share through Redis, when `REDIS_URL` is set: signals
//! (a stop reaches the gateway relaying the answer at once; admin changes reach every gateway's
//! caches and sockets), limits counted once for all gateways, and each gateway's presence for
//! the concurrent-answer counts. Without `REDIS_URL` every gateway counts and signals on its
//! own, as a single process needs.
//!
//! Redis is never in the way of an answer: every call has a short timeout, and while Redis is
//! away each feature falls back to this process's own view (logged once per outage) and comes
//! back when Redis does.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::gateways::GatewayId;

/// The longest a Redis call may take before this process goes on without it.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long to wait between attempts to (re)connect.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// A change another gateway must hear about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Signal {
    /// `stopChat` for an answer: the gateway relaying it stops it (and tells Dify).
    Stop { message: String },
    /// An account changed (deactivated, demoted, tokens revoked): caches and sockets re-check.
    Account { user: String, active: bool },
    /// An admin changed the apps: caches reload.
    Apps,
    /// A subscriber elsewhere follows this answer: the gateway relaying it mirrors its events
    /// to Redis (see `chat::mirror`).
    Mirror { message: String },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    signal: Signal,
}

#[derive(Clone, Default)]
pub struct Shared(Option<Arc<Inner>>);

struct Inner {
    client: redis::Client,
    connection: RwLock<Option<ConnectionManager>>,
    prefix: String,
    gateway: GatewayId,
    failing: AtomicBool,
}

impl Shared {
    /// Redis at `url`, connected in the background (the process starts without waiting for it).
    pub fn connect(url: &str, prefix: &str, gateway: GatewayId) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let inner = Arc::new(Inner {
            client,
            connection: RwLock::new(None),
            prefix: prefix.to_owned(),
            gateway,
            failing: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CALL_TIMEOUT))
                    .set_response_timeout(Some(CALL_TIMEOUT))
                    .set_number_of_retries(2);
                match ConnectionManager::new_with_config(inner.client.clone(), config).await {
                    Ok(connection) => {
                        *inner.connection.write().unwrap_or_else(|e| e.into_inner()) =
                            Some(connection);
                        inner.recovered();
                        return;
                    }
                    Err(error) => inner.failed(&error),
                }
                drop(inner);
                tokio::time::sleep(RECONNECT_EVERY).await;
            }
        });
        Ok(Self(Some(inner)))
    }

    pub fn is_configured(&self) -> bool {
        self.0.is_some()
    }

    /// A key under this deployment's prefix.
    pub fn key(&self, parts: &[&str]) -> String {
        let prefix = self.0.as_ref().map_or("rechat", |inner| &inner.prefix);
        let mut key = prefix.to_owned();
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    /// Runs `call` on Redis; `None` when Redis is not configured, not connected, failing or
    /// slow (the caller falls back to its own view).
    pub async fn run<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let inner = self.0.as_ref()?;
        let connection = inner
            .connection
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        match tokio::time::timeout(CALL_TIMEOUT, call(connection)).await {
            Ok(Ok(value)) => {
                inner.recovered();
                Some(value)
            }
            Ok(Err(error)) => {
                inner.failed(&error);
                None
            }
            Err(_) => {
                inner.failed(&"no answer within 500 ms");
                None
            }
        }
    }

    /// Whether Redis answers now.
    pub async fn ping(&self) -> bool {
        self.run(|mut connection| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        })
        .await
        .is_some()
    }

    /// Tells every other gateway; false when it could not (no Redis, or Redis away).
    pub async fn publish(&self, signal: Signal) -> bool {
        let Some(inner) = &self.0 else {
            return false;
        };
        let envelope = Envelope {
            from: inner.gateway.to_string(),
            signal,
        };
        let Ok(payload) = serde_json::to_string(&envelope) else {
            return false;
        };
        let channel = self.key(&["signals"]);
        self.run(async move |mut connection| {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&payload)
                .query_async::<i64>(&mut connection)
                .await
        })
        .await
        .is_some()
    }

    /// Calls `on_signal` with every signal another gateway publishes, for as long as this
    /// handle lives, reconnecting after Redis goes away.
    pub fn listen(&self, on_signal: impl Fn(Signal) + Send + Sync + 'static) {
        let Some(inner) = &self.0 else {
            return;
        };
        let weak = Arc::downgrade(inner);
        let channel = self.key(&["signals"]);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let client = inner.client.clone();
                let own = inner.gateway.to_string();
                drop(inner);
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => {
                        if let Err(error) = pubsub.subscribe(&channel).await {
                            tracing::warn!(%error, "subscribing to gateway signals failed");
                        } else {
                            let mut messages = pubsub.on_message();
                            while let Some(message) = messages.next().await {
                                let Ok(payload) = message.get_payload::<String>() else {
                                    continue;
                                };
                                match serde_json::from_str::<Envelope>(&payload) {
                                    Ok(envelope) if envelope.from != own => {
                                        on_signal(envelope.signal);
                                    }
                                    Ok(_) => {}
                                    Err(error) => {
                                        tracing::warn!(%error, "an unreadable gateway signal")
                                    }
                                }
                            }
                            tracing::warn!("the gateway signal subscription ended; reconnecting");
                        }
                    }
                    Err(error) => {
                        if let Some(inner) = weak.upgrade() {
                            inner.failed(&error);
                        }
                    }
                }
                tokio::time::sleep(RECONNECT_EVERY).await;
            }
        });
    }
}

/// Acts on the signals of other gateways for as long as the app lives: a stop for an answer
/// relayed here stops it; an account or app change refreshes what is cached here (and an
/// account's sockets re-check their sessions).
pub fn act_on_signals(app: &crate::App) {
    let weak = app.downgrade();
    app.shared.listen(move |signal| {
        let Some(app) = weak.upgrade() else { return };
        match signal {
            Signal::Stop { message } => {
                let handle = uuid::Uuid::parse_str(&message)
                    .ok()
                    .and_then(|id| app.streams.get(crate::conversations::domain::MessageId(id)));
                if let Some(handle) = handle {
                    handle.stop.notify_one();
                }
            }
            Signal::Account { user, active } => {
                if let Ok(id) = uuid::Uuid::parse_str(&user) {
                    app.account_changed(crate::users::domain::UserId(id), active);
                }
            }
            Signal::Apps => app.app_cache.invalidate(),
            Signal::Mirror { message } => {
                if let Ok(id) = uuid::Uuid::parse_str(&message) {
                    crate::chat::mirror::start(&app, crate::conversations::domain::MessageId(id));
                }
            }
        }
    });
}

impl Inner {
    fn failed(&self, error: &dyn std::fmt::Display) {
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %error,
                "Redis is unavailable: limits, stops and admin changes act on this gateway \
                 only until it is back"
            );
        }
    }

    fn recovered(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis is back: limits, stops and admin changes are shared again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_read_back_as_written() {
        for signal in [
            Signal::Stop {
                message: "m".into(),
            },
            Signal::Account {
                user: "u".into(),
                active: false,
            },
            Signal::Apps,
        ] {
            let envelope = Envelope {
                from: "g".into(),
                signal: signal.clone(),
            };
            let text = serde_json::to_string(&envelope).unwrap();
            let back: Envelope = serde_json::from_str(&text).unwrap();
            assert_eq!((back.from.as_str(), back.signal), ("g", signal), "{text}");
        }
    }
}
