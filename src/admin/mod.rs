//! Admin: the settings row and the Dify configuration.

pub mod db;
pub mod dify;
pub mod domain;
pub mod graphql;
