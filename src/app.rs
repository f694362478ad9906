//! `App`: the one cloneable state every request and stream shares.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use rand::RngCore as _;
use secrecy::ExposeSecret;

use crate::auth::password::PasswordHasher;
use crate::auth::token::Keys;
use crate::config::Config;
use crate::db::{self, DbPool};
use crate::dify::{AppMode, DifyClient};
use crate::error::{AppError, AppResult};

#[derive(Clone)]
pub struct App(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub db: DbPool,
    pub keys: Keys,
    pub passwords: PasswordHasher,
    /// Shared by every Dify call (connection reuse); the key is per call.
    pub dify_http: reqwest::Client,
    /// Failed sign-ins per email.
    pub login_throttle: crate::auth::throttle::LoginThrottle,
    /// Answers this process is streaming.
    pub streams: crate::chat::Streams,
}

impl Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The configured Dify app.
#[derive(Clone)]
pub struct Dify {
    pub client: DifyClient,
    pub mode: AppMode,
}

impl App {
    /// Creates the database if needed, migrates it and loads the keys.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        db::ensure_database(&config).await?;
        db::migrate(config.database_url.as_str()).await?;
        let pool = db::pool(config.database_url.as_str(), config.db_pool_size)?;
        let secret = match &config.secret_key {
            Some(secret) => secret.expose_secret().to_owned(),
            None => {
                let mut candidate = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut candidate);
                let candidate = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(candidate);
                let mut conn = pool.get().await.context("connecting to MySQL")?;
                let stored = crate::admin::db::secret_key_or_insert(&mut conn, &candidate)
                    .await
                    .context("reading the stored secret key")?;
                tracing::warn!(
                    "SECRET_KEY is not set: using the key generated and stored in the database; \
                     set SECRET_KEY (32+ bytes) to manage it yourself"
                );
                stored
            }
        };
        let keys = Keys::new(secret.as_bytes(), config.jwt_expire);
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self(Arc::new(Inner {
            keys,
            passwords: PasswordHasher::new(parallelism),
            dify_http: crate::dify::client::http_client(
                Duration::from_secs(10),
                config.dify_read_timeout,
            ),
            db: pool,
            streams: Default::default(),
            login_throttle: Default::default(),
            config,
        })))
    }

    /// The Dify client for the stored key, or `DIFY_NOT_CONFIGURED`.
    pub async fn dify(&self) -> AppResult<Dify> {
        let mut conn = self.db.get().await?;
        let record = crate::admin::db::dify(&mut conn).await?;
        drop(conn);
        let Some(sealed) = record.dify_api_key_encrypted else {
            return Err(AppError::DifyNotConfigured);
        };
        let Some(key) = crate::admin::domain::decrypt(&self.keys.cipher_key, &sealed) else {
            tracing::error!(
                "the stored Dify key cannot be decrypted: SECRET_KEY changed since it was set"
            );
            return Err(AppError::DifyNotConfigured);
        };
        let url = match record.dify_api_url.as_deref().map(url::Url::parse) {
            Some(Ok(url)) => url,
            _ => self.config.dify_api_url.clone(),
        };
        let mode = record
            .dify_app_mode
            .as_deref()
            .and_then(AppMode::parse)
            .unwrap_or(AppMode::Chat);
        Ok(Dify {
            client: DifyClient::new(self.dify_http.clone(), url, key),
            mode,
        })
    }
}
