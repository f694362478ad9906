//! User records and queries.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use crate::db::schema::users;
use crate::users::domain::UserId;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = users, check_for_backend(diesel::mysql::Mysql))]
pub struct UserRecord {
    pub id: UserId,
    pub email: String,
    pub password_hash: String,
    pub full_name: Option<String>,
    pub is_active: bool,
    pub is_admin: bool,
    pub token_version: i32,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = users)]
pub struct NewUserRecord<'a> {
    pub id: UserId,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub full_name: Option<&'a str>,
    pub is_active: bool,
    pub is_admin: bool,
    pub token_version: i32,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

impl<'a> NewUserRecord<'a> {
    /// A new active account with a fresh id.
    pub fn new(
        email: &'a str,
        password_hash: &'a str,
        full_name: Option<&'a str>,
        is_admin: bool,
    ) -> Self {
        let at = crate::db::types::now();
        Self {
            id: UserId::new(),
            email,
            password_hash,
            full_name,
            is_active: true,
            is_admin,
            token_version: 0,
            created_at: at,
            updated_at: at,
        }
    }
}

pub async fn find(conn: &mut AsyncMysqlConnection, id: UserId) -> QueryResult<Option<UserRecord>> {
    users::table
        .find(id)
        .select(UserRecord::as_select())
        .first(conn)
        .await
        .optional()
}

pub async fn find_for_update(
    conn: &mut AsyncMysqlConnection,
    id: UserId,
) -> QueryResult<Option<UserRecord>> {
    users::table
        .find(id)
        .select(UserRecord::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Accounts changed after `since`: id, active flag and when.
pub async fn changed_since(
    conn: &mut AsyncMysqlConnection,
    since: NaiveDateTime,
) -> QueryResult<Vec<(UserId, bool, NaiveDateTime)>> {
    users::table
        .filter(users::updated_at.gt(since))
        .select((users::id, users::is_active, users::updated_at))
        .load(conn)
        .await
}

pub async fn find_by_email(
    conn: &mut AsyncMysqlConnection,
    email: &str,
) -> QueryResult<Option<UserRecord>> {
    users::table
        .filter(users::email.eq(email))
        .select(UserRecord::as_select())
        .first(conn)
        .await
        .optional()
}

pub async fn any_exists(conn: &mut AsyncMysqlConnection) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(users::table.select(users::id)))
        .get_result(conn)
        .await
}

pub async fn insert(conn: &mut AsyncMysqlConnection, user: &NewUserRecord<'_>) -> QueryResult<()> {
    diesel::insert_into(users::table)
        .values(user)
        .execute(conn)
        .await
        .map(drop)
}

/// Active admins, locked until the end of the transaction (guards the last-admin rule).
pub async fn lock_active_admins(conn: &mut AsyncMysqlConnection) -> QueryResult<Vec<UserId>> {
    users::table
        .filter(users::is_admin.eq(true).and(users::is_active.eq(true)))
        .select(users::id)
        .for_update()
        .load(conn)
        .await
}

pub async fn set_admin(
    conn: &mut AsyncMysqlConnection,
    id: UserId,
    is_admin: bool,
) -> QueryResult<()> {
    diesel::update(users::table.find(id))
        .set((
            users::is_admin.eq(is_admin),
            users::updated_at.eq(crate::db::types::now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Changes `is_active`; deactivation also bumps `token_version`, revoking every token.
pub async fn set_active(
    conn: &mut AsyncMysqlConnection,
    id: UserId,
    is_active: bool,
) -> QueryResult<()> {
    let bump = if is_active { 0 } else { 1 };
    diesel::update(users::table.find(id))
        .set((
            users::is_active.eq(is_active),
            users::token_version.eq(users::token_version + bump),
            users::updated_at.eq(crate::db::types::now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Makes an account an active admin with a new password, revoking its tokens.
pub async fn reset_as_admin(
    conn: &mut AsyncMysqlConnection,
    id: UserId,
    password_hash: &str,
) -> QueryResult<()> {
    diesel::update(users::table.find(id))
        .set((
            users::is_admin.eq(true),
            users::is_active.eq(true),
            users::password_hash.eq(password_hash),
            users::token_version.eq(users::token_version + 1),
            users::updated_at.eq(crate::db::types::now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

pub async fn count(conn: &mut AsyncMysqlConnection) -> QueryResult<i64> {
    users::table.count().get_result(conn).await
}

/// A page in creation order (ids are UUIDv7), starting after `after`; `limit` rows at most.
pub async fn page(
    conn: &mut AsyncMysqlConnection,
    after: Option<UserId>,
    limit: i64,
) -> QueryResult<Vec<UserRecord>> {
    let mut query = users::table
        .select(UserRecord::as_select())
        .order(users::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(users::id.gt(after));
    }
    query.load(conn).await
}
