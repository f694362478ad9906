//! Accounts and their management.

pub mod db;
pub mod domain;
pub mod graphql;
pub mod quota;

use diesel_async::AsyncConnection;

use crate::app::App;
use crate::error::{AppError, AppResult};
use domain::{Email, check_password};

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
        if let Some(user) = db::find_by_email(conn, email.as_str()).await? {
            db::reset_as_admin(conn, user.id, &hash).await?;
            return Ok(format!(
                "{} is now an active admin with the new password",
                email.as_str()
            ));
        }
        db::insert(
            conn,
            &db::NewUserRecord::new(email.as_str(), &hash, None, true),
        )
        .await?;
        Ok(format!("admin account {} created", email.as_str()))
    })
    .await
}
