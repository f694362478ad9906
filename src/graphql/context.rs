//! Who is asking: the `Viewer` resolved from a bearer token, and context helpers for resolvers.

use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::{Context, Pos, Request, ServerResult};

use crate::app::App;
use crate::auth::token::Session;
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
        match Session::from_credentials(app, credentials) {
            None => Ok(Self::Anonymous),
            Some(None) => Ok(Self::Rejected),
            Some(Some(session)) => Self::of_session(app, &session).await,
        }
    }

    /// The account behind a session as it is now (cached for `accounts::TTL`): the session is
    /// refused once the token expired, the account was deactivated or its tokens were revoked.
    pub async fn of_session(app: &App, session: &Session) -> AppResult<Self> {
        if session.is_expired() {
            return Ok(Self::Rejected);
        }
        let user = match app.accounts.get(session.user) {
            Some(user) => Some(user),
            None => {
                let read = async {
                    let mut conn = app.db.get().await?;
                    Ok::<_, AppError>(crate::users::db::find(&mut conn, session.user).await?)
                };
                let user = tokio::time::timeout(app.config.operation_timeout, read)
                    .await
                    .map_err(|_| AppError::Unavailable)??;
                if let Some(user) = &user {
                    app.accounts.put(user);
                }
                user
            }
        };
        Ok(match user {
            Some(user) if user.is_active && user.token_version == session.token_version => {
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

/// The client's address, as `http` determined it (see `TRUST_FORWARDED_FOR`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

pub trait ContextExt {
    fn app(&self) -> &App;
    fn client_address(&self) -> Option<std::net::IpAddr>;
    /// The signed-in user, or `UNAUTHENTICATED`.
    fn user(&self) -> AppResult<&UserRecord>;
    /// The signed-in admin, or `UNAUTHENTICATED` / `FORBIDDEN`.
    fn admin(&self) -> AppResult<&UserRecord>;
}

impl ContextExt for Context<'_> {
    fn app(&self) -> &App {
        self.data_unchecked::<App>()
    }

    fn client_address(&self) -> Option<std::net::IpAddr> {
        self.data_opt::<ClientAddr>().and_then(|a| a.0)
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

impl Session {
    /// `None` without credentials; `Some(None)` for credentials that are not a valid token.
    pub fn from_credentials(app: &App, credentials: Option<&str>) -> Option<Option<Self>> {
        let credentials = credentials.map(str::trim).filter(|c| !c.is_empty())?;
        let token = match credentials.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            Some(_) => return Some(None),
            None => credentials,
        };
        Some(app.keys.verify(token))
    }
}

/// Gives every operation on a WebSocket the account as it is now. The connection keeps the
/// token's [`Session`], not the account read at `connection_init`: a demotion, a deactivation or
/// an expiry applies to the next operation (and `http` closes the socket).
pub struct SessionViewer;

impl ExtensionFactory for SessionViewer {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(SessionViewer)
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for SessionViewer {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        let request = match (ctx.data_opt::<Session>(), ctx.data_opt::<App>()) {
            (Some(session), Some(app)) => {
                let viewer = Viewer::of_session(app, session).await.map_err(|error| {
                    async_graphql::Error::from(error).into_server_error(Pos::default())
                })?;
                request.data(viewer)
            }
            _ => request,
        };
        next.run(ctx, request).await
    }
}
