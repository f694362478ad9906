//! Chat persistence: the turn written before Dify is called, the bounded-rate flushes, the
//! final write, and the sweep of answers whose gateway went away.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};

use crate::conversations::db::{self as conversations_db, ConversationRecord, MessageRecord};
use crate::conversations::domain::{
    ConversationId, MessageId, MessageRole, MessageStatus, title_from_query,
};
use crate::db::schema::messages;
use crate::db::types::now;
use crate::users::domain::UserId;

/// In one transaction: the conversation (created on a first turn), the user's message and an
/// empty STREAMING answer.
pub async fn begin_turn(
    conn: &mut AsyncMysqlConnection,
    owner: UserId,
    existing: Option<ConversationId>,
    query: &str,
) -> QueryResult<(ConversationRecord, MessageRecord, MessageRecord)> {
    conn.transaction(async |conn| {
        let conversation_id = match existing {
            Some(id) => id,
            None => {
                let at = now();
                let conversation = ConversationRecord {
                    id: ConversationId::new(),
                    user_id: owner,
                    title: title_from_query(query),
                    is_archived: false,
                    is_pinned: false,
                    dify_conversation_id: None,
                    message_count: 0,
                    created_at: at,
                    updated_at: at,
                };
                conversations_db::insert(conn, &conversation).await?;
                conversation.id
            }
        };
        let question = MessageRecord::new(
            conversation_id,
            MessageRole::User,
            query.to_owned(),
            MessageStatus::Completed,
        );
        let answer = MessageRecord::new(
            conversation_id,
            MessageRole::Assistant,
            String::new(),
            MessageStatus::Streaming,
        );
        conversations_db::insert_messages(conn, &[question.clone(), answer.clone()]).await?;
        conversations_db::touch(conn, conversation_id, 2).await?;
        let conversation = conversations_db::find_owned(conn, conversation_id, owner)
            .await?
            .ok_or(diesel::result::Error::NotFound)?;
        Ok((conversation, question, answer))
    })
    .await
}

/// Dify's ids for the answer, stored as soon as the first frame names them (stop needs the task).
pub async fn record_dify_ids(
    conn: &mut AsyncMysqlConnection,
    id: MessageId,
    message_id: Option<&str>,
    task_id: Option<&str>,
    workflow_run_id: Option<&str>,
) -> QueryResult<()> {
    diesel::update(messages::table.find(id))
        .set((
            messages::dify_message_id.eq(message_id),
            messages::dify_task_id.eq(task_id),
            messages::dify_workflow_run_id.eq(workflow_run_id),
            messages::updated_at.eq(now()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Saves the partial answer; also serves as the heartbeat that keeps the sweeper away.
pub async fn flush(
    conn: &mut AsyncMysqlConnection,
    id: MessageId,
    content: &str,
) -> QueryResult<()> {
    diesel::update(
        messages::table
            .find(id)
            .filter(messages::status.eq(MessageStatus::Streaming)),
    )
    .set((
        messages::content.eq(content),
        messages::updated_at.eq(now()),
    ))
    .execute(conn)
    .await
    .map(drop)
}

/// Marks a stop request, visible to whichever gateway process streams the answer.
pub async fn request_stop(conn: &mut AsyncMysqlConnection, id: MessageId) -> QueryResult<()> {
    diesel::update(
        messages::table
            .find(id)
            .filter(messages::status.eq(MessageStatus::Streaming)),
    )
    .set(messages::stop_requested.eq(true))
    .execute(conn)
    .await
    .map(drop)
}

/// Everything the final write stores.
#[derive(Debug, Clone)]
pub struct FinalAnswer<'a> {
    pub content: &'a str,
    pub status: MessageStatus,
    pub error: Option<String>,
    pub usage: Option<String>,
    pub retriever_resources: Option<String>,
    pub agent_thoughts: Option<String>,
    pub files: Option<String>,
}

/// Writes the answer once at the end. A stop requested from any process turns COMPLETED into
/// STOPPED. `None` when the message is gone (its conversation was deleted meanwhile).
pub async fn finish(
    conn: &mut AsyncMysqlConnection,
    id: MessageId,
    conversation: ConversationId,
    answer: FinalAnswer<'_>,
) -> QueryResult<Option<MessageRecord>> {
    conn.transaction(async |conn| {
        let stop_requested: Option<bool> = messages::table
            .find(id)
            .select(messages::stop_requested)
            .for_update()
            .first(conn)
            .await
            .optional()?;
        let Some(stop_requested) = stop_requested else {
            return Ok(None);
        };
        let status = match answer.status {
            MessageStatus::Completed if stop_requested => MessageStatus::Stopped,
            status => status,
        };
        diesel::update(messages::table.find(id))
            .set((
                messages::content.eq(answer.content),
                messages::status.eq(status),
                messages::error.eq(&answer.error),
                messages::usage.eq(&answer.usage),
                messages::retriever_resources.eq(&answer.retriever_resources),
                messages::agent_thoughts.eq(&answer.agent_thoughts),
                messages::files.eq(&answer.files),
                messages::updated_at.eq(now()),
            ))
            .execute(conn)
            .await?;
        conversations_db::touch(conn, conversation, 0).await?;
        conversations_db::find_message(conn, id).await
    })
    .await
}

/// Answers still STREAMING whose last write is older than `stale_after` belong to a gateway that
/// died: they become INTERRUPTED with what was saved. Safe with several gateways on one
/// database, because a live stream writes at least every `HEARTBEAT`.
pub async fn sweep_interrupted(
    conn: &mut AsyncMysqlConnection,
    stale_after: std::time::Duration,
) -> QueryResult<usize> {
    let cutoff =
        now() - chrono::Duration::from_std(stale_after).unwrap_or(chrono::Duration::minutes(2));
    diesel::update(
        messages::table
            .filter(messages::status.eq(MessageStatus::Streaming))
            .filter(messages::updated_at.lt(cutoff)),
    )
    .set((
        messages::status.eq(MessageStatus::Interrupted),
        messages::updated_at.eq(now()),
    ))
    .execute(conn)
    .await
}
