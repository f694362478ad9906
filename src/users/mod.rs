//! Accounts and their management.

pub mod db;
pub mod domain;
pub mod graphql;

use diesel_async::AsyncConnection;

use crate::app::App;
use crate::db::types::now;
use crate::error::{AppError, AppResult};
use domain::{Email, UserId, check_password};

/// `rechat create-admin`: creates an admin account, or makes an existing one admin with the
/// given password (and revokes its tokens). Returns a sentence saying which.
pub async fn admin_account(app: &App, email: &str, password: &str) -> AppResult<String> {
    let email = Email::parse(email)?;
    check_password(password)?;
    let hash = app
        .passwords
        .hash(password)
        .await
        .map_err(AppError::internal)?;
    let mut conn = app.db.get().await?;
    conn.transaction::<_, AppError, _>(async |conn| {
        use crate::db::schema::users::dsl;
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        if let Some(user) = db::find_by_email(conn, email.as_str()).await? {
            diesel::update(dsl::users.find(user.id))
                .set((
                    dsl::is_admin.eq(true),
                    dsl::is_active.eq(true),
                    dsl::password_hash.eq(&hash),
                    dsl::token_version.eq(dsl::token_version + 1),
                    dsl::updated_at.eq(now()),
                ))
                .execute(conn)
                .await?;
            return Ok(format!(
                "{} is now an active admin with the new password",
                email.as_str()
            ));
        }
        let at = now();
        db::insert(
            conn,
            &db::NewUserRecord {
                id: UserId::new(),
                email: email.as_str(),
                password_hash: &hash,
                full_name: None,
                is_active: true,
                is_admin: true,
                token_version: 0,
                created_at: at,
                updated_at: at,
            },
        )
        .await?;
        Ok(format!("admin account {} created", email.as_str()))
    })
    .await
}
