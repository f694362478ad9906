//! Who is asking: the `Viewer` resolved from a bearer token, and context helpers for resolvers.

use async_graphql::Context;

use crate::app::App;
use crate::error::{AppError, AppResult, NOT_SIGNED_IN, SESSION_INVALID};
use crate::users::db::UserRecord;

/// The caller of one request or one WebSocket connection.
#[derive(Debug, Clone)]
pub enum Viewer {
    /// No credentials were sent.
    Anonymous,
    /// Credentials were sent but are invalid, expired, revoked or belong to an inactive user.
    Rejected,
    User(Box<UserRecord>),
}

impl Viewer {
    /// Resolves a bearer token (a value of `Authorization`, with or without the `Bearer ` prefix).
    pub async fn from_credentials(app: &App, credentials: Option<&str>) -> AppResult<Self> {
        let Some(credentials) = credentials.map(str::trim).filter(|c| !c.is_empty()) else {
            return Ok(Self::Anonymous);
        };
        let token = match credentials.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            Some(_) => return Ok(Self::Rejected),
            None => credentials,
        };
        let Some((id, version)) = app.keys.verify(token) else {
            return Ok(Self::Rejected);
        };
        let user = match app.accounts.get(id) {
            Some(user) => Some(user),
            None => {
                let mut conn = app.db.get().await?;
                let user = crate::users::db::find(&mut conn, id).await?;
                if let Some(user) = &user {
                    app.accounts.put(user);
                }
                user
            }
        };
        Ok(match user {
            Some(user) if user.is_active && user.token_version == version => {
                Self::User(Box::new(user))
            }
            _ => Self::Rejected,
        })
    }

    pub fn user(&self) -> AppResult<&UserRecord> {
        match self {
            Self::User(user) => Ok(user),
            Self::Anonymous => Err(AppError::Unauthenticated(NOT_SIGNED_IN)),
            Self::Rejected => Err(AppError::Unauthenticated(SESSION_INVALID)),
        }
    }
}

pub trait ContextExt {
    fn app(&self) -> &App;
    /// The signed-in user, or `UNAUTHENTICATED`.
    fn user(&self) -> AppResult<&UserRecord>;
    /// The signed-in admin, or `UNAUTHENTICATED` / `FORBIDDEN`.
    fn admin(&self) -> AppResult<&UserRecord>;
}

impl ContextExt for Context<'_> {
    fn app(&self) -> &App {
        self.data_unchecked::<App>()
    }

    fn user(&self) -> AppResult<&UserRecord> {
        self.data_opt::<Viewer>()
            .unwrap_or(&Viewer::Anonymous)
            .user()
    }

    fn admin(&self) -> AppResult<&UserRecord> {
        let user = self.user()?;
        if user.is_admin {
            Ok(user)
        } else {
            Err(AppError::Forbidden)
        }
    }
}
