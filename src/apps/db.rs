//! The `dify_apps` table.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use super::AppId;
use crate::db::schema::dify_apps;
use crate::db::types::now;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Insertable)]
#[diesel(table_name = dify_apps, check_for_backend(diesel::mysql::Mysql))]
pub struct AppRecord {
    pub id: AppId,
    pub name: String,
    pub name_is_custom: bool,
    pub description: Option<String>,
    pub mode: String,
    /// `None`: `DIFY_API_URL`.
    pub api_url: Option<String>,
    pub api_key_encrypted: Option<Vec<u8>>,
    pub api_key_preview: Option<String>,
    pub is_default: bool,
    pub is_enabled: bool,
    /// Dify's `/parameters` answer as JSON text.
    pub parameters: Option<String>,
    pub parameters_at: Option<NaiveDateTime>,
    pub deleted_at: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// Every app that was not deleted, oldest first.
pub async fn live(conn: &mut AsyncMysqlConnection) -> QueryResult<Vec<AppRecord>> {
    dify_apps::table
        .filter(dify_apps::deleted_at.is_null())
        .order(dify_apps::created_at.asc())
        .select(AppRecord::as_select())
        .load(conn)
        .await
}

pub async fn find_live(
    conn: &mut AsyncMysqlConnection,
    id: AppId,
) -> QueryResult<Option<AppRecord>> {
    dify_apps::table
        .find(id)
        .filter(dify_apps::deleted_at.is_null())
        .select(AppRecord::as_select())
        .first(conn)
        .await
        .optional()
}

pub async fn insert(conn: &mut AsyncMysqlConnection, app: &AppRecord) -> QueryResult<()> {
    diesel::insert_into(dify_apps::table)
        .values(app)
        .execute(conn)
        .await
        .map(drop)
}

/// Writes every column of a live app back (the caller changed what it needed).
pub async fn save(conn: &mut AsyncMysqlConnection, app: &AppRecord) -> QueryResult<()> {
    diesel::update(dify_apps::table.find(app.id))
        .set((
            dify_apps::name.eq(&app.name),
            dify_apps::name_is_custom.eq(app.name_is_custom),
            dify_apps::description.eq(&app.description),
            dify_apps::mode.eq(&app.mode),
            dify_apps::api_url.eq(&app.api_url),
            dify_apps::api_key_encrypted.eq(&app.api_key_encrypted),
            dify_apps::api_key_preview.eq(&app.api_key_preview),
            dify_apps::is_default.eq(app.is_default),
            dify_apps::is_enabled.eq(app.is_enabled),
            dify_apps::parameters.eq(&app.parameters),
            dify_apps::parameters_at.eq(app.parameters_at),
            dify_apps::deleted_at.eq(app.deleted_at),
            dify_apps::updated_at.eq(now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Makes `id` the only default app.
pub async fn make_default(conn: &mut AsyncMysqlConnection, id: AppId) -> QueryResult<()> {
    diesel::update(dify_apps::table.filter(dify_apps::id.ne(id)))
        .filter(dify_apps::is_default.eq(true))
        .set((
            dify_apps::is_default.eq(false),
            dify_apps::updated_at.eq(now()),
        ))
        .execute(conn)
        .await?;
    diesel::update(dify_apps::table.find(id))
        .set((
            dify_apps::is_default.eq(true),
            dify_apps::updated_at.eq(now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Stores a fresh `/parameters` answer.
pub async fn set_parameters(
    conn: &mut AsyncMysqlConnection,
    id: AppId,
    parameters: &str,
) -> QueryResult<()> {
    diesel::update(dify_apps::table.find(id))
        .set((
            dify_apps::parameters.eq(parameters),
            dify_apps::parameters_at.eq(now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}
