//! The single `settings` row: the generated secret key and the Dify configuration.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use crate::db::schema::settings;

const ROW: i32 = 1;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = settings, check_for_backend(diesel::mysql::Mysql))]
pub struct DifySettingsRecord {
    pub dify_api_key_encrypted: Option<Vec<u8>>,
    pub dify_api_key_preview: Option<String>,
    pub dify_api_url: Option<String>,
    pub dify_app_mode: Option<String>,
    pub dify_app_name: Option<String>,
    pub dify_updated_at: Option<NaiveDateTime>,
}

#[derive(Debug, AsChangeset)]
#[diesel(table_name = settings, treat_none_as_null = true)]
pub struct DifySettingsChange<'a> {
    pub dify_api_key_encrypted: Option<&'a [u8]>,
    pub dify_api_key_preview: Option<&'a str>,
    pub dify_api_url: Option<&'a str>,
    pub dify_app_mode: Option<&'a str>,
    pub dify_app_name: Option<&'a str>,
    pub dify_updated_at: Option<NaiveDateTime>,
}

/// Locks the settings row until the transaction ends: the lock for rare global decisions.
pub async fn lock_settings(conn: &mut AsyncMysqlConnection) -> QueryResult<()> {
    settings::table
        .find(ROW)
        .select(settings::id)
        .for_update()
        .first::<i32>(conn)
        .await
        .map(drop)
}

/// The stored secret key, storing `candidate` first if none is stored yet. Several processes
/// starting at once all end up with the same key.
pub async fn secret_key_or_insert(
    conn: &mut AsyncMysqlConnection,
    candidate: &str,
) -> QueryResult<String> {
    diesel::update(
        settings::table
            .find(ROW)
            .filter(settings::secret_key.is_null()),
    )
    .set(settings::secret_key.eq(candidate))
    .execute(conn)
    .await?;
    settings::table
        .find(ROW)
        .select(settings::secret_key.assume_not_null())
        .first(conn)
        .await
}

pub async fn dify(conn: &mut AsyncMysqlConnection) -> QueryResult<DifySettingsRecord> {
    settings::table
        .find(ROW)
        .select(DifySettingsRecord::as_select())
        .first(conn)
        .await
}

pub async fn set_dify(
    conn: &mut AsyncMysqlConnection,
    change: &DifySettingsChange<'_>,
) -> QueryResult<()> {
    diesel::update(settings::table.find(ROW))
        .set(change)
        .execute(conn)
        .await
        .map(drop)
}
