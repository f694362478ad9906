//! The single `settings` row: the generated secret key, and the lock for rare global decisions.
//! (Its `dify_*` columns are the part-1 key, moved to `dify_apps` by a migration and no longer
//! read.)

use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use crate::db::schema::settings;

const ROW: i32 = 1;

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
