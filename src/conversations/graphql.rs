//! `Conversation`, `Message` and their queries and mutations. Every id is checked against the
//! signed-in user: someone else's conversation or message is `NOT_FOUND`.

use async_graphql::{ComplexObject, Context, ID, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::apps::AppId;
use crate::apps::graphql::DifyApp;
use crate::conversations::db::{
    self, ConversationChange, ConversationFilter, ConversationKey, ConversationRecord,
    MessageRecord, like_pattern,
};
use crate::conversations::domain::{
    ConversationId, MessageId, MessageRole, MessageStatus, Rating, clean_title,
};
use crate::db::types::utc;
use crate::dify::events as dify;
use crate::error::{AppError, AppResult};
use crate::graphql::context::ContextExt;
use crate::graphql::pagination::{Page, build_page, decode_cursor, page_size};
use crate::users::db::UserRecord;

/// A chat with the Dify app: its messages and how it is filed.
#[derive(SimpleObject, Clone, Serialize, Deserialize)]
#[graphql(complex)]
pub struct Conversation {
    /// The conversation's id.
    pub id: ID,
    /// The title: the first query, until renamed.
    pub title: String,
    /// Archived conversations are listed only with `conversations(archived: true)`.
    pub is_archived: bool,
    /// Pinned conversations come first in the list.
    pub is_pinned: bool,
    /// How many messages (queries and answers) the conversation has.
    pub message_count: i32,
    /// When the conversation was started.
    pub created_at: DateTime<Utc>,
    /// Moves with every new message.
    pub updated_at: DateTime<Utc>,
    #[graphql(skip)]
    pub record_id: ConversationId,
    #[graphql(skip)]
    pub app_id: Option<AppId>,
}

impl From<&ConversationRecord> for Conversation {
    fn from(c: &ConversationRecord) -> Self {
        Self {
            id: c.id.into(),
            title: c.title.clone(),
            is_archived: c.is_archived,
            is_pinned: c.is_pinned,
            message_count: c.message_count,
            created_at: utc(c.created_at),
            updated_at: utc(c.updated_at),
            record_id: c.id,
            app_id: c.app_id,
        }
    }
}

#[ComplexObject]
impl Conversation {
    /// The answer streaming in this conversation now, if any: what a reloaded page follows. It
    /// becomes null once the answer's final row is written, before its terminal event. A turn
    /// sent while it is set is refused (`CONFLICT`, with `extensions.activeMessageId`).
    async fn active_message_id(&self, ctx: &Context<'_>) -> AppResult<Option<ID>> {
        let mut conn = ctx.app().db.get().await?;
        Ok(
            crate::chat::db::active_answer(&mut conn, self.record_id, false)
                .await?
                .map(ID::from),
        )
    }

    /// The app the conversation belongs to; null once that app was deleted (the conversation
    /// stays readable and takes no new turns). Disabled apps are shown to their conversations'
    /// owners too.
    async fn app(&self, ctx: &Context<'_>) -> AppResult<Option<DifyApp>> {
        let apps = ctx.app().apps().await?;
        let app = match self.app_id {
            Some(id) => apps.get(id),
            None => apps.default_app(),
        };
        Ok(app.map(DifyApp::from))
    }

    /// The conversation's messages, oldest first. Page forward with `first`/`after` or backward
    /// with `last`/`before` (e.g. `last: 20` for the newest twenty); the default is `first: 20`.
    #[graphql(complexity = "crate::graphql::limits::page_cost(first, last, child_complexity)")]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        last: Option<i32>,
        before: Option<String>,
    ) -> AppResult<Page<Message>> {
        message_page(
            ctx,
            self.record_id,
            self.message_count,
            first,
            after,
            last,
            before,
        )
        .await
    }
}

/// Why an answer failed.
#[derive(SimpleObject, Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatError {
    /// Dify's error code (e.g. `completion_request_error`), or rechat's own
    /// (`upstream_unavailable`, `stream_interrupted`, `workflow_failed`).
    pub code: String,
    /// A readable explanation.
    pub message: String,
    /// Dify's HTTP status, when Dify gave one.
    pub status: Option<i32>,
}

/// Token usage and cost of an answer, as Dify reported it.
#[derive(SimpleObject, Clone, Serialize, Deserialize, Debug, Default, PartialEq)]
#[serde(default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: i64,
    /// Tokens in the answer.
    pub completion_tokens: i64,
    /// Prompt and answer tokens together.
    pub total_tokens: i64,
    /// The price as a decimal string, as Dify sends it.
    pub total_price: Option<String>,
    /// The price's currency, e.g. USD.
    pub currency: Option<String>,
    /// Seconds Dify took.
    pub latency: Option<f64>,
}

/// A knowledge-base passage the answer drew on.
#[derive(SimpleObject, Clone, Serialize, Deserialize, Debug, PartialEq)]
pub struct RetrieverResource {
    /// Citation number.
    pub position: Option<i32>,
    /// The knowledge base's id.
    pub dataset_id: Option<String>,
    /// The knowledge base's name.
    pub dataset_name: Option<String>,
    /// The document's id.
    pub document_id: Option<String>,
    /// The document's name.
    pub document_name: Option<String>,
    /// The passage's id.
    pub segment_id: Option<String>,
    /// Relevance score.
    pub score: Option<f64>,
    /// The passage text.
    pub content: Option<String>,
}

/// One reasoning/tool step of an agent app.
#[derive(SimpleObject, Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AgentThought {
    /// The thought's id (Dify re-sends the same id as the step fills in).
    pub id: ID,
    /// The step's number, from 1.
    pub position: i32,
    /// The agent's reasoning text.
    pub thought: String,
    /// The tool(s) called, `;`-separated.
    pub tool: Option<String>,
    /// The tool input as JSON text.
    pub tool_input: Option<String>,
    /// What the tool returned.
    pub observation: Option<String>,
    /// Ids of files the step produced.
    pub files: Vec<String>,
}

/// A file attached to an answer (e.g. an image a tool produced).
#[derive(SimpleObject, Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MessageFile {
    /// The file's id.
    pub id: ID,
    /// The kind of file, e.g. `image`.
    #[graphql(name = "type")]
    #[serde(rename = "type")]
    pub kind: String,
    /// Where to fetch it.
    pub url: Option<String>,
    /// `assistant` or `user`.
    pub belongs_to: Option<String>,
}

/// A query or an answer.
#[derive(SimpleObject, Clone, Serialize, Deserialize)]
pub struct Message {
    /// The message's id.
    pub id: ID,
    /// The conversation it belongs to.
    pub conversation_id: ID,
    /// Who wrote it.
    pub role: MessageRole,
    /// The text; for an answer still streaming, what has been saved so far.
    pub content: String,
    /// Where the message is in its life.
    pub status: MessageStatus,
    /// Set when status is FAILED.
    pub error: Option<ChatError>,
    /// Assistant messages: tokens and cost, from Dify.
    pub usage: Option<Usage>,
    /// Knowledge-base passages the answer cites.
    pub retriever_resources: Vec<RetrieverResource>,
    /// Agent apps: the reasoning and tool steps.
    pub agent_thoughts: Vec<AgentThought>,
    /// Files attached to the answer.
    pub files: Vec<MessageFile>,
    /// The user's rating, if any.
    pub feedback: Option<Rating>,
    /// When the message was created.
    pub created_at: DateTime<Utc>,
    /// When the message last changed.
    pub updated_at: DateTime<Utc>,
    /// User messages: the idempotency key the turn was sent with (`ChatInput.clientMessageId`).
    pub client_message_id: Option<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &Option<String>) -> Option<T> {
    text.as_deref().and_then(|t| serde_json::from_str(t).ok())
}

/// A stored value of Dify's: written as rechat's type, which has Dify's field names; rows from
/// before hold Dify's JSON as it came, and what of it does not fit the type is read as the
/// stream is (`read`).
fn parse_dify<T: serde::de::DeserializeOwned>(
    text: &Option<String>,
    read: impl FnOnce(&Value) -> Option<T>,
) -> Option<T> {
    parse_json(text).or_else(|| read(&parse_json::<Value>(text)?))
}

impl From<dify::AgentThought> for AgentThought {
    fn from(t: dify::AgentThought) -> Self {
        Self {
            id: t.id.into(),
            position: t.position,
            thought: t.thought,
            tool: t.tool,
            tool_input: t.tool_input,
            observation: t.observation,
            files: t.files,
        }
    }
}

impl From<dify::MessageFile> for MessageFile {
    fn from(f: dify::MessageFile) -> Self {
        Self {
            id: f.id.into(),
            kind: f.kind,
            url: f.url,
            belongs_to: f.belongs_to,
        }
    }
}

impl From<dify::Usage> for Usage {
    fn from(u: dify::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            total_price: u.total_price,
            currency: u.currency,
            latency: u.latency,
        }
    }
}

impl From<dify::RetrieverResource> for RetrieverResource {
    fn from(r: dify::RetrieverResource) -> Self {
        Self {
            position: r.position,
            dataset_id: r.dataset_id,
            dataset_name: r.dataset_name,
            document_id: r.document_id,
            document_name: r.document_name,
            segment_id: r.segment_id,
            score: r.score,
            content: r.content,
        }
    }
}

impl From<MessageRecord> for Message {
    fn from(m: MessageRecord) -> Self {
        let usage = parse_dify(&m.usage, |v| dify::Usage::from_dify(v).map(Usage::from));
        let retriever_resources = parse_dify(&m.retriever_resources, |v| {
            let items = v.as_array()?.iter();
            Some(
                items
                    .filter_map(dify::RetrieverResource::from_dify)
                    .map(RetrieverResource::from)
                    .collect(),
            )
        })
        .unwrap_or_default();
        Self {
            id: m.id.into(),
            conversation_id: m.conversation_id.into(),
            role: m.role,
            status: m.status,
            error: parse_json(&m.error),
            usage,
            retriever_resources,
            agent_thoughts: parse_json(&m.agent_thoughts).unwrap_or_default(),
            files: parse_json(&m.files).unwrap_or_default(),
            feedback: m.feedback,
            created_at: utc(m.created_at),
            updated_at: utc(m.updated_at),
            client_message_id: m.client_message_id,
            content: m.content,
        }
    }
}

/// Changes to a conversation; omitted fields stay as they are.
#[derive(InputObject)]
pub struct UpdateConversationInput {
    /// A new title, 1 to 255 characters after trimming; also renamed in Dify.
    pub title: Option<String>,
    /// Archive (hide from the default list) or restore.
    pub is_archived: Option<bool>,
    /// Pin to the top of the list, or unpin.
    pub is_pinned: Option<bool>,
}

pub async fn owned_conversation(
    ctx: &Context<'_>,
    user: &UserRecord,
    id: ConversationId,
) -> AppResult<ConversationRecord> {
    let mut conn = ctx.app().db.get().await?;
    db::find_owned(&mut conn, id, user.id)
        .await?
        .ok_or(AppError::NotFound("conversation"))
}

async fn message_page(
    ctx: &Context<'_>,
    conversation: ConversationId,
    total: i32,
    first: Option<i32>,
    after: Option<String>,
    last: Option<i32>,
    before: Option<String>,
) -> AppResult<Page<Message>> {
    let (forward, limit, cursor) = match (first, last) {
        (Some(_), Some(_)) => {
            return Err(AppError::bad_input("last", "give first or last, not both"));
        }
        (_, Some(_)) if after.is_some() => {
            return Err(AppError::bad_input(
                "after",
                "page backward with last and before",
            ));
        }
        (Some(_), _) | (None, None) if before.is_some() => {
            return Err(AppError::bad_input(
                "before",
                "page forward with first and after",
            ));
        }
        (_, Some(last)) => (false, page_size("last", last)?, before),
        (first, None) => (true, page_size("first", first.unwrap_or(20))?, after),
    };
    let field = if forward { "after" } else { "before" };
    let cursor = cursor
        .map(|c| decode_cursor::<MessageId>(field, &c))
        .transpose()?;
    let mut conn = ctx.app().db.get().await?;
    let mut rows = db::message_page(&mut conn, conversation, forward, cursor, limit + 1).await?;
    if !forward {
        rows.reverse();
    }
    Ok(build_page(
        rows,
        limit,
        forward,
        cursor.is_some(),
        i64::from(total),
        |m| m.id,
        Message::from,
    ))
}

#[derive(Default)]
pub struct ConversationQuery;

#[Object]
impl ConversationQuery {
    /// Your conversations: pinned first, then most recent activity. Archived ones only with
    /// `archived: true`. `search` matches titles and message text (case-insensitive substring).
    #[graphql(complexity = "crate::graphql::limits::page_cost(first, None, child_complexity)")]
    async fn conversations(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(20)", desc = "Page size, 1 to 100.")] first: Option<i32>,
        #[graphql(desc = "The `endCursor` of the previous page.")] after: Option<String>,
        #[graphql(
            default_with = "Some(false)",
            desc = "List archived conversations instead of the others."
        )]
        archived: Option<bool>,
        #[graphql(desc = "Words to look for in titles and messages (at most 200 characters).")]
        search: Option<String>,
        #[graphql(desc = "Only the conversations of this app.")] app_id: Option<ID>,
    ) -> AppResult<Page<Conversation>> {
        let app = app_id.map(|id| AppId::parse("appId", &id)).transpose()?;
        let user = ctx.user()?;
        let limit = page_size("first", first.unwrap_or(20))?;
        let archived = archived.unwrap_or(false);
        let after = after
            .map(|c| decode_cursor::<ConversationKey>("after", &c))
            .transpose()?;
        let search = search
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        if search.as_ref().is_some_and(|s| s.chars().count() > 200) {
            return Err(AppError::bad_input(
                "search",
                "search for at most 200 characters",
            ));
        }
        let pattern = search.as_deref().map(like_pattern);
        let filter = ConversationFilter {
            owner: user.id,
            archived,
            search: pattern.as_deref(),
            app,
        };
        let mut conn = ctx.app().db.get().await?;
        let rows = db::page(&mut conn, &filter, after, limit + 1).await?;
        let total = db::count(&mut conn, &filter).await?;
        Ok(build_page(
            rows,
            limit,
            true,
            after.is_some(),
            total,
            |c: &ConversationRecord| ConversationKey::from(c),
            |c| Conversation::from(&c),
        ))
    }

    /// One of your conversations; null when it does not exist or is not yours.
    async fn conversation(&self, ctx: &Context<'_>, id: ID) -> AppResult<Option<Conversation>> {
        let user = ctx.user()?;
        let id = ConversationId::parse("id", &id)?;
        match owned_conversation(ctx, user, id).await {
            Ok(c) => Ok(Some((&c).into())),
            Err(AppError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The messages of one of your conversations, oldest first (see `Conversation.messages`).
    #[graphql(complexity = "crate::graphql::limits::page_cost(first, last, child_complexity)")]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        conversation_id: ID,
        first: Option<i32>,
        after: Option<String>,
        last: Option<i32>,
        before: Option<String>,
    ) -> AppResult<Page<Message>> {
        let user = ctx.user()?;
        let id = ConversationId::parse("conversationId", &conversation_id)?;
        let conversation = owned_conversation(ctx, user, id).await?;
        message_page(
            ctx,
            id,
            conversation.message_count,
            first,
            after,
            last,
            before,
        )
        .await
    }

    /// One of your messages; null when it does not exist or is not yours.
    async fn message(&self, ctx: &Context<'_>, id: ID) -> AppResult<Option<Message>> {
        let user = ctx.user()?;
        let id = MessageId::parse("id", &id)?;
        let mut conn = ctx.app().db.get().await?;
        Ok(db::find_message_owned(&mut conn, id, user.id)
            .await?
            .map(|(message, _)| Message::from(message)))
    }
}

#[derive(Default)]
pub struct ConversationMutation;

#[Object]
impl ConversationMutation {
    /// Renames, archives or pins one of your conversations. A rename is also sent to Dify; if
    /// Dify fails, that is logged and the local rename stands.
    async fn update_conversation(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: UpdateConversationInput,
    ) -> AppResult<Conversation> {
        let user = ctx.user()?;
        let id = ConversationId::parse("id", &id)?;
        let change = ConversationChange {
            title: input.title.as_deref().map(clean_title).transpose()?,
            is_archived: input.is_archived,
            is_pinned: input.is_pinned,
        };
        let app = ctx.app();
        let mut conn = app.db.get().await?;
        let conversation = db::update(&mut conn, id, user.id, &change)
            .await?
            .ok_or(AppError::NotFound("conversation"))?;
        drop(conn);
        if let (Some(title), Some(dify_id)) = (&change.title, &conversation.dify_conversation_id) {
            match app.dify_of(conversation.app_id).await {
                Ok(Some(dify)) => {
                    if let Err(error) = dify
                        .client
                        .rename_conversation(dify_id, title, &crate::chat::dify_user(user.id))
                        .await
                    {
                        tracing::warn!(conversation.id = %id, %error, "renaming the conversation in Dify failed");
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(conversation.id = %id, error = error.message(), "renaming in Dify skipped")
                }
            }
        }
        Ok((&conversation).into())
    }

    /// Deletes one of your conversations and its messages, here and in Dify. A running answer
    /// is stopped first. If Dify fails, that is logged and the local delete still happens.
    async fn delete_conversation(&self, ctx: &Context<'_>, id: ID) -> AppResult<ID> {
        let user = ctx.user()?;
        let id = ConversationId::parse("id", &id)?;
        let app = ctx.app();
        let conversation = owned_conversation(ctx, user, id).await?;
        let dify = app.dify_of(conversation.app_id).await?;
        let mut conn = app.db.get().await?;
        for message in db::streaming_messages(&mut conn, id).await? {
            crate::chat::stop_message(app, dify.as_ref(), user.id, &message).await;
        }
        conn.transaction::<_, AppError, _>(async |conn| Ok(db::delete(conn, id).await?))
            .await?;
        drop(conn);
        if let (Some(dify), Some(dify_id)) = (dify, &conversation.dify_conversation_id)
            && let Err(error) = dify
                .client
                .delete_conversation(dify_id, &crate::chat::dify_user(user.id))
                .await
        {
            tracing::warn!(conversation.id = %id, %error, "deleting the conversation in Dify failed");
        }
        tracing::info!(conversation.id = %id, "conversation deleted");
        Ok(id.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversations::domain::{ConversationId, MessageRole, MessageStatus};

    fn stored(usage: &str, resources: &str) -> Message {
        let mut record = MessageRecord::new(
            ConversationId::new(),
            MessageRole::Assistant,
            "a".into(),
            MessageStatus::Completed,
        );
        record.usage = Some(usage.into());
        record.retriever_resources = Some(resources.into());
        record.into()
    }

    #[test]
    fn stored_usage_reads_as_written_and_as_dify_sent_it_before() {
        let usage = Usage {
            prompt_tokens: 12,
            completion_tokens: 3,
            total_tokens: 15,
            total_price: Some("0.5".into()),
            currency: Some("USD".into()),
            latency: Some(1.5),
        };
        let resource = RetrieverResource {
            position: Some(1),
            dataset_id: None,
            dataset_name: None,
            document_id: None,
            document_name: Some("a.pdf".into()),
            segment_id: None,
            score: Some(0.9),
            content: None,
        };
        // As the final write stores them now.
        let written = stored(
            &serde_json::to_string(&usage).unwrap(),
            &serde_json::to_string(&[&resource]).unwrap(),
        );
        assert_eq!(written.usage.as_ref(), Some(&usage));
        assert_eq!(written.retriever_resources, std::slice::from_ref(&resource));
        // Rows from before: Dify's JSON as it came, with its extra fields, numbers sent as
        // text, and a workflow's bare token count.
        let dify = stored(
            r#"{"prompt_tokens":"12","prompt_unit_price":"0.1","completion_tokens":3,"total_tokens":15,"total_price":0.5,"currency":"USD","latency":1.5}"#,
            r#"[{"position":"1","document_name":"a.pdf","score":"0.9","hit_count":3}]"#,
        );
        assert_eq!(dify.usage.as_ref(), Some(&usage));
        assert_eq!(dify.retriever_resources, [resource]);
        let workflow = stored(r#"{"total_tokens":24}"#, "[]");
        assert_eq!(workflow.usage.map(|u| u.total_tokens), Some(24));
        assert!(stored("not json", "{}").usage.is_none());
    }
}
