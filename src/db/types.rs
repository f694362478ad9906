//! Column types chosen once for every table: ids are UUIDv7 in `BINARY(16)` (generated in Rust,
//! time-ordered, so ordering by id is ordering by creation), enums are `VARCHAR`, JSON is text.

/// Declares an id newtype stored as `BINARY(16)` and shown to clients as a hyphenated UUID.
macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            diesel::expression::AsExpression, diesel::deserialize::FromSqlRow,
            serde::Serialize, serde::Deserialize,
        )]
        #[diesel(sql_type = diesel::sql_types::Binary)]
        pub struct $name(pub uuid::Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(uuid::Uuid::now_v7())
            }

            /// Parses a client-supplied id; a malformed one is `BAD_USER_INPUT` on `field`.
            pub fn parse(field: &'static str, id: &str) -> Result<Self, crate::error::AppError> {
                uuid::Uuid::parse_str(id.trim()).map(Self).map_err(|_| {
                    crate::error::AppError::bad_input(field, concat!("not a valid ", $what, " id"))
                })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl diesel::serialize::ToSql<diesel::sql_types::Binary, diesel::mysql::Mysql> for $name {
            fn to_sql<'b>(
                &'b self,
                out: &mut diesel::serialize::Output<'b, '_, diesel::mysql::Mysql>,
            ) -> diesel::serialize::Result {
                <[u8] as diesel::serialize::ToSql<diesel::sql_types::Binary, diesel::mysql::Mysql>>::to_sql(
                    self.0.as_bytes(),
                    out,
                )
            }
        }

        impl diesel::deserialize::FromSql<diesel::sql_types::Binary, diesel::mysql::Mysql> for $name {
            fn from_sql(bytes: diesel::mysql::MysqlValue<'_>) -> diesel::deserialize::Result<Self> {
                let raw = <Vec<u8> as diesel::deserialize::FromSql<
                    diesel::sql_types::Binary,
                    diesel::mysql::Mysql,
                >>::from_sql(bytes)?;
                Ok(Self(uuid::Uuid::from_slice(&raw)?))
            }
        }
    };
}

/// Declares a Rust enum stored as `VARCHAR` and exposed as a GraphQL enum.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, async_graphql::Enum,
            diesel::expression::AsExpression, diesel::deserialize::FromSqlRow,
            serde::Serialize, serde::Deserialize,
        )]
        #[diesel(sql_type = diesel::sql_types::Text)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(concat!("unknown ", stringify!($name), " {:?}"), other)),
                }
            }
        }

        impl diesel::serialize::ToSql<diesel::sql_types::Text, diesel::mysql::Mysql> for $name {
            fn to_sql<'b>(
                &'b self,
                out: &mut diesel::serialize::Output<'b, '_, diesel::mysql::Mysql>,
            ) -> diesel::serialize::Result {
                <str as diesel::serialize::ToSql<diesel::sql_types::Text, diesel::mysql::Mysql>>::to_sql(
                    self.as_str(),
                    out,
                )
            }
        }

        impl diesel::deserialize::FromSql<diesel::sql_types::Text, diesel::mysql::Mysql> for $name {
            fn from_sql(bytes: diesel::mysql::MysqlValue<'_>) -> diesel::deserialize::Result<Self> {
                let text = <String as diesel::deserialize::FromSql<
                    diesel::sql_types::Text,
                    diesel::mysql::Mysql,
                >>::from_sql(bytes)?;
                Ok(text.parse()?)
            }
        }
    };
}

pub(crate) use {text_enum, uuid_id};

/// Current UTC time truncated to microseconds, the precision of `DATETIME(6)`, so a value read
/// back equals the value written.
pub fn now() -> chrono::NaiveDateTime {
    use chrono::{SubsecRound, Utc};
    Utc::now().naive_utc().trunc_subsecs(6)
}

/// A `DATETIME(6)` column as the RFC 3339 UTC value clients see.
pub fn utc(at: chrono::NaiveDateTime) -> chrono::DateTime<chrono::Utc> {
    at.and_utc()
}
