//! Relay connections with opaque keyset cursors (never OFFSET), shared by every paginated list.

use async_graphql::connection::{CursorType, OpaqueCursor, PageInfo};
use async_graphql::{OutputType, SimpleObject};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::conversations::graphql::{Conversation, Message};
use crate::error::{AppError, AppResult};
use crate::users::graphql::User;

pub const MAX_PAGE_SIZE: i32 = 100;

/// One page of a list: Relay edges with opaque cursors, the nodes alone, and the list's size.
#[derive(SimpleObject)]
#[graphql(
    concrete(name = "UserConnection", params(User)),
    concrete(name = "ConversationConnection", params(Conversation)),
    concrete(name = "MessageConnection", params(Message))
)]
pub struct Page<T: OutputType + Clone>
where
    Edge<T>: OutputType,
{
    /// The items of this page, each with its cursor.
    pub edges: Vec<Edge<T>>,
    /// The items of this page.
    pub nodes: Vec<T>,
    /// Whether there are more pages, and the cursors to get them.
    pub page_info: PageInfo,
    /// How many items the whole list has, across all pages.
    pub total_count: i64,
}

/// An item of a page and its cursor.
#[derive(SimpleObject)]
#[graphql(
    concrete(name = "UserEdge", params(User)),
    concrete(name = "ConversationEdge", params(Conversation)),
    concrete(name = "MessageEdge", params(Message))
)]
pub struct Edge<T: OutputType + Clone> {
    /// Pass as `after` (or `before`) to page from this item.
    pub cursor: String,
    /// The item.
    pub node: T,
}

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
/// `rows` must be in display order; going backward the probe row is the first one.
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
    T: OutputType + Clone,
    Edge<T>: OutputType,
{
    let more = rows.len() as i64 > limit;
    if more {
        if forward {
            rows.truncate(limit as usize);
        } else {
            rows.remove(0);
        }
    }
    let (has_previous_page, has_next_page) = if forward {
        (has_cursor, more)
    } else {
        (more, has_cursor)
    };
    let edges: Vec<Edge<T>> = rows
        .into_iter()
        .map(|row| Edge {
            cursor: encode_cursor(key(&row)),
            node: node(row),
        })
        .collect();
    Page {
        page_info: PageInfo {
            has_previous_page,
            has_next_page,
            start_cursor: edges.first().map(|e| e.cursor.clone()),
            end_cursor: edges.last().map(|e| e.cursor.clone()),
        },
        nodes: edges.iter().map(|e| e.node.clone()).collect(),
        edges,
        total_count,
    }
}
