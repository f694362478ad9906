//! Admin: the settings row, the Dify key at rest, and the deprecated part-1 Dify configuration.

pub mod db;
pub mod domain;
pub mod graphql;
