//! Dify apps: an admin connects several, each with its own key; a conversation belongs to the
//! app it started with. The chat path reads them from an in-process snapshot of the table (keys
//! decrypted, parameters parsed), reloaded every `SNAPSHOT_TTL` and at once after an admin's
//! change on this gateway; another gateway's change is seen within `SNAPSHOT_TTL`. Each app's
//! `/parameters` is read again from Dify when older than `PARAMETERS_TTL`.

pub mod db;
pub mod graphql;
pub mod parameters;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::app::App;
use crate::db::types::uuid_id;
use crate::dify::{AppMode, DifyClient};
use crate::error::{AppError, AppResult};
use db::AppRecord;
use parameters::AppParameters;

uuid_id!(
    /// A connected Dify app's id.
    AppId,
    "app"
);

/// How long a snapshot of the apps is trusted before it is read again.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(5);
/// How old an app's `/parameters` may get before it is read from Dify again.
pub const PARAMETERS_TTL: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// A Dify app as the chat path uses it.
#[derive(Clone)]
pub struct Dify {
    pub id: AppId,
    pub client: DifyClient,
    pub mode: AppMode,
}

/// One live app: its row, its client (`None` when its key cannot be decrypted: `SECRET_KEY`
/// changed), and its parsed parameters.
pub struct LoadedApp {
    pub record: AppRecord,
    pub dify: Option<Dify>,
    pub parameters: Option<AppParameters>,
}

impl LoadedApp {
    /// What the app takes as attachments (nothing while its parameters are unknown).
    pub fn file_upload(&self) -> parameters::FileUploadSettings {
        self.parameters
            .as_ref()
            .map(|p| p.file_upload.clone())
            .unwrap_or_default()
    }

    /// Usable for a new turn: enabled, with a readable key.
    fn usable(&self) -> AppResult<&Dify> {
        match &self.dify {
            Some(dify) if self.record.is_enabled => Ok(dify),
            _ => Err(AppError::AppUnavailable),
        }
    }
}

/// Every live app, oldest first.
pub struct Apps {
    pub all: Vec<LoadedApp>,
}

impl Apps {
    pub fn get(&self, id: AppId) -> Option<&LoadedApp> {
        self.all.iter().find(|app| app.record.id == id)
    }

    pub fn default_app(&self) -> Option<&LoadedApp> {
        self.all.iter().find(|app| app.record.is_default)
    }

    /// The app of a turn. A new conversation takes `requested` or the default app; a
    /// conversation keeps its app (`None` for one from before any app: the default), and asking
    /// for another is `BAD_USER_INPUT`. A disabled or deleted app is `APP_UNAVAILABLE`.
    pub fn for_turn(
        &self,
        conversation: Option<Option<AppId>>,
        requested: Option<AppId>,
    ) -> AppResult<(&LoadedApp, &Dify)> {
        let own = match conversation {
            Some(Some(own)) => Some(own),
            // From before apps: it belongs to the default app.
            Some(None) => Some(
                self.default_app()
                    .ok_or(AppError::DifyNotConfigured)?
                    .record
                    .id,
            ),
            None => None,
        };
        let chosen = match (own, requested) {
            (Some(own), Some(requested)) if requested != own => {
                return Err(AppError::bad_input(
                    "appId",
                    "a conversation keeps the app it started with; omit appId or start a new conversation",
                ));
            }
            (Some(id), _) | (None, Some(id)) => self.get(id).ok_or(AppError::AppUnavailable)?,
            (None, None) => self.default_app().ok_or(AppError::DifyNotConfigured)?,
        };
        Ok((chosen, chosen.usable()?))
    }
}

#[derive(Default)]
pub struct AppCache {
    current: Mutex<Option<(Arc<Apps>, Instant)>>,
    /// Bumped by every invalidation, so a load that raced with one is not kept.
    generation: AtomicU64,
    /// One load at a time; the others wait for it and use its result.
    loading: tokio::sync::Mutex<()>,
    /// A `/parameters` refresh is running.
    refreshing: AtomicBool,
}

impl AppCache {
    fn fresh(&self) -> Option<Arc<Apps>> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|(_, at)| at.elapsed() < SNAPSHOT_TTL)
            .map(|(apps, _)| apps.clone())
    }

    /// Forgets the snapshot (an admin changed an app).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl App {
    /// An admin changed the apps: this gateway's cache reloads now, and so does every other
    /// gateway's when they share Redis (else within the cache's 5 s).
    pub async fn apps_changed(&self) {
        self.app_cache.invalidate();
        self.shared.publish(crate::shared::Signal::Apps).await;
    }

    /// The live apps (cached; see the module).
    pub async fn apps(&self) -> AppResult<Arc<Apps>> {
        let cache = &self.app_cache;
        if let Some(apps) = cache.fresh() {
            return Ok(apps);
        }
        let _loading = cache.loading.lock().await;
        if let Some(apps) = cache.fresh() {
            return Ok(apps);
        }
        let generation = cache.generation.load(Ordering::SeqCst);
        let records = {
            let mut conn = self.db.get().await?;
            db::live(&mut conn).await?
        };
        let apps = Arc::new(Apps {
            all: records
                .into_iter()
                .map(|record| self.load(record))
                .collect(),
        });
        if generation == cache.generation.load(Ordering::SeqCst) {
            *cache.current.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((apps.clone(), Instant::now()));
        }
        self.refresh_stale_parameters(&apps);
        Ok(apps)
    }

    /// The Dify client of a conversation's app (`None`: the default app) for calls about what
    /// already exists (stop, feedback, rename, delete): a disabled app still answers them; a
    /// deleted one, or none at all, is `None`.
    pub async fn dify_of(&self, app: Option<AppId>) -> AppResult<Option<Dify>> {
        let apps = self.apps().await?;
        let loaded = match app {
            Some(id) => apps.get(id),
            None => apps.default_app(),
        };
        Ok(loaded.and_then(|app| app.dify.clone()))
    }

    fn load(&self, record: AppRecord) -> LoadedApp {
        let dify = record.api_key_encrypted.as_deref().and_then(|sealed| {
            let Some(key) = crate::admin::domain::decrypt(&self.keys.cipher_key, sealed) else {
                tracing::error!(app.id = %record.id, "a Dify app's key cannot be decrypted: SECRET_KEY changed since it was set");
                return None;
            };
            let url = match record.api_url.as_deref().map(url::Url::parse) {
                Some(Ok(url)) => url,
                _ => self.config.dify_api_url.clone(),
            };
            Some(Dify {
                id: record.id,
                client: DifyClient::new(self.dify_http.clone(), url, key),
                mode: AppMode::parse(&record.mode).unwrap_or(AppMode::Chat),
            })
        });
        let parameters = record
            .parameters
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok())
            .map(|raw| AppParameters::parse(raw, self.config.upload_max_bytes));
        LoadedApp {
            record,
            dify,
            parameters,
        }
    }

    /// Reads `/parameters` again, in the background, for the apps whose copy is missing or
    /// older than `PARAMETERS_TTL` (one refresh at a time).
    fn refresh_stale_parameters(&self, apps: &Apps) {
        let cutoff = crate::db::types::now() - PARAMETERS_TTL;
        let stale: Vec<Dify> = apps
            .all
            .iter()
            .filter(|app| app.record.parameters_at.is_none_or(|at| at < cutoff))
            .filter_map(|app| app.dify.clone())
            .collect();
        if stale.is_empty() || self.app_cache.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            for dify in stale {
                if let Err(error) = app.store_parameters(&dify).await {
                    tracing::warn!(app.id = %dify.id, error = error.message(), "refreshing an app's parameters failed");
                }
            }
            app.app_cache.refreshing.store(false, Ordering::SeqCst);
            app.app_cache.invalidate();
        });
    }

    /// Reads an app's `/parameters` from Dify and stores it; returns what Dify answered.
    pub async fn store_parameters(&self, dify: &Dify) -> AppResult<serde_json::Value> {
        let raw = dify.client.parameters().await?;
        let mut conn = self.db.get().await?;
        db::set_parameters(&mut conn, dify.id, &raw.to_string()).await?;
        Ok(raw)
    }
}
