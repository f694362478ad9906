//! `register` and `login`.

use async_graphql::{Context, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;

use crate::auth::throttle::{ACCOUNT_MAX_FAILURES, AccountKey, address_key};
use crate::error::{AppError, AppResult};
use crate::graphql::context::ContextExt;
use crate::users::db::{self, NewUserRecord, UserRecord};
use crate::users::domain::{Email, check_password, clean_full_name};
use crate::users::graphql::User;

const BAD_CREDENTIALS: &str = "wrong email or password";

/// A new account.
#[derive(InputObject)]
pub struct RegisterInput {
    /// Stored trimmed, NFKC-normalised and case-folded; must look like an email address (at most
    /// 254 characters).
    pub email: String,
    /// 8 to 128 characters.
    pub password: String,
    /// Optional display name.
    pub full_name: Option<String>,
}

/// Credentials to sign in with.
#[derive(InputObject)]
pub struct LoginInput {
    /// The account's email (any case or Unicode spelling of it).
    pub email: String,
    /// The account's password.
    pub password: String,
}

/// A signed-in session.
#[derive(SimpleObject)]
pub struct AuthPayload {
    /// The JWT (HS256); send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// Always `bearer`.
    pub token_type: String,
    /// When the token stops being accepted.
    pub expires_at: DateTime<Utc>,
    /// The signed-in account.
    pub user: User,
}

fn payload(ctx: &Context<'_>, user: &UserRecord) -> AppResult<AuthPayload> {
    let (token, expires_at) = ctx
        .app()
        .keys
        .issue(user.id, user.token_version)
        .map_err(AppError::internal)?;
    Ok(AuthPayload {
        token,
        token_type: "bearer".into(),
        expires_at,
        user: user.into(),
    })
}

#[derive(Default)]
pub struct AuthMutation;

#[Object]
impl AuthMutation {
    /// Creates an account and signs it in. The first account ever registered becomes admin.
    async fn register(&self, ctx: &Context<'_>, input: RegisterInput) -> AppResult<AuthPayload> {
        let email = Email::parse(&input.email)?;
        count_address_attempt(ctx).await?;
        check_password(&input.password)?;
        let full_name = clean_full_name(input.full_name)?;
        let app = ctx.app();
        let hash = app
            .passwords
            .hash(&input.password)
            .await
            .map_err(AppError::internal)?;
        let mut conn = app.db.get().await?;
        let user = conn
            .transaction::<_, AppError, _>(async |conn| {
                // The settings row is the lock that makes "first account" race-free.
                crate::admin::db::lock_settings(conn).await?;
                let is_first = !db::any_exists(conn).await?;
                let record =
                    NewUserRecord::new(email.as_str(), &hash, full_name.as_deref(), is_first);
                match db::insert(conn, &record).await {
                    Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) => return Err(AppError::Conflict("this email is already registered")),
                    other => other?,
                }
                db::find(conn, record.id)
                    .await?
                    .ok_or_else(|| AppError::internal(anyhow::anyhow!("inserted user vanished")))
            })
            .await?;
        tracing::info!(user.id = %user.id, user.is_admin = user.is_admin, "account registered");
        payload(ctx, &user)
    }

    /// Signs in. An unknown email and a wrong password give the same error in similar time.
    /// After 10 failed attempts for one account within 15 minutes, attempts are `RATE_LIMITED`
    /// (with `retryAfter`); so are more than `AUTH_ATTEMPTS_PER_MINUTE_PER_ADDRESS` sign-ins and
    /// registrations a minute from one client address.
    async fn login(&self, ctx: &Context<'_>, input: LoginInput) -> AppResult<AuthPayload> {
        let app = ctx.app();
        let email = Email::normalize(&input.email)?;
        count_address_attempt(ctx).await?;
        let user = {
            let mut conn = app.db.get().await?;
            db::find_by_email(&mut conn, &email).await?
        };
        // Counted before argon2 runs, so that concurrent guesses cannot pass the limit.
        let key = match &user {
            Some(user) => AccountKey::Account(user.id),
            None => app.throttles.unknown_email(&email),
        };
        app.throttles
            .accounts
            .take(&key, ACCOUNT_MAX_FAILURES)
            .await
            .map_err(|retry_after| AppError::RateLimited { retry_after })?;
        let verified = match &user {
            Some(user) => {
                app.passwords
                    .verify(&input.password, &user.password_hash)
                    .await
            }
            None => app
                .passwords
                .verify_dummy(&input.password)
                .await
                .map(|()| false),
        }
        .map_err(AppError::internal)?;
        match user {
            Some(user) if verified && user.is_active => {
                app.throttles.accounts.reset(&key).await;
                payload(ctx, &user)
            }
            _ => Err(AppError::Unauthenticated(BAD_CREDENTIALS)),
        }
    }
}

/// Counts a registration or sign-in against the client's address.
async fn count_address_attempt(ctx: &Context<'_>) -> AppResult<()> {
    let Some(address) = ctx.client_address() else {
        return Ok(());
    };
    let app = ctx.app();
    app.throttles
        .addresses
        .take(
            &address_key(address),
            app.config.auth_attempts_per_minute_per_address,
        )
        .await
        .map_err(|retry_after| AppError::RateLimited { retry_after })
}
