//! Admin: the Dify configuration (`difyConfig`, `setDifyConfig`, `deleteDifyConfig`).

use async_graphql::{Context, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use secrecy::SecretString;

use crate::admin::db::{self, DifySettingsChange, DifySettingsRecord};
use crate::admin::domain::{encrypt, preview};
use crate::db::types::{now, utc};
use crate::dify::{AppMode, DifyClient};
use crate::error::{AppError, AppResult};
use crate::graphql::context::ContextExt;

/// The Dify app rechat talks to. The API key itself is never returned.
#[derive(SimpleObject)]
pub struct DifyConfig {
    /// Whether an API key is set.
    pub is_configured: bool,
    /// The key's first 4 and last 4 characters, e.g. `app-...wxyz`.
    pub api_key_preview: Option<String>,
    /// The Dify Service API base URL, e.g. `https://api.dify.ai/v1`.
    pub api_url: String,
    /// The app's mode from Dify's `/info`: chat, agent-chat, advanced-chat, workflow or completion.
    pub app_mode: Option<String>,
    /// The app's name from Dify's `/info`.
    pub app_name: Option<String>,
    /// When the configuration last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl DifyConfig {
    fn from_record(record: DifySettingsRecord, default_url: &url::Url) -> Self {
        Self {
            is_configured: record.dify_api_key_encrypted.is_some(),
            api_key_preview: record.dify_api_key_preview,
            api_url: record
                .dify_api_url
                .unwrap_or_else(|| default_url.to_string()),
            app_mode: record.dify_app_mode,
            app_name: record.dify_app_name,
            updated_at: record.dify_updated_at.map(utc),
        }
    }
}

/// A Dify app API key to use, checked against Dify before it is stored.
#[derive(InputObject)]
pub struct DifyConfigInput {
    /// The app's API key (`app-…`).
    pub api_key: String,
    /// The Dify Service API base URL, with or without `/v1`; default `DIFY_API_URL`.
    pub api_url: Option<String>,
}

async fn current(ctx: &Context<'_>) -> AppResult<DifyConfig> {
    let app = ctx.app();
    let mut conn = app.db.get().await?;
    let record = db::dify(&mut conn).await?;
    Ok(DifyConfig::from_record(record, &app.config.dify_api_url))
}

#[derive(Default)]
pub struct AdminQuery;

#[Object]
impl AdminQuery {
    /// The Dify configuration. Admin only.
    async fn dify_config(&self, ctx: &Context<'_>) -> AppResult<DifyConfig> {
        ctx.admin()?;
        current(ctx).await
    }
}

#[derive(Default)]
pub struct AdminMutation;

#[Object]
impl AdminMutation {
    /// Sets the Dify API key (and optionally the base URL). Admin only. The key is first checked
    /// against Dify's `/info`; nothing is stored unless Dify accepts it.
    async fn set_dify_config(
        &self,
        ctx: &Context<'_>,
        input: DifyConfigInput,
    ) -> AppResult<DifyConfig> {
        let admin = ctx.admin()?;
        let app = ctx.app();
        let key = input.api_key.trim().to_owned();
        if key.is_empty()
            || key.len() > 512
            || key.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(AppError::bad_input(
                "apiKey",
                "enter the Dify app's API key, like app-…",
            ));
        }
        let url = match input
            .api_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            Some(url) => crate::config::parse_http_url("apiUrl", url)
                .map_err(|e| AppError::bad_input("apiUrl", e.expected))?,
            None => app.config.dify_api_url.clone(),
        };
        let key = SecretString::from(key);
        let client = DifyClient::new(app.dify_http.clone(), url.clone(), key.clone());
        let info = client.info().await?;
        if AppMode::parse(&info.mode).is_none() {
            return Err(AppError::bad_input(
                "apiKey",
                format!("the Dify app's mode {:?} is not supported", info.mode),
            ));
        }
        let sealed = encrypt(&app.keys.cipher_key, &key);
        let key_preview = preview(secrecy::ExposeSecret::expose_secret(&key));
        let mut conn = app.db.get().await?;
        db::set_dify(
            &mut conn,
            &DifySettingsChange {
                dify_api_key_encrypted: Some(&sealed),
                dify_api_key_preview: Some(&key_preview),
                dify_api_url: Some(url.as_str()),
                dify_app_mode: Some(&info.mode),
                dify_app_name: info.name.as_deref(),
                dify_updated_at: Some(now()),
            },
        )
        .await?;
        app.dify_cache.invalidate();
        tracing::info!(user.id = %admin.id, dify.app_mode = info.mode, dify.url = %url, "Dify configuration set");
        current(ctx).await
    }

    /// Removes the Dify API key; chat is unavailable until a new one is set. Admin only.
    async fn delete_dify_config(&self, ctx: &Context<'_>) -> AppResult<DifyConfig> {
        let admin = ctx.admin()?;
        let mut conn = ctx.app().db.get().await?;
        db::set_dify(
            &mut conn,
            &DifySettingsChange {
                dify_api_key_encrypted: None,
                dify_api_key_preview: None,
                dify_api_url: None,
                dify_app_mode: None,
                dify_app_name: None,
                dify_updated_at: Some(now()),
            },
        )
        .await?;
        ctx.app().dify_cache.invalidate();
        tracing::info!(user.id = %admin.id, "Dify configuration deleted");
        current(ctx).await
    }
}
