//! rechat: a GraphQL gateway in front of Dify apps, with accounts, persisted conversations and
//! answers streamed over WebSocket subscriptions.

pub mod admin;
pub mod app;
pub mod apps;
pub mod auth;
pub mod chat;
pub mod config;
pub mod conversations;
pub mod db;
pub mod dify;
pub mod error;
pub mod files;
pub mod gateways;
pub mod graphiql;
pub mod graphql;
pub mod http;
pub mod metrics;
pub mod shared;
pub mod users;

pub use app::App;
pub use config::Config;
pub use http::router;
