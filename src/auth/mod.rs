//! Sign-up, sign-in and tokens.

pub mod accounts;
pub mod graphql;
pub mod password;
pub mod sessions;
pub mod throttle;
pub mod token;
