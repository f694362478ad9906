//! Chat persistence: the turn written before Dify is called, the final write, and the sweep of
//! answers whose gateway went away. Partial answers are written behind by `writer`.

use std::collections::HashMap;

use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Date, Integer, Nullable, Varchar};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};

use crate::apps::AppId;
use crate::conversations::db::{self as conversations_db, ConversationRecord, MessageRecord};
use crate::conversations::domain::{
    ConversationId, MessageId, MessageRole, MessageStatus, title_from_query,
};
use crate::db::schema::{conversations, messages, users};
use crate::db::types::now;
use crate::users::domain::UserId;
use crate::users::quota;

/// Why a turn could not begin.
#[derive(Debug)]
pub enum BeginError {
    /// The account is gone, deactivated, or its tokens were revoked.
    SessionInvalid,
    /// The conversation does not exist or belongs to someone else.
    ConversationNotFound,
    /// The account's token quota for the month is used up, until then.
    QuotaExceeded(chrono::DateTime<chrono::Utc>),
    /// The turn's app refused it (unavailable, another app than the conversation's, inputs).
    Refused(crate::error::AppError),
    /// The conversation's previous answer is still streaming: one turn at a time.
    TurnInProgress(MessageId),
    /// The owner already sent a turn with this `clientMessageId`: its answer, and whether it
    /// was sent with the same query.
    Replay {
        answer: MessageId,
        same_query: bool,
    },
    /// Another turn with the same `clientMessageId` was saved meanwhile (two sends racing).
    ClientMessageIdTaken,
    /// No pooled connection for the turn's check.
    Pool(crate::db::PoolError),
    /// The turn's save found MySQL away, or not answering in time (see `Turns`).
    Unavailable,
    Db(diesel::result::Error),
}

impl From<crate::db::PoolError> for BeginError {
    fn from(error: crate::db::PoolError) -> Self {
        Self::Pool(error)
    }
}

impl From<diesel::result::Error> for BeginError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match error {
            // Message ids are fresh UUIDs: the one unique key a turn can hit is its owner's
            // `clientMessageId`.
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
                Self::ClientMessageIdTaken
            }
            error => Self::Db(error),
        }
    }
}

/// The account (active, token version, quota set, quota, tokens used this period), the
/// conversation if it is the owner's, and an earlier turn of the owner with the same
/// `clientMessageId` (its user message, conversation and query).
type TurnCheck = (
    bool,
    i32,
    Option<i64>,
    bool,
    Option<i64>,
    Option<ConversationRecord>,
    Option<(MessageId, ConversationId, String)>,
);

/// Who starts a turn: the account, the token version of its session, and the token quota that
/// applies when an admin set none (`DEFAULT_TOKEN_QUOTA`); and the gateway that will relay it.
#[derive(Debug, Clone, Copy)]
pub struct Starter {
    pub owner: UserId,
    pub token_version: i32,
    pub default_quota: Option<u64>,
    pub gateway: crate::gateways::GatewayId,
}

/// What a turn's `choose` decided: the app, and the user message's attachments (JSON).
#[derive(Debug, Clone)]
pub struct Chosen {
    pub app: AppId,
    pub question_files: Option<String>,
}

/// A saved turn: its conversation, the user's message and the empty STREAMING answer.
pub type SavedTurn = (ConversationRecord, MessageRecord, MessageRecord);

/// Whether `starter` may take a turn, in one query: the account (active, its session's token
/// version), its token quota, the conversation's owner when `existing` is set, and an earlier
/// turn of the owner with the same `client_message_id` (a retry: [`BeginError::Replay`], and
/// nothing new is saved). The conversation when it is the owner's.
pub async fn check_turn(
    conn: &mut AsyncMysqlConnection,
    starter: Starter,
    existing: Option<ConversationId>,
    query: &str,
    client_message_id: Option<&str>,
) -> Result<Option<ConversationRecord>, BeginError> {
    let period = quota::period_start(now());
    let used_this_period = sql::<Nullable<BigInt>>(
        "(SELECT total_tokens FROM token_usage \
          WHERE token_usage.user_id = users.id AND token_usage.period_start = ",
    )
    .bind::<Date, _>(period)
    .sql(")");
    let (active, version, quota, quota_set, used, found, earlier): TurnCheck = users::table
        .left_join(
            conversations::table.on(conversations::user_id
                .eq(users::id)
                .and(conversations::id.nullable().eq(existing))),
        )
        .left_join(
            messages::table.on(messages::client_owner_id
                .eq(users::id.nullable())
                .and(messages::client_message_id.eq(client_message_id))),
        )
        .filter(users::id.eq(starter.owner))
        .select((
            users::is_active,
            users::token_version,
            users::token_quota,
            users::token_quota_set,
            used_this_period,
            Option::<ConversationRecord>::as_select(),
            (messages::id, messages::conversation_id, messages::content).nullable(),
        ))
        .first(conn)
        .await
        .optional()?
        .ok_or(BeginError::SessionInvalid)?;
    if !active || version != starter.token_version {
        return Err(BeginError::SessionInvalid);
    }
    if let Some((question, conversation, earlier_query)) = earlier {
        let answer = messages::table
            .filter(messages::conversation_id.eq(conversation))
            .filter(messages::id.gt(question))
            .filter(messages::role.eq(MessageRole::Assistant))
            .order(messages::id.asc())
            .select(messages::id)
            .first(conn)
            .await?;
        return Err(BeginError::Replay {
            answer,
            same_query: earlier_query == query,
        });
    }
    if let Some(quota) = quota::effective(quota, quota_set, starter.default_quota)
        && used.unwrap_or(0).max(0) as u64 >= quota
    {
        return Err(BeginError::QuotaExceeded(quota::period_end(period)));
    }
    if existing.is_some() && found.is_none() {
        return Err(BeginError::ConversationNotFound);
    }
    Ok(found)
}

/// A new conversation's first turn, not saved yet (see `Turns`, which saves these in batches).
pub fn first_turn(
    starter: Starter,
    query: &str,
    client_message_id: Option<&str>,
    chosen: Chosen,
) -> SavedTurn {
    let at = now();
    let conversation = ConversationRecord {
        id: ConversationId::new(),
        user_id: starter.owner,
        title: title_from_query(query),
        is_archived: false,
        is_pinned: false,
        dify_conversation_id: None,
        message_count: 2,
        created_at: at,
        updated_at: at,
        app_id: Some(chosen.app),
    };
    let (question, answer) = turn_messages(
        &conversation,
        starter,
        query,
        client_message_id,
        chosen.question_files,
    );
    (conversation, question, answer)
}

/// The user's message and the empty STREAMING answer of a turn in `conversation`.
fn turn_messages(
    conversation: &ConversationRecord,
    starter: Starter,
    query: &str,
    client_message_id: Option<&str>,
    question_files: Option<String>,
) -> (MessageRecord, MessageRecord) {
    let mut question = MessageRecord::new(
        conversation.id,
        MessageRole::User,
        query.to_owned(),
        MessageStatus::Completed,
    );
    question.files = question_files;
    if let Some(key) = client_message_id {
        question.client_message_id = Some(key.to_owned());
        question.client_owner_id = Some(starter.owner);
    }
    let mut answer = MessageRecord::new(
        conversation.id,
        MessageRole::Assistant,
        String::new(),
        MessageStatus::Streaming,
    );
    answer.gateway_id = Some(starter.gateway);
    (question, answer)
}

/// Saves new conversations' first turns in one transaction: one multi-row insert per table.
pub async fn insert_first_turns(
    conn: &mut AsyncMysqlConnection,
    turns: &[&SavedTurn],
) -> QueryResult<()> {
    conn.transaction(async |conn| {
        let conversations: Vec<_> = turns
            .iter()
            .map(|(conversation, ..)| conversation)
            .collect();
        diesel::insert_into(conversations::table)
            .values(conversations)
            .execute(conn)
            .await?;
        let messages: Vec<_> = turns
            .iter()
            .flat_map(|(_, question, answer)| [question, answer])
            .collect();
        diesel::insert_into(messages::table)
            .values(messages)
            .execute(conn)
            .await?;
        Ok(())
    })
    .await
}

/// A later turn of `conversation`, in one transaction on one connection: the checks of
/// [`check_turn`], then the turn's app chosen by `choose` (given the conversation's app; it
/// may refuse the turn), then the conversation locked and touched, refused if an answer still
/// streams in it, and the user's message and an empty STREAMING answer saved.
pub async fn begin_next_turn(
    conn: &mut AsyncMysqlConnection,
    starter: Starter,
    conversation: ConversationId,
    query: &str,
    client_message_id: Option<&str>,
    choose: impl FnOnce(Option<Option<AppId>>) -> Result<Chosen, crate::error::AppError> + Send,
) -> Result<SavedTurn, BeginError> {
    conn.transaction(async |conn| {
        let mut conversation =
            check_turn(conn, starter, Some(conversation), query, client_message_id)
                .await?
                .ok_or(BeginError::ConversationNotFound)?;
        let chosen = choose(Some(conversation.app_id)).map_err(BeginError::Refused)?;
        // Locks the conversation until the turn is saved: a second turn sent at the same time
        // waits here, then finds this one's answer streaming.
        conversations_db::touch(conn, conversation.id, 2).await?;
        if let Some(active) = active_answer(conn, conversation.id, true).await? {
            return Err(BeginError::TurnInProgress(active));
        }
        conversation.message_count += 2;
        conversation.updated_at = now();
        let (question, answer) = turn_messages(
            &conversation,
            starter,
            query,
            client_message_id,
            chosen.question_files,
        );
        conversations_db::insert_messages(conn, &[question.clone(), answer.clone()]).await?;
        Ok((conversation, question, answer))
    })
    .await
}

/// The answer streaming in a conversation now, if any; `lock` reads it as a locking read (the
/// latest committed state, inside a turn's transaction).
pub async fn active_answer(
    conn: &mut AsyncMysqlConnection,
    conversation: ConversationId,
    lock: bool,
) -> QueryResult<Option<MessageId>> {
    let query = messages::table
        .filter(messages::conversation_id.eq(conversation))
        .filter(messages::status.eq(MessageStatus::Streaming))
        .select(messages::id)
        .order(messages::id.desc());
    if lock {
        query.for_update().first(conn).await.optional()
    } else {
        query.first(conn).await.optional()
    }
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

/// Everything the final write of an answer stores.
#[derive(Debug, Clone)]
pub struct FinalAnswer {
    pub id: MessageId,
    pub conversation: ConversationId,
    pub content: String,
    /// The `seq` of the terminal event.
    pub last_seq: i32,
    pub status: MessageStatus,
    pub error: Option<String>,
    pub usage: Option<String>,
    pub retriever_resources: Option<String>,
    pub agent_thoughts: Option<String>,
    pub files: Option<String>,
    /// Dify's ids, also handed to the writer earlier; written here so the final row has them
    /// whatever became of that write.
    pub dify_message_id: Option<String>,
    pub dify_task_id: Option<String>,
    pub dify_workflow_run_id: Option<String>,
    /// The Dify conversation to keep on the conversation, if it has none yet.
    pub dify_conversation_id: Option<String>,
    /// Dify's `total_tokens`, settled against the owner's quota by the writer.
    pub tokens: u64,
}

impl FinalAnswer {
    /// About the bytes its write sends.
    pub fn bytes(&self) -> usize {
        let text = |v: &Option<String>| v.as_ref().map_or(0, String::len);
        self.content.len()
            + text(&self.usage)
            + text(&self.retriever_resources)
            + text(&self.agent_thoughts)
            + text(&self.files)
            + 256
    }
}

/// Writes answers at their end, in three statements whatever their number and no transaction:
/// each is idempotent, so a retry after a failure in between repeats them all. A stop requested
/// from any process turns COMPLETED into STOPPED. Returns what the database decided for each
/// answer still there (an answer whose conversation was deleted meanwhile is missing), not the
/// content just sent.
pub async fn finish(
    conn: &mut AsyncMysqlConnection,
    answers: &[&FinalAnswer],
) -> QueryResult<HashMap<MessageId, StoredAnswer>> {
    use diesel::mysql::Mysql;
    use diesel::sql_types::{Binary, Datetime, Text};
    let at = now();
    let when = " WHEN ? THEN ?".repeat(answers.len());
    let ids = super::writer::placeholders(answers.len());
    let sql = format!(
        "UPDATE messages SET content = CASE id {when} END, last_seq = CASE id {when} END, \
         status = CASE id {status} END, tokens = CASE id {when} END, \
         error = CASE id {when} END, `usage` = CASE id {when} END, retriever_resources = CASE id {when} END, \
         agent_thoughts = CASE id {when} END, files = CASE id {when} END, \
         dify_message_id = CASE id {when} END, dify_task_id = CASE id {when} END, \
         dify_workflow_run_id = CASE id {when} END, updated_at = ? WHERE id IN ({ids})",
        status = " WHEN ? THEN IF(stop_requested AND ?, 'STOPPED', ?)".repeat(answers.len()),
    );
    let mut update = diesel::sql_query(sql).into_boxed::<Mysql>();
    for answer in answers {
        update = update
            .bind::<Binary, _>(answer.id)
            .bind::<Text, _>(&answer.content);
    }
    for answer in answers {
        update = update
            .bind::<Binary, _>(answer.id)
            .bind::<Integer, _>(answer.last_seq);
    }
    for answer in answers {
        update = update
            .bind::<Binary, _>(answer.id)
            .bind::<Bool, _>(answer.status == MessageStatus::Completed)
            .bind::<Varchar, _>(answer.status);
    }
    for answer in answers {
        update = update
            .bind::<Binary, _>(answer.id)
            .bind::<BigInt, _>(i64::try_from(answer.tokens).unwrap_or(i64::MAX));
    }
    let texts: [fn(&FinalAnswer) -> &Option<String>; 8] = [
        |a| &a.error,
        |a| &a.usage,
        |a| &a.retriever_resources,
        |a| &a.agent_thoughts,
        |a| &a.files,
        |a| &a.dify_message_id,
        |a| &a.dify_task_id,
        |a| &a.dify_workflow_run_id,
    ];
    for column in texts {
        for answer in answers {
            update = update
                .bind::<Binary, _>(answer.id)
                .bind::<Nullable<Text>, _>(column(answer));
        }
    }
    update = update.bind::<Datetime, _>(at);
    for answer in answers {
        update = update.bind::<Binary, _>(answer.id);
    }
    update.execute(conn).await?;

    // Moves the conversations up the list and keeps their first Dify conversation id.
    let sql = format!(
        "UPDATE conversations SET updated_at = ?, \
         dify_conversation_id = COALESCE(dify_conversation_id, CASE id {when} END) \
         WHERE id IN ({ids})"
    );
    let mut touch = diesel::sql_query(sql)
        .into_boxed::<Mysql>()
        .bind::<Datetime, _>(at);
    for answer in answers {
        touch = touch
            .bind::<Binary, _>(answer.conversation)
            .bind::<Nullable<Text>, _>(&answer.dify_conversation_id);
    }
    for answer in answers {
        touch = touch.bind::<Binary, _>(answer.conversation);
    }
    touch.execute(conn).await?;

    let stored: Vec<(MessageId, StoredAnswer)> = messages::table
        .filter(messages::id.eq_any(answers.iter().map(|answer| answer.id)))
        .select((messages::id, StoredAnswer::as_select()))
        .load(conn)
        .await?;
    Ok(stored.into_iter().collect())
}

/// The columns of a finished answer that its final write does not set itself.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = messages, check_for_backend(diesel::mysql::Mysql))]
pub struct StoredAnswer {
    pub status: MessageStatus,
    pub feedback: Option<crate::conversations::domain::Rating>,
    pub created_at: chrono::NaiveDateTime,
    pub updated_at: chrono::NaiveDateTime,
}

/// Answers still STREAMING whose last write is older than `stale_after` belong to a gateway that
/// died: they become INTERRUPTED with what was saved, and the error `interrupted`. Safe with
/// several gateways on one database, because a live stream writes at least every `HEARTBEAT`.
pub async fn sweep_interrupted(
    conn: &mut AsyncMysqlConnection,
    stale_after: std::time::Duration,
) -> QueryResult<usize> {
    let cutoff =
        now() - chrono::Duration::from_std(stale_after).unwrap_or(chrono::Duration::minutes(2));
    interrupt(conn, Dead::WrittenBefore(cutoff)).await
}

/// The answers STREAMING in `gateway`, whose lease expired: it died, and they become
/// INTERRUPTED as in [`sweep_interrupted`], at once.
pub async fn interrupt_gateway(
    conn: &mut AsyncMysqlConnection,
    gateway: crate::gateways::GatewayId,
) -> QueryResult<usize> {
    interrupt(conn, Dead::RelayedBy(gateway)).await
}

/// Answers saved for chats that went away before their relay started (see `Turns`): nobody
/// streams them, and they become INTERRUPTED as in [`sweep_interrupted`], at once.
pub async fn interrupt_abandoned(
    conn: &mut AsyncMysqlConnection,
    answers: &[MessageId],
) -> QueryResult<usize> {
    interrupt(conn, Dead::Abandoned(answers)).await
}

/// Which STREAMING answers nobody relays any more.
enum Dead<'a> {
    WrittenBefore(chrono::NaiveDateTime),
    RelayedBy(crate::gateways::GatewayId),
    Abandoned(&'a [MessageId]),
}

async fn interrupt(conn: &mut AsyncMysqlConnection, dead: Dead<'_>) -> QueryResult<usize> {
    let update = diesel::update(messages::table)
        .filter(messages::status.eq(MessageStatus::Streaming))
        .set((
            messages::status.eq(MessageStatus::Interrupted),
            messages::error.eq(INTERRUPTED_ERROR),
            // The INTERRUPTED answer's terminal event, sent to whoever resumes it, is the next.
            messages::last_seq.eq(sql::<Nullable<Integer>>("COALESCE(last_seq, 0) + 1")),
            messages::updated_at.eq(now()),
        ))
        .into_boxed();
    let update = match dead {
        Dead::WrittenBefore(cutoff) => update.filter(messages::updated_at.lt(cutoff)),
        Dead::RelayedBy(gateway) => update.filter(messages::gateway_id.eq(gateway)),
        Dead::Abandoned(answers) => update.filter(messages::id.eq_any(answers)),
    };
    update.execute(conn).await
}

/// The stored error of an answer whose gateway went away mid-stream.
const INTERRUPTED_ERROR: &str = r#"{"code":"interrupted","message":"the gateway relaying this answer stopped before it ended; the answer keeps what was saved","status":null}"#;
