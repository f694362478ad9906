//! Conversations and their messages: listing, paging, renaming, filing, deleting.

pub mod db;
pub mod domain;
pub mod graphql;
