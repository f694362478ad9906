//! Relay connections with opaque keyset cursors (never OFFSET), shared by every paginated list.

use async_graphql::SimpleObject;
use async_graphql::connection::{Connection, CursorType, Edge, EmptyFields, OpaqueCursor};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{AppError, AppResult};

pub const MAX_PAGE_SIZE: i32 = 100;

/// Fields every connection adds to Relay's.
#[derive(SimpleObject)]
pub struct ConnectionTotals {
    /// How many items the whole list has, across all pages.
    pub total_count: i64,
}

pub type Page<T> = Connection<String, T, ConnectionTotals, EmptyFields>;

/// Validates a `first`/`last` argument: 1 to 100.
pub fn page_size(field: &'static str, size: i32) -> AppResult<i64> {
    if (1..=MAX_PAGE_SIZE).contains(&size) {
        Ok(i64::from(size))
    } else {
        Err(AppError::bad_input(
            field,
            format!("{field} must be between 1 and {MAX_PAGE_SIZE}"),
        ))
    }
}

pub fn encode_cursor<K: Serialize + DeserializeOwned>(key: K) -> String {
    OpaqueCursor(key).encode_cursor()
}

pub fn decode_cursor<K: Serialize + DeserializeOwned>(
    field: &'static str,
    cursor: &str,
) -> AppResult<K> {
    OpaqueCursor::<K>::decode_cursor(cursor)
        .map(|c| c.0)
        .map_err(|_| AppError::bad_input(field, format!("{field} is not a cursor from this list")))
}

/// Builds a page from rows fetched with one extra row (`limit + 1`) to know whether more exist.
/// `rows` must be in display order; `extra_at_end` says on which side the probe row was fetched.
pub fn build_page<R, T, K>(
    mut rows: Vec<R>,
    limit: i64,
    forward: bool,
    has_cursor: bool,
    total_count: i64,
    key: impl Fn(&R) -> K,
    node: impl Fn(R) -> T,
) -> Page<T>
where
    K: Serialize + DeserializeOwned,
    T: async_graphql::OutputType,
{
    let more = rows.len() as i64 > limit;
    if more {
        if forward {
            rows.truncate(limit as usize);
        } else {
            rows.remove(0);
        }
    }
    let (has_previous, has_next) = if forward {
        (has_cursor, more)
    } else {
        (more, has_cursor)
    };
    let mut page =
        Page::with_additional_fields(has_previous, has_next, ConnectionTotals { total_count });
    page.edges = rows
        .into_iter()
        .map(|row| Edge::new(encode_cursor(key(&row)), node(row)))
        .collect();
    page
}
