//! The configured Dify app as the chat path uses it: read from the settings row, the key
//! decrypted, and cached in process so that starting a chat costs no settings query. An admin's
//! change on this gateway invalidates the cache at once; changes made through another gateway
//! on the same database are seen within `CACHE_TTL`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::app::App;
use crate::dify::{AppMode, DifyClient};
use crate::error::{AppError, AppResult};

/// How long a loaded configuration is trusted before it is read again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// The configured Dify app.
#[derive(Clone)]
pub struct Dify {
    pub client: DifyClient,
    pub mode: AppMode,
}

/// `None` inside means "no key is configured", which is cached too.
#[derive(Default)]
pub struct DifyCache {
    current: Mutex<Option<(Option<Dify>, Instant)>>,
    /// Bumped by every invalidation, so a load that raced with one is not kept.
    generation: AtomicU64,
    /// One load at a time; the others wait for it and use its result.
    loading: tokio::sync::Mutex<()>,
}

impl DifyCache {
    fn fresh(&self) -> Option<Option<Dify>> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(dify, _)| dify.clone())
    }

    /// Forgets the cached configuration (an admin changed it).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The Dify client for the stored key, or `DIFY_NOT_CONFIGURED`.
    pub async fn get(&self, app: &App) -> AppResult<Dify> {
        let found = match self.fresh() {
            Some(found) => found,
            None => {
                let _loading = self.loading.lock().await;
                match self.fresh() {
                    Some(found) => found,
                    None => {
                        let generation = self.generation.load(Ordering::SeqCst);
                        let loaded = load(app).await?;
                        if generation == self.generation.load(Ordering::SeqCst) {
                            *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some((loaded.clone(), Instant::now()));
                        }
                        loaded
                    }
                }
            }
        };
        found.ok_or(AppError::DifyNotConfigured)
    }
}

async fn load(app: &App) -> AppResult<Option<Dify>> {
    let mut conn = app.db.get().await?;
    let record = super::db::dify(&mut conn).await?;
    drop(conn);
    let Some(sealed) = record.dify_api_key_encrypted else {
        return Ok(None);
    };
    let Some(key) = super::domain::decrypt(&app.keys.cipher_key, &sealed) else {
        tracing::error!(
            "the stored Dify key cannot be decrypted: SECRET_KEY changed since it was set"
        );
        return Ok(None);
    };
    let url = match record.dify_api_url.as_deref().map(url::Url::parse) {
        Some(Ok(url)) => url,
        _ => app.config.dify_api_url.clone(),
    };
    let mode = record
        .dify_app_mode
        .as_deref()
        .and_then(AppMode::parse)
        .unwrap_or(AppMode::Chat);
    Ok(Some(Dify {
        client: DifyClient::new(app.dify_http.clone(), url, key),
        mode,
    }))
}
