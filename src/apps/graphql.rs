//! `DifyApp`, `apps`, `app`, and the admin's `createDifyApp`, `updateDifyApp`, `deleteDifyApp`,
//! `refreshDifyApp`.

use async_graphql::{ComplexObject, Context, ID, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;
use secrecy::{ExposeSecret, SecretString};

use super::db::{self, AppRecord};
use super::parameters::AppParameters;
use super::{AppId, LoadedApp};
use crate::admin::domain::{encrypt, preview};
use crate::app::App;
use crate::db::types::{now, utc};
use crate::dify::{AppMode, DifyClient};
use crate::error::{AppError, AppResult};
use crate::graphql::context::ContextExt;

/// A Dify app people can chat with.
#[derive(SimpleObject, Clone)]
#[graphql(complex)]
pub struct DifyApp {
    /// The app's id in rechat (pass it as `ChatInput.appId`).
    pub id: ID,
    /// Dify's app name from `/info`, unless an admin renamed it.
    pub name: String,
    /// Dify's description of the app.
    pub description: Option<String>,
    /// chat, agent-chat, advanced-chat, agent, workflow or completion.
    pub mode: String,
    /// Used when `ChatInput.appId` is omitted.
    pub is_default: bool,
    /// Disabled apps are listed to admins only; they take no new turns.
    pub is_enabled: bool,
    /// When it was connected.
    pub created_at: DateTime<Utc>,
    /// When an admin last changed it (or its parameters were read again).
    pub updated_at: DateTime<Utc>,
    #[graphql(skip)]
    pub record: AppRecord,
    #[graphql(skip)]
    pub parameters_cached: Option<AppParameters>,
}

impl From<&LoadedApp> for DifyApp {
    fn from(app: &LoadedApp) -> Self {
        let record = &app.record;
        Self {
            id: record.id.into(),
            name: record.name.clone(),
            description: record.description.clone(),
            mode: record.mode.clone(),
            is_default: record.is_default,
            is_enabled: record.is_enabled,
            created_at: utc(record.created_at),
            updated_at: utc(record.updated_at),
            record: record.clone(),
            parameters_cached: app.parameters.clone(),
        }
    }
}

#[ComplexObject]
impl DifyApp {
    /// From Dify's `/parameters`, cached (read again every 10 minutes and by `refreshDifyApp`).
    async fn parameters(&self, ctx: &Context<'_>) -> AppResult<AppParameters> {
        if let Some(parameters) = &self.parameters_cached {
            return Ok(parameters.clone());
        }
        // Never read yet (an app from before parameters were kept): read it now.
        let app = ctx.app();
        let loaded = app.apps().await?;
        let dify = loaded
            .get(self.record.id)
            .and_then(|a| a.dify.clone())
            .ok_or(AppError::AppUnavailable)?;
        let raw = app.store_parameters(&dify).await?;
        app.apps_changed().await;
        Ok(AppParameters::parse(raw, app.config.upload_max_bytes))
    }

    /// The key's first and last 4 characters. Admins only; null for others.
    async fn api_key_preview(&self, ctx: &Context<'_>) -> Option<String> {
        ctx.admin().ok()?;
        self.record.api_key_preview.clone()
    }

    /// The Dify Service API base URL. Admins only; null for others.
    async fn api_url(&self, ctx: &Context<'_>) -> Option<String> {
        ctx.admin().ok()?;
        Some(
            self.record
                .api_url
                .clone()
                .unwrap_or_else(|| ctx.app().config.dify_api_url.to_string()),
        )
    }
}

/// A Dify app to connect.
#[derive(InputObject)]
pub struct CreateDifyAppInput {
    /// The app's API key (`app-…`); checked against Dify's `/info` and `/parameters` first.
    pub api_key: String,
    /// The Dify Service API base URL, with or without `/v1`; default `DIFY_API_URL`.
    pub api_url: Option<String>,
    /// A name to show instead of Dify's.
    pub name: Option<String>,
    /// Make it the default app (the first app always is).
    pub is_default: Option<bool>,
}

/// Changes to a Dify app; omitted fields stay.
#[derive(InputObject)]
pub struct UpdateDifyAppInput {
    /// A new key, checked against Dify first.
    pub api_key: Option<String>,
    /// A new base URL (checked with the key); empty for `DIFY_API_URL`.
    pub api_url: Option<String>,
    /// A name to show instead of Dify's; empty to show Dify's again.
    pub name: Option<String>,
    /// `false` takes the app out of `apps` for users and refuses new turns (`APP_UNAVAILABLE`);
    /// its conversations stay readable.
    pub is_enabled: Option<bool>,
    /// `true` makes it the default app (the previous default stops being it).
    pub is_default: Option<bool>,
}

#[derive(Default)]
pub struct AppQuery;

#[Object]
impl AppQuery {
    /// The apps you can chat with, oldest first; admins also see disabled ones.
    async fn apps(&self, ctx: &Context<'_>) -> AppResult<Vec<DifyApp>> {
        let user = ctx.user()?;
        let apps = ctx.app().apps().await?;
        Ok(apps
            .all
            .iter()
            .filter(|app| user.is_admin || app.record.is_enabled)
            .map(DifyApp::from)
            .collect())
    }

    /// One app; null when it does not exist (or is disabled, for non-admins).
    async fn app(&self, ctx: &Context<'_>, id: ID) -> AppResult<Option<DifyApp>> {
        let user = ctx.user()?;
        let id = AppId::parse("id", &id)?;
        let apps = ctx.app().apps().await?;
        Ok(apps
            .get(id)
            .filter(|app| user.is_admin || app.record.is_enabled)
            .map(DifyApp::from))
    }
}

fn clean_key(key: &str) -> AppResult<SecretString> {
    let key = key.trim();
    if key.is_empty() || key.len() > 512 || key.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(AppError::bad_input(
            "apiKey",
            "enter the Dify app's API key, like app-…",
        ));
    }
    Ok(SecretString::from(key.to_owned()))
}

fn clean_url(app: &App, url: Option<&str>) -> AppResult<Option<url::Url>> {
    url.map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            crate::config::parse_http_url("apiUrl", url)
                .map_err(|e| AppError::bad_input("apiUrl", e.expected))
        })
        .transpose()
        .map(|url| url.filter(|u| *u != app.config.dify_api_url))
}

fn clean_name(name: Option<&str>) -> AppResult<Option<String>> {
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    if name.is_some_and(|n| n.chars().count() > 255) {
        return Err(AppError::bad_input(
            "name",
            "the name must have at most 255 characters",
        ));
    }
    Ok(name.map(str::to_owned))
}

/// What Dify says about a key: its `/info` and `/parameters`, or why it refuses it.
struct Checked {
    mode: String,
    name: Option<String>,
    description: Option<String>,
    parameters: String,
}

async fn check_key(app: &App, key: &SecretString, url: Option<&url::Url>) -> AppResult<Checked> {
    let url = url.unwrap_or(&app.config.dify_api_url).clone();
    read_dify(&DifyClient::new(app.dify_http.clone(), url, key.clone())).await
}

/// An app's `/info` and `/parameters`, as Dify answers them now.
async fn read_dify(client: &DifyClient) -> AppResult<Checked> {
    let info = client.info().await?;
    if AppMode::parse(&info.mode).is_none() {
        return Err(AppError::bad_input(
            "apiKey",
            format!("the Dify app's mode {:?} is not supported", info.mode),
        ));
    }
    let parameters = client.parameters().await?;
    Ok(Checked {
        mode: info.mode,
        name: info.name,
        description: info.description,
        parameters: parameters.to_string(),
    })
}

impl Checked {
    /// Puts what Dify said into the app's row (its name only unless an admin renamed it).
    fn apply_to(self, record: &mut AppRecord) {
        record.mode = self.mode;
        record.description = self.description;
        if !record.name_is_custom
            && let Some(name) = self.name
        {
            record.name = name;
        }
        record.parameters = Some(self.parameters);
        record.parameters_at = Some(now());
    }
}

/// The app as it is now, after a change.
async fn reloaded(app: &App, id: AppId) -> AppResult<DifyApp> {
    app.apps_changed().await;
    let apps = app.apps().await?;
    apps.get(id)
        .map(DifyApp::from)
        .ok_or(AppError::NotFound("app"))
}

/// Connects a Dify app. Shared by `createDifyApp` and the deprecated `setDifyConfig`.
pub async fn create(app: &App, input: CreateDifyAppInput) -> AppResult<DifyApp> {
    let key = clean_key(&input.api_key)?;
    let url = clean_url(app, input.api_url.as_deref())?;
    let custom_name = clean_name(input.name.as_deref())?;
    let checked = check_key(app, &key, url.as_ref()).await?;
    let at = now();
    let record = AppRecord {
        id: AppId::new(),
        name: custom_name
            .clone()
            .or(checked.name)
            .unwrap_or_else(|| "Dify app".into()),
        name_is_custom: custom_name.is_some(),
        description: checked.description,
        mode: checked.mode,
        api_url: url.map(|u| u.to_string()),
        api_key_encrypted: Some(encrypt(&app.keys.cipher_key, &key)),
        api_key_preview: Some(preview(key.expose_secret())),
        is_default: false,
        is_enabled: true,
        parameters: Some(checked.parameters),
        parameters_at: Some(at),
        deleted_at: None,
        created_at: at,
        updated_at: at,
    };
    let mut conn = app.db.get().await?;
    conn.transaction::<_, AppError, _>(async |conn| {
        crate::admin::db::lock_settings(conn).await?;
        let first = db::live(conn).await?.iter().all(|a| !a.is_default);
        db::insert(conn, &record).await?;
        if first || input.is_default == Some(true) {
            db::make_default(conn, record.id).await?;
        }
        Ok(())
    })
    .await?;
    tracing::info!(app.id = %record.id, dify.app_mode = record.mode, "Dify app connected");
    reloaded(app, record.id).await
}

/// Changes a live app. Shared by `updateDifyApp` and the deprecated `setDifyConfig`.
pub async fn update(app: &App, id: AppId, input: UpdateDifyAppInput) -> AppResult<DifyApp> {
    let key = input.api_key.as_deref().map(clean_key).transpose()?;
    let url = match input.api_url.as_deref() {
        Some(url) => Some(clean_url(app, Some(url))?),
        None => None,
    };
    let name = input
        .name
        .as_deref()
        .map(|n| clean_name(Some(n)))
        .transpose()?;
    let mut conn = app.db.get().await?;
    let mut record = db::find_live(&mut conn, id)
        .await?
        .ok_or(AppError::NotFound("app"))?;
    drop(conn);
    if let Some(url) = &url {
        record.api_url = url.as_ref().map(|u| u.to_string());
    }
    if key.is_some() || url.is_some() {
        // A new key or address is checked against Dify before it is stored.
        let key = match &key {
            Some(key) => key.clone(),
            None => record
                .api_key_encrypted
                .as_deref()
                .and_then(|sealed| crate::admin::domain::decrypt(&app.keys.cipher_key, sealed))
                .ok_or_else(|| {
                    AppError::bad_input("apiKey", "set the key again: it cannot be read")
                })?,
        };
        let url = record
            .api_url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok());
        check_key(app, &key, url.as_ref())
            .await?
            .apply_to(&mut record);
        record.api_key_encrypted = Some(encrypt(&app.keys.cipher_key, &key));
        record.api_key_preview = Some(preview(key.expose_secret()));
    }
    match name {
        Some(Some(name)) => {
            record.name = name;
            record.name_is_custom = true;
        }
        // Empty: Dify's name again, read on the next refresh.
        Some(None) => record.name_is_custom = false,
        None => {}
    }
    if let Some(enabled) = input.is_enabled {
        record.is_enabled = enabled;
    }
    let mut conn = app.db.get().await?;
    conn.transaction::<_, AppError, _>(async |conn| {
        db::save(conn, &record).await?;
        if input.is_default == Some(true) {
            db::make_default(conn, record.id).await?;
        }
        Ok(())
    })
    .await?;
    tracing::info!(app.id = %id, "Dify app changed");
    reloaded(app, id).await
}

/// Deletes an app: its key is erased, its conversations stay readable (`app: null`) and take no
/// new turns. A deleted default app hands the role to the oldest remaining app.
pub async fn delete(app: &App, id: AppId) -> AppResult<()> {
    let mut conn = app.db.get().await?;
    conn.transaction::<_, AppError, _>(async |conn| {
        crate::admin::db::lock_settings(conn).await?;
        let mut record = db::find_live(conn, id)
            .await?
            .ok_or(AppError::NotFound("app"))?;
        record.api_key_encrypted = None;
        record.api_key_preview = None;
        record.parameters = None;
        record.deleted_at = Some(now());
        let was_default = std::mem::replace(&mut record.is_default, false);
        db::save(conn, &record).await?;
        if was_default && let Some(next) = db::live(conn).await?.first() {
            db::make_default(conn, next.id).await?;
        }
        Ok(())
    })
    .await?;
    app.apps_changed().await;
    tracing::info!(app.id = %id, "Dify app deleted");
    Ok(())
}

#[derive(Default)]
pub struct AppMutation;

#[Object]
impl AppMutation {
    /// Connects a Dify app. Admin only. The key is checked with Dify's `/info` and
    /// `/parameters` first; nothing is stored unless Dify accepts it. The first app is the
    /// default; a new enabled app is listed in `apps` for everyone at once.
    async fn create_dify_app(
        &self,
        ctx: &Context<'_>,
        input: CreateDifyAppInput,
    ) -> AppResult<DifyApp> {
        ctx.admin()?;
        create(ctx.app(), input).await
    }

    /// Changes an app. Admin only. A new key or URL is checked against Dify first.
    async fn update_dify_app(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: UpdateDifyAppInput,
    ) -> AppResult<DifyApp> {
        ctx.admin()?;
        update(ctx.app(), AppId::parse("id", &id)?, input).await
    }

    /// Deletes an app. Admin only. Its conversations stay readable (`app: null`) and take no new
    /// turns (`APP_UNAVAILABLE`).
    async fn delete_dify_app(&self, ctx: &Context<'_>, id: ID) -> AppResult<ID> {
        ctx.admin()?;
        let app_id = AppId::parse("id", &id)?;
        delete(ctx.app(), app_id).await?;
        Ok(id)
    }

    /// Reads the app's `/info` and `/parameters` from Dify again. Admin only.
    async fn refresh_dify_app(&self, ctx: &Context<'_>, id: ID) -> AppResult<DifyApp> {
        ctx.admin()?;
        let app = ctx.app();
        let id = AppId::parse("id", &id)?;
        let apps = app.apps().await?;
        let dify = apps
            .get(id)
            .ok_or(AppError::NotFound("app"))?
            .dify
            .clone()
            .ok_or(AppError::AppUnavailable)?;
        let checked = read_dify(&dify.client).await?;
        let mut conn = app.db.get().await?;
        let mut record = db::find_live(&mut conn, id)
            .await?
            .ok_or(AppError::NotFound("app"))?;
        checked.apply_to(&mut record);
        db::save(&mut conn, &record).await?;
        drop(conn);
        reloaded(app, id).await
    }
}
