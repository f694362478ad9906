//! Admin: the part-1 Dify configuration (`difyConfig`, `setDifyConfig`, `deleteDifyConfig`),
//! deprecated: each acts on the default app (see `apps`).

use async_graphql::{Context, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};

use crate::app::App;
use crate::apps::Apps;
use crate::apps::graphql::{self as apps_graphql, CreateDifyAppInput, UpdateDifyAppInput};
use crate::db::types::utc;
use crate::error::AppResult;
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
    fn of_default(app: &App, apps: &Apps) -> Self {
        let Some(default) = apps.default_app() else {
            return Self {
                is_configured: false,
                api_key_preview: None,
                api_url: app.config.dify_api_url.to_string(),
                app_mode: None,
                app_name: None,
                updated_at: None,
            };
        };
        let record = &default.record;
        Self {
            is_configured: record.api_key_encrypted.is_some(),
            api_key_preview: record.api_key_preview.clone(),
            api_url: record
                .api_url
                .clone()
                .unwrap_or_else(|| app.config.dify_api_url.to_string()),
            app_mode: Some(record.mode.clone()),
            app_name: Some(record.name.clone()),
            updated_at: Some(utc(record.updated_at)),
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

async fn current(app: &App) -> AppResult<DifyConfig> {
    app.apps_changed().await;
    let apps = app.apps().await?;
    Ok(DifyConfig::of_default(app, &apps))
}

#[derive(Default)]
pub struct AdminQuery;

#[Object]
impl AdminQuery {
    /// The default app's configuration. Admin only.
    #[graphql(deprecation = "Several apps: use apps and app(id); this shows the default app")]
    async fn dify_config(&self, ctx: &Context<'_>) -> AppResult<DifyConfig> {
        ctx.admin()?;
        let app = ctx.app();
        Ok(DifyConfig::of_default(app, &*app.apps().await?))
    }
}

#[derive(Default)]
pub struct AdminMutation;

#[Object]
impl AdminMutation {
    /// Sets the default app's API key (and optionally the base URL), creating the default app
    /// when there is none. Admin only. The key is first checked against Dify; nothing is stored
    /// unless Dify accepts it.
    #[graphql(
        deprecation = "Several apps: use createDifyApp or updateDifyApp; this acts on the default app"
    )]
    async fn set_dify_config(
        &self,
        ctx: &Context<'_>,
        input: DifyConfigInput,
    ) -> AppResult<DifyConfig> {
        ctx.admin()?;
        let app = ctx.app();
        let default = app.apps().await?.default_app().map(|a| a.record.id);
        match default {
            Some(id) => {
                let change = UpdateDifyAppInput {
                    api_key: Some(input.api_key),
                    api_url: Some(input.api_url.unwrap_or_default()),
                    name: None,
                    is_enabled: None,
                    is_default: None,
                };
                apps_graphql::update(app, id, change).await?;
            }
            None => {
                let create = CreateDifyAppInput {
                    api_key: input.api_key,
                    api_url: input.api_url,
                    name: None,
                    is_default: Some(true),
                };
                apps_graphql::create(app, create).await?;
            }
        }
        current(app).await
    }

    /// Deletes the default app; chat needs another app (or a new key) then. Admin only.
    #[graphql(deprecation = "Several apps: use deleteDifyApp; this deletes the default app")]
    async fn delete_dify_config(&self, ctx: &Context<'_>) -> AppResult<DifyConfig> {
        ctx.admin()?;
        let app = ctx.app();
        if let Some(id) = app.apps().await?.default_app().map(|a| a.record.id) {
            apps_graphql::delete(app, id).await?;
        }
        current(app).await
    }
}
