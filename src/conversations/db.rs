//! Conversation and message records and queries. Every lookup by id takes the owner too, so
//! another user's rows are simply not found.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

use crate::apps::AppId;
use crate::conversations::domain::{ConversationId, MessageId, MessageRole, MessageStatus, Rating};
use crate::db::schema::{conversations, messages};
use crate::db::types::now;
use crate::users::domain::UserId;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Insertable)]
#[diesel(table_name = conversations, check_for_backend(diesel::mysql::Mysql))]
pub struct ConversationRecord {
    pub id: ConversationId,
    pub user_id: UserId,
    pub title: String,
    pub is_archived: bool,
    pub is_pinned: bool,
    pub dify_conversation_id: Option<String>,
    pub message_count: i32,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    /// The app it belongs to; `None` for a conversation from before apps (the default app).
    pub app_id: Option<crate::apps::AppId>,
}

#[derive(Debug, Clone, Queryable, Selectable, Identifiable, Insertable)]
#[diesel(table_name = messages, check_for_backend(diesel::mysql::Mysql))]
pub struct MessageRecord {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub role: MessageRole,
    pub content: String,
    pub status: MessageStatus,
    pub error: Option<String>,
    pub dify_message_id: Option<String>,
    pub dify_task_id: Option<String>,
    pub dify_workflow_run_id: Option<String>,
    pub usage: Option<String>,
    pub retriever_resources: Option<String>,
    pub agent_thoughts: Option<String>,
    pub files: Option<String>,
    pub feedback: Option<Rating>,
    pub stop_requested: bool,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    /// The seq of the last event the row covers (see the migration); `None` before any write
    /// of a live answer, and on rows older than resumable streams.
    pub last_seq: Option<i32>,
    /// User messages: the idempotency key the turn was sent with, unique per `client_owner_id`.
    pub client_message_id: Option<String>,
    pub client_owner_id: Option<UserId>,
    /// Assistant messages: the gateway process that relays (or relayed) the answer.
    pub gateway_id: Option<crate::gateways::GatewayId>,
}

impl MessageRecord {
    pub fn new(
        conversation_id: ConversationId,
        role: MessageRole,
        content: String,
        status: MessageStatus,
    ) -> Self {
        let at = now();
        Self {
            id: MessageId::new(),
            conversation_id,
            role,
            content,
            status,
            error: None,
            dify_message_id: None,
            dify_task_id: None,
            dify_workflow_run_id: None,
            usage: None,
            retriever_resources: None,
            agent_thoughts: None,
            files: None,
            feedback: None,
            stop_requested: false,
            created_at: at,
            updated_at: at,
            last_seq: None,
            client_message_id: None,
            client_owner_id: None,
            gateway_id: None,
        }
    }
}

pub async fn find_owned(
    conn: &mut AsyncMysqlConnection,
    id: ConversationId,
    owner: UserId,
) -> QueryResult<Option<ConversationRecord>> {
    conversations::table
        .filter(
            conversations::id
                .eq(id)
                .and(conversations::user_id.eq(owner)),
        )
        .select(ConversationRecord::as_select())
        .first(conn)
        .await
        .optional()
}

pub async fn insert(
    conn: &mut AsyncMysqlConnection,
    conversation: &ConversationRecord,
) -> QueryResult<()> {
    diesel::insert_into(conversations::table)
        .values(conversation)
        .execute(conn)
        .await
        .map(drop)
}

/// Records that `added` messages arrived: moves `updated_at` and the message count.
pub async fn touch(
    conn: &mut AsyncMysqlConnection,
    id: ConversationId,
    added: i32,
) -> QueryResult<()> {
    diesel::update(conversations::table.find(id))
        .set((
            conversations::message_count.eq(conversations::message_count + added),
            conversations::updated_at.eq(now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Keeps the first Dify conversation id Dify issued; later turns send it back.
pub async fn set_dify_conversation_id(
    conn: &mut AsyncMysqlConnection,
    id: ConversationId,
    dify_id: &str,
) -> QueryResult<()> {
    diesel::update(
        conversations::table
            .find(id)
            .filter(conversations::dify_conversation_id.is_null()),
    )
    .set(conversations::dify_conversation_id.eq(dify_id))
    .execute(conn)
    .await
    .map(drop)
}

/// Forgets a Dify conversation id that Dify no longer knows.
pub async fn clear_dify_conversation_id(
    conn: &mut AsyncMysqlConnection,
    id: ConversationId,
) -> QueryResult<()> {
    diesel::update(conversations::table.find(id))
        .set(conversations::dify_conversation_id.eq(None::<String>))
        .execute(conn)
        .await
        .map(drop)
}

#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = conversations)]
pub struct ConversationChange {
    pub title: Option<String>,
    pub is_archived: Option<bool>,
    pub is_pinned: Option<bool>,
}

/// Applies a change to an owned conversation and returns it as stored; `None` when it is not
/// the owner's (or does not exist).
pub async fn update(
    conn: &mut AsyncMysqlConnection,
    id: ConversationId,
    owner: UserId,
    change: &ConversationChange,
) -> QueryResult<Option<ConversationRecord>> {
    if change.title.is_some() || change.is_archived.is_some() || change.is_pinned.is_some() {
        diesel::update(
            conversations::table.filter(
                conversations::id
                    .eq(id)
                    .and(conversations::user_id.eq(owner)),
            ),
        )
        .set(change)
        .execute(conn)
        .await?;
    }
    find_owned(conn, id, owner).await
}

/// Deletes a conversation and its messages together (the foreign key cascades).
pub async fn delete(conn: &mut AsyncMysqlConnection, id: ConversationId) -> QueryResult<()> {
    diesel::delete(messages::table.filter(messages::conversation_id.eq(id)))
        .execute(conn)
        .await?;
    diesel::delete(conversations::table.find(id))
        .execute(conn)
        .await
        .map(drop)
}

/// The list position of a conversation: pinned first, then most recent activity, then id.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConversationKey {
    pub pinned: bool,
    pub updated_at: NaiveDateTime,
    pub id: ConversationId,
}

impl From<&ConversationRecord> for ConversationKey {
    fn from(c: &ConversationRecord) -> Self {
        Self {
            pinned: c.is_pinned,
            updated_at: c.updated_at,
            id: c.id,
        }
    }
}

/// What to list: the owner's conversations, archived or not, optionally matching a search.
pub struct ConversationFilter<'a> {
    pub owner: UserId,
    pub archived: bool,
    /// A `LIKE` pattern (already escaped) matched against titles and message bodies.
    ///
    /// Search is a substring match, not FULLTEXT: InnoDB's FULLTEXT parser does not split CJK
    /// text and drops words under 3 characters, so "年假" or "VPN" would not be found. The scan
    /// is bounded to one owner's conversations (the `conversations_list` index, then
    /// `messages_by_conversation` per candidate) and stops at the first matching message.
    pub search: Option<&'a str>,
    /// Only the conversations of this app.
    pub app: Option<AppId>,
}

fn filtered<'a>(
    filter: &ConversationFilter<'a>,
) -> conversations::BoxedQuery<'a, diesel::mysql::Mysql> {
    let mut query = conversations::table
        .filter(conversations::user_id.eq(filter.owner))
        .filter(conversations::is_archived.eq(filter.archived))
        .into_boxed();
    if let Some(app) = filter.app {
        query = query.filter(conversations::app_id.eq(app));
    }
    if let Some(pattern) = filter.search {
        let in_messages = messages::table
            .filter(messages::conversation_id.eq(conversations::id))
            .filter(messages::content.like(pattern).escape('\\'));
        query = query.filter(
            conversations::title
                .like(pattern)
                .escape('\\')
                .or(diesel::dsl::exists(in_messages.select(messages::id))),
        );
    }
    query
}

/// A page of conversations in list order after `after`; `limit` rows at most.
pub async fn page(
    conn: &mut AsyncMysqlConnection,
    filter: &ConversationFilter<'_>,
    after: Option<ConversationKey>,
    limit: i64,
) -> QueryResult<Vec<ConversationRecord>> {
    use conversations::{id, is_pinned, updated_at};
    let mut query = filtered(filter)
        .select(ConversationRecord::as_select())
        .order((is_pinned.desc(), updated_at.desc(), id.desc()))
        .limit(limit);
    if let Some(k) = after {
        // Rows strictly after k in (pinned desc, updated_at desc, id desc) order.
        query = query.filter(
            is_pinned
                .lt(k.pinned)
                .or(is_pinned.eq(k.pinned).and(updated_at.lt(k.updated_at)))
                .or(is_pinned
                    .eq(k.pinned)
                    .and(updated_at.eq(k.updated_at))
                    .and(id.lt(k.id))),
        );
    }
    query.load(conn).await
}

pub async fn count(
    conn: &mut AsyncMysqlConnection,
    filter: &ConversationFilter<'_>,
) -> QueryResult<i64> {
    filtered(filter).count().get_result(conn).await
}

/// A message, with its conversation's owner checked.
/// One of `owner`'s messages, with its conversation's app.
pub async fn find_message_owned(
    conn: &mut AsyncMysqlConnection,
    id: MessageId,
    owner: UserId,
) -> QueryResult<Option<(MessageRecord, Option<AppId>)>> {
    messages::table
        .inner_join(conversations::table)
        .filter(messages::id.eq(id).and(conversations::user_id.eq(owner)))
        .select((MessageRecord::as_select(), conversations::app_id))
        .first(conn)
        .await
        .optional()
}

pub async fn find_message(
    conn: &mut AsyncMysqlConnection,
    id: MessageId,
) -> QueryResult<Option<MessageRecord>> {
    messages::table
        .find(id)
        .select(MessageRecord::as_select())
        .first(conn)
        .await
        .optional()
}

pub async fn insert_messages(
    conn: &mut AsyncMysqlConnection,
    rows: &[MessageRecord],
) -> QueryResult<()> {
    diesel::insert_into(messages::table)
        .values(rows)
        .execute(conn)
        .await
        .map(drop)
}

/// Messages of a conversation in id (= creation) order. Forward pages start after `after`;
/// backward pages end before `before` and come back newest first (the caller reverses them).
pub async fn message_page(
    conn: &mut AsyncMysqlConnection,
    conversation: ConversationId,
    forward: bool,
    cursor: Option<MessageId>,
    limit: i64,
) -> QueryResult<Vec<MessageRecord>> {
    let mut query = messages::table
        .filter(messages::conversation_id.eq(conversation))
        .select(MessageRecord::as_select())
        .limit(limit)
        .into_boxed();
    query = match (forward, cursor) {
        (true, Some(c)) => query.filter(messages::id.gt(c)),
        (false, Some(c)) => query.filter(messages::id.lt(c)),
        _ => query,
    };
    query = if forward {
        query.order(messages::id.asc())
    } else {
        query.order(messages::id.desc())
    };
    query.load(conn).await
}

pub async fn set_feedback(
    conn: &mut AsyncMysqlConnection,
    id: MessageId,
    rating: Option<Rating>,
) -> QueryResult<()> {
    diesel::update(messages::table.find(id))
        .set((
            messages::feedback.eq(rating),
            messages::updated_at.eq(now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Assistant messages of a conversation still streaming (to stop before a delete).
pub async fn streaming_messages(
    conn: &mut AsyncMysqlConnection,
    conversation: ConversationId,
) -> QueryResult<Vec<MessageRecord>> {
    messages::table
        .filter(messages::conversation_id.eq(conversation))
        .filter(messages::status.eq(MessageStatus::Streaming))
        .select(MessageRecord::as_select())
        .load(conn)
        .await
}

/// Escapes a search term for `LIKE … ESCAPE '\'` and wraps it in `%…%`.
pub fn like_pattern(term: &str) -> String {
    let mut pattern = String::with_capacity(term.len() + 2);
    pattern.push('%');
    for c in term.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}
