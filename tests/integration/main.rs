//! End-to-end tests: the production router on a real port, a fresh MariaDB database per test,
//! a fake Dify speaking Dify's protocol, real HTTP and WebSocket clients.

mod harness;

mod accounts;
mod apps;
mod chat;
mod conversations;
mod files;
mod gateways;
mod http_surface;
mod limits;
mod persistence;
mod resume;
mod schema;
mod sessions;
mod startup;
mod websocket;
