//! `User`, `me`, and the admin's user management.

use async_graphql::{ComplexObject, Context, ID, Object, SimpleObject};
use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;

use crate::db::types::utc;
use crate::error::{AppError, AppResult};
use crate::graphql::context::ContextExt;
use crate::graphql::pagination::{Page, build_page, decode_cursor, page_size};
use crate::users::db::{self, UserRecord};
use crate::users::domain::UserId;
use crate::users::quota;

/// An account that can sign in to rechat.
#[derive(SimpleObject, Clone)]
#[graphql(complex)]
pub struct User {
    #[graphql(skip)]
    pub user_id: UserId,
    /// The account's id (a UUID).
    pub id: ID,
    /// The sign-in email, lower-cased.
    pub email: String,
    /// The display name, if one was given.
    pub full_name: Option<String>,
    /// Inactive accounts cannot sign in, and their tokens are refused.
    pub is_active: bool,
    /// Admins manage users and the Dify configuration.
    pub is_admin: bool,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
    /// When the account last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<&UserRecord> for User {
    fn from(user: &UserRecord) -> Self {
        Self {
            user_id: user.id,
            id: user.id.into(),
            email: user.email.clone(),
            full_name: user.full_name.clone(),
            is_active: user.is_active,
            is_admin: user.is_admin,
            created_at: utc(user.created_at),
            updated_at: utc(user.updated_at),
        }
    }
}

/// Tokens used this month, against the quota.
#[derive(SimpleObject)]
pub struct UsageSummary {
    /// Start of the current calendar month, UTC.
    pub period_start: DateTime<Utc>,
    /// Tokens of the answers that ended this period (Dify's `total_tokens`).
    pub total_tokens: i64,
    /// Tokens allowed per period: an admin's `setUserQuota`, else `DEFAULT_TOKEN_QUOTA`; null
    /// is unlimited.
    pub token_quota: Option<i64>,
    /// When the period ends and the count starts again.
    pub resets_at: DateTime<Utc>,
    /// Answers streaming now on this gateway.
    pub active_answers: i32,
}

#[ComplexObject]
impl User {
    /// Tokens used this month and the quota. Your own, or anyone's for admins.
    async fn usage(&self, ctx: &Context<'_>) -> AppResult<UsageSummary> {
        let viewer = ctx.user()?;
        if viewer.id != self.user_id && !viewer.is_admin {
            return Err(AppError::Forbidden);
        }
        let app = ctx.app();
        let period = quota::period_start(crate::db::types::now());
        let mut conn = app.db.get().await?;
        let (set_quota, set) = quota::quota_of(&mut conn, self.user_id).await?;
        let used = quota::used(&mut conn, self.user_id, period).await?;
        let limit = quota::effective(set_quota, set, app.config.default_token_quota);
        Ok(UsageSummary {
            period_start: period.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
            total_tokens: i64::try_from(used).unwrap_or(i64::MAX),
            token_quota: limit.map(|q| i64::try_from(q).unwrap_or(i64::MAX)),
            resets_at: quota::period_end(period),
            active_answers: i32::try_from(app.active_answers(self.user_id).await)
                .unwrap_or(i32::MAX),
        })
    }
}

#[derive(Default)]
pub struct UserQuery;

#[Object]
impl UserQuery {
    /// The signed-in account.
    async fn me(&self, ctx: &Context<'_>) -> AppResult<User> {
        Ok(ctx.user()?.into())
    }

    /// Every account, oldest first. Admin only.
    #[graphql(complexity = "crate::graphql::limits::page_cost(first, None, child_complexity)")]
    async fn users(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(20)", desc = "Page size, 1 to 100.")] first: Option<i32>,
        #[graphql(desc = "The `endCursor` of the previous page.")] after: Option<String>,
    ) -> AppResult<Page<User>> {
        ctx.admin()?;
        let limit = page_size("first", first.unwrap_or(20))?;
        let after = after
            .map(|c| decode_cursor::<UserId>("after", &c))
            .transpose()?;
        let mut conn = ctx.app().db.get().await?;
        let rows = db::page(&mut conn, after, limit + 1).await?;
        let total = db::count(&mut conn).await?;
        Ok(build_page(
            rows,
            limit,
            true,
            after.is_some(),
            total,
            |u| u.id,
            |u| User::from(&u),
        ))
    }
}

#[derive(Default)]
pub struct UserMutation;

#[Object]
impl UserMutation {
    /// Grants or removes the admin flag. Admin only; the last active admin cannot lose it.
    async fn set_user_admin(
        &self,
        ctx: &Context<'_>,
        user_id: ID,
        is_admin: bool,
    ) -> AppResult<User> {
        ctx.admin()?;
        let id = UserId::parse("userId", &user_id)?;
        change_user(ctx, id, UserChange::Admin(is_admin)).await
    }

    /// Activates or deactivates an account. Admin only. Deactivation revokes every token of the
    /// user at once; the last active admin cannot be deactivated.
    async fn set_user_active(
        &self,
        ctx: &Context<'_>,
        user_id: ID,
        is_active: bool,
    ) -> AppResult<User> {
        ctx.admin()?;
        let id = UserId::parse("userId", &user_id)?;
        change_user(ctx, id, UserChange::Active(is_active)).await
    }

    /// Sets a user's token quota per calendar month (UTC); null means unlimited. Admin only.
    /// Until an admin sets one, `DEFAULT_TOKEN_QUOTA` applies. Turns are refused with
    /// `QUOTA_EXCEEDED` once the month's settled tokens reach it.
    async fn set_user_quota(
        &self,
        ctx: &Context<'_>,
        user_id: ID,
        token_quota: Option<i64>,
    ) -> AppResult<User> {
        ctx.admin()?;
        let id = UserId::parse("userId", &user_id)?;
        if token_quota.is_some_and(|q| q < 0) {
            return Err(AppError::bad_input(
                "tokenQuota",
                "the quota is a number of tokens, 0 or more (null for unlimited)",
            ));
        }
        let mut conn = ctx.app().db.get().await?;
        if quota::set_quota(&mut conn, id, token_quota).await? == 0 {
            return Err(AppError::NotFound("user"));
        }
        let user = db::find(&mut conn, id)
            .await?
            .ok_or(AppError::NotFound("user"))?;
        Ok((&user).into())
    }
}

#[derive(Clone, Copy)]
enum UserChange {
    Admin(bool),
    Active(bool),
}

/// Locks the user's row, applies the change and returns the user as stored, in one transaction.
async fn change_user(ctx: &Context<'_>, id: UserId, change: UserChange) -> AppResult<User> {
    let mut conn = ctx.app().db.get().await?;
    let user = conn
        .transaction::<_, AppError, _>(async |conn| {
            let user = db::find_for_update(conn, id)
                .await?
                .ok_or(AppError::NotFound("user"))?;
            match change {
                UserChange::Admin(is_admin) => {
                    if user.is_admin && !is_admin {
                        ensure_not_last_admin(conn, user.id, "isAdmin").await?;
                    }
                    db::set_admin(conn, user.id, is_admin).await?;
                }
                UserChange::Active(is_active) => {
                    if user.is_admin && user.is_active && !is_active {
                        ensure_not_last_admin(conn, user.id, "isActive").await?;
                    }
                    db::set_active(conn, user.id, is_active).await?;
                }
            }
            db::find(conn, id).await?.ok_or(AppError::NotFound("user"))
        })
        .await?;
    let app = ctx.app();
    app.account_changed(user.id, user.is_active);
    let signal = crate::shared::Signal::Account {
        user: user.id.to_string(),
        active: user.is_active,
    };
    app.shared.publish(signal).await;
    Ok((&user).into())
}

async fn ensure_not_last_admin(
    conn: &mut diesel_async::AsyncMysqlConnection,
    id: UserId,
    field: &'static str,
) -> AppResult<()> {
    let admins = db::lock_active_admins(conn).await?;
    if admins.iter().all(|a| *a == id) {
        return Err(AppError::bad_input(
            field,
            "this is the last active admin; make another account admin first",
        ));
    }
    Ok(())
}
