//! The `chat` subscription, `stopChat` and `setMessageFeedback`.

use async_graphql::{Context, ID, InputObject, Json, Object, Subscription};
use serde_json::Value;

use super::db::{BeginError, Chosen, Starter};
use super::log::{AnswerLog, ChatStream};
use super::relay::{self, Turn};
use super::resume::resume;
use super::{Registration, dify_user, stop_message};
use crate::apps::{AppId, Dify};
use crate::conversations::db as conversations_db;
use crate::conversations::domain::{ConversationId, MessageId, MessageRole, Rating};
use crate::conversations::graphql::Message;
use crate::dify::AppMode;
use crate::dify::client::{ChatRequest, WORKFLOW_QUERY_INPUT};
use crate::error::{AppError, AppResult, SESSION_INVALID};
use crate::files::graphql::{ChatFileInput, TurnFiles, input_files};
use crate::graphql::context::ContextExt;

/// The longest query accepted, in characters.
pub const QUERY_MAX_CHARS: usize = 32_000;
/// The largest `inputs` accepted, as JSON.
pub const INPUTS_MAX_BYTES: usize = 64 * 1024;

/// A chat turn.
#[derive(InputObject)]
pub struct ChatInput {
    /// The conversation to continue; omit to start a new one.
    pub conversation_id: Option<ID>,
    /// What the user asks (1 to 32000 characters). Workflow apps receive it as the input
    /// variable `query`, unless `inputs` sets `query` itself.
    pub query: String,
    /// The Dify app's input variables, keyed by variable name; default `{}`; at most 64 KiB as
    /// JSON. Checked against the app's `userInputForm` before anything is saved.
    pub inputs: Option<Json<Value>>,
    /// The app of a new conversation; the default app when omitted. A conversation keeps its
    /// app: another id on a later turn is `BAD_USER_INPUT`.
    pub app_id: Option<ID>,
    /// Attachments, checked against the app's `fileUpload` settings; listed in the user
    /// message's `files`.
    pub files: Option<Vec<ChatFileInput>>,
    /// An idempotency key for the turn: 1 to 64 of `A-Z a-z 0-9 _ -`, unique among your
    /// turns. Sending again with a key already used for the same query starts nothing new and
    /// streams that turn as `resumeChat(messageId, afterSeq: 0)` does; with another query it is
    /// `CONFLICT`. Retry a send whose socket dropped with the same key.
    pub client_message_id: Option<String>,
}

/// The longest `clientMessageId`.
pub const CLIENT_MESSAGE_ID_MAX: usize = 64;

#[derive(Default)]
pub struct ChatSubscription;

#[Subscription]
impl ChatSubscription {
    /// Sends a query to the Dify app and streams the answer: `ChatStarted` first, then Dify's
    /// events in order, then `ChatCompleted` or `ChatFailed`, and the subscription completes.
    /// The turn is saved before Dify is called and the answer is saved even if you disconnect.
    /// Problems found before anything is saved are GraphQL errors; every Dify failure (including
    /// Dify refusing the request) arrives as `ChatFailed`.
    async fn chat(&self, ctx: &Context<'_>, input: ChatInput) -> async_graphql::Result<ChatStream> {
        // The macro recognises a fallible stream only by the name `Result`, hence the wrapper.
        // Boxed: async-graphql keeps this resolver's state for as long as the subscription
        // runs, and the start's 5 KiB of it would stay with every stream.
        Ok(Box::pin(start(ctx, input)).await?)
    }

    /// Re-attaches to one of your answers, after a reload or a dropped socket: every event with
    /// `seq > afterSeq` exactly as first sent, then the live ones, then the terminal event, and
    /// the subscription completes. Where some of the missed events are no longer kept
    /// (`RESUME_BUFFER_BYTES`) the first event is a `ChatSnapshot` of the answer up to its
    /// `seq`. On an answer that ended: a `ChatSnapshot` of the answer as stored (unless
    /// `afterSeq` is past it) and the original terminal event. `NOT_FOUND` for someone else's
    /// message.
    async fn resume_chat(
        &self,
        ctx: &Context<'_>,
        message_id: ID,
        #[graphql(
            default = 0,
            desc = "The `seq` of the last event you have; 0 (or null) for everything."
        )]
        after_seq: Option<i32>,
    ) -> async_graphql::Result<ChatStream> {
        let viewer = ctx.user()?;
        let id = MessageId::parse("messageId", &message_id)?;
        let after_seq = after_seq.unwrap_or(0);
        if after_seq < 0 {
            return Err(AppError::bad_input("afterSeq", "afterSeq must be 0 or more").into());
        }
        Ok(Box::pin(resume(ctx.app(), viewer.id, id, after_seq)).await?)
    }
}

/// The inputs a workflow app receives: the query goes in as the variable `query` unless the
/// inputs set it (see `ChatInput.query`).
fn with_workflow_query(
    mode: AppMode,
    inputs: &serde_json::Map<String, Value>,
    query: &str,
) -> serde_json::Map<String, Value> {
    let mut inputs = inputs.clone();
    if mode == AppMode::Workflow {
        inputs
            .entry(WORKFLOW_QUERY_INPUT)
            .or_insert_with(|| Value::String(query.to_owned()));
    }
    inputs
}

/// Checks everything, saves the turn and spawns the relay; the stream is the relay's events.
async fn start(ctx: &Context<'_>, input: ChatInput) -> AppResult<ChatStream> {
    let started = std::time::Instant::now();
    let app = ctx.app().clone();
    let viewer = ctx.user()?;
    let query = input.query.trim().to_owned();
    if query.is_empty() || query.chars().count() > QUERY_MAX_CHARS {
        return Err(AppError::bad_input(
            "query",
            format!("the query must have 1 to {QUERY_MAX_CHARS} characters"),
        ));
    }
    let inputs = match input.inputs.map(|j| j.0) {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(AppError::bad_input(
                "inputs",
                "inputs must be a JSON object",
            ));
        }
    };
    if serde_json::to_string(&inputs).map_or(true, |text| text.len() > INPUTS_MAX_BYTES) {
        return Err(AppError::bad_input(
            "inputs",
            format!(
                "inputs may take at most {} KiB as JSON",
                INPUTS_MAX_BYTES / 1024
            ),
        ));
    }
    let conversation_id = input
        .conversation_id
        .map(|id| ConversationId::parse("conversationId", &id))
        .transpose()?;
    let requested_app = input
        .app_id
        .map(|id| AppId::parse("appId", &id))
        .transpose()?;
    let client_message_id = input.client_message_id;
    if let Some(key) = &client_message_id {
        let valid = (1..=CLIENT_MESSAGE_ID_MAX).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(AppError::bad_input(
                "clientMessageId",
                format!(
                    "clientMessageId must have 1 to {CLIENT_MESSAGE_ID_MAX} of A-Z a-z 0-9 _ -"
                ),
            ));
        }
        // A retry while the turn's answer streams here: no limit applies, nothing is read.
        if let Some((answer, same_query)) = app.streams.by_client(viewer.id, key, &query) {
            return replay(&app, viewer.id, answer, same_query).await;
        }
    }

    let config = &app.config;
    app.throttles
        .turns
        .take(&viewer.id, config.chat_turns_per_minute)
        .await
        .map_err(|retry_after| AppError::RateLimited { retry_after })?;
    let max_active = config.max_active_answers_per_user;
    let slot = app
        .reserve_answer(viewer.id, max_active)
        .await
        .ok_or_else(|| AppError::LimitExceeded {
            limit: "MAX_ACTIVE_ANSWERS_PER_USER",
            max: max_active.into(),
            message: format!(
                "you have {max_active} answers streaming already; wait for one to end"
            ),
        })?;

    // A WebSocket can outlive its token: the account is checked again at each turn, in the same
    // query that checks the token quota and the conversation's owner.
    let starter = Starter {
        owner: viewer.id,
        token_version: viewer.token_version,
        default_quota: config.default_token_quota,
        gateway: app.gateway,
    };
    let begin = async {
        let apps = app.apps().await?;
        let files =
            TurnFiles::load(&app, viewer.id, input.files.unwrap_or_default(), "files").await?;
        let input_files = TurnFiles::load(&app, viewer.id, input_files(&inputs), "inputs").await?;
        let mut retried = false;
        loop {
            let mut chosen = None;
            // Inside the turn's transaction, once the conversation's app is known: the app must
            // take turns, and the inputs must fit its form.
            let choose = |conversation_app| {
                let (loaded, dify) = apps.for_turn(conversation_app, requested_app)?;
                if let Some(parameters) = &loaded.parameters {
                    parameters.check_inputs(&with_workflow_query(dify.mode, &inputs, &query))?;
                }
                let (dify_files, listed) = files.for_app(loaded)?;
                let mut inputs = inputs.clone();
                input_files.fill_inputs(loaded, &mut inputs)?;
                chosen = Some((dify.clone(), dify_files, inputs));
                Ok(Chosen {
                    app: dify.id,
                    question_files: (!listed.is_empty())
                        .then(|| serde_json::to_string(&listed).ok())
                        .flatten(),
                })
            };
            let began = app
                .turns
                .begin(
                    starter,
                    conversation_id,
                    &query,
                    client_message_id.as_deref(),
                    choose,
                )
                .await;
            let error = match began {
                Ok(turn) => {
                    let (dify, dify_files, inputs) = chosen.expect("a turn that began has its app");
                    return Ok(Began::Turn(Box::new(NewTurn {
                        dify,
                        dify_files,
                        inputs,
                        saved: turn,
                    })));
                }
                Err(BeginError::Replay { answer, same_query }) => {
                    return Ok(Began::Replay { answer, same_query });
                }
                Err(error) => error,
            };
            // A send racing with this one saved the same key first (its turn holds the key, or
            // the conversation): once more, this time finding that turn.
            let raced = matches!(
                error,
                BeginError::ClientMessageIdTaken | BeginError::TurnInProgress(_)
            );
            if raced && client_message_id.is_some() && !std::mem::replace(&mut retried, true) {
                continue;
            }
            return Err(match error {
                BeginError::SessionInvalid => AppError::Unauthenticated(SESSION_INVALID),
                BeginError::ConversationNotFound => AppError::NotFound("conversation"),
                BeginError::QuotaExceeded(resets_at) => AppError::QuotaExceeded { resets_at },
                BeginError::Refused(error) => error,
                BeginError::TurnInProgress(active) => AppError::TurnInProgress { active },
                BeginError::ClientMessageIdTaken => CLIENT_MESSAGE_ID_REUSED,
                BeginError::Replay { .. } => unreachable!("returned above"),
                BeginError::Pool(error) => error.into(),
                BeginError::Unavailable => AppError::Unavailable,
                BeginError::Db(error) => error.into(),
            });
        }
    };
    // Nothing is sent to Dify before the turn is saved; a database that does not answer in time
    // is an outage for this turn, not a hang.
    let began = tokio::time::timeout(config.operation_timeout, begin)
        .await
        .map_err(|_| AppError::Unavailable)??;
    let (dify, dify_files, inputs, (conversation, question, answer)) = match began {
        Began::Turn(turn) => {
            let NewTurn {
                dify,
                dify_files,
                inputs,
                saved,
            } = *turn;
            app.metrics
                .turn_start_seconds
                .observe(started.elapsed().as_secs_f64());
            (dify, dify_files, inputs, saved)
        }
        Began::Replay { answer, same_query } => {
            // A retry, not a turn.
            drop(slot);
            app.throttles.turns.give_back(&viewer.id).await;
            return replay(&app, viewer.id, answer, same_query).await;
        }
    };
    let request = ChatRequest {
        query,
        inputs,
        user: dify_user(viewer.id),
        conversation_id: conversation
            .dify_conversation_id
            .clone()
            .filter(|_| dify.mode.has_conversations()),
        files: dify_files,
    };
    let span = tracing::info_span!("chat", message.id = %answer.id, conversation.id = %conversation.id, user.id = %viewer.id);
    let log = AnswerLog::new(viewer.id, config.resume_buffer_bytes);
    let events = log.subscribe(0);
    let registration = Registration {
        id: answer.id,
        log: log.clone(),
        client: client_message_id.map(|key| (key, request.query.clone())),
    };
    let handle = app.streams.register(registration, &slot);
    let message_id = answer.id;
    let streams = app.streams.clone();
    let active = app.metrics.active_streams.clone();
    active.inc();
    let turn = Turn {
        conversation,
        question,
        answer,
        request,
    };
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            relay::run(app, dify, turn, log, handle).await;
            streams.remove(message_id);
            drop(slot);
            active.dec();
        },
        span,
    ));
    Ok(events)
}

/// What a turn's transaction came to: a new turn, or an earlier one sent with the same
/// `clientMessageId`.
enum Began {
    Turn(Box<NewTurn>),
    Replay { answer: MessageId, same_query: bool },
}

/// A turn saved: its app, the files and inputs for Dify, and the conversation, question and
/// answer.
struct NewTurn {
    dify: Dify,
    dify_files: Vec<Value>,
    inputs: serde_json::Map<String, Value>,
    saved: (
        conversations_db::ConversationRecord,
        conversations_db::MessageRecord,
        conversations_db::MessageRecord,
    ),
}

const CLIENT_MESSAGE_ID_REUSED: AppError =
    AppError::Conflict("this clientMessageId was already used for a different query");

/// A send whose `clientMessageId` names an earlier turn: that turn's answer from the start, as
/// `resumeChat` gives it; `CONFLICT` when the earlier turn asked something else.
async fn replay(
    app: &crate::app::App,
    owner: crate::users::domain::UserId,
    answer: MessageId,
    same_query: bool,
) -> AppResult<ChatStream> {
    if !same_query {
        return Err(CLIENT_MESSAGE_ID_REUSED);
    }
    resume(app, owner, answer, 0).await
}

#[derive(Default)]
pub struct ChatMutation;

#[Object]
impl ChatMutation {
    /// Stops an answer being generated. The answer ends with `ChatCompleted`, status STOPPED,
    /// keeping what had arrived. Stopping an answer that already ended changes nothing.
    async fn stop_chat(&self, ctx: &Context<'_>, message_id: ID) -> AppResult<Message> {
        let user = ctx.user()?;
        let app = ctx.app();
        let id = MessageId::parse("messageId", &message_id)?;
        let (message, dify) = owned_assistant_message(ctx, user.id, id, "messageId").await?;
        stop_message(app, dify.as_ref(), user.id, &message).await;
        let mut conn = app.db.get().await?;
        conversations_db::find_message(&mut conn, id)
            .await?
            .map(Message::from)
            .ok_or(AppError::NotFound("message"))
    }

    /// Rates an answer (null revokes the rating). The rating is stored and sent to Dify with the
    /// optional comment; if Dify fails, that is logged and the stored rating stands.
    async fn set_message_feedback(
        &self,
        ctx: &Context<'_>,
        message_id: ID,
        rating: Option<Rating>,
        #[graphql(desc = "An optional comment for the app's owners (sent to Dify, not stored).")]
        content: Option<String>,
    ) -> AppResult<Message> {
        let user = ctx.user()?;
        let app = ctx.app();
        let id = MessageId::parse("messageId", &message_id)?;
        let content = content
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty());
        if content.as_ref().is_some_and(|c| c.chars().count() > 2000) {
            return Err(AppError::bad_input(
                "content",
                "the comment must have at most 2000 characters",
            ));
        }
        let (message, dify) = owned_assistant_message(ctx, user.id, id, "messageId").await?;
        let mut conn = app.db.get().await?;
        conversations_db::set_feedback(&mut conn, id, rating).await?;
        let stored = conversations_db::find_message(&mut conn, id)
            .await?
            .ok_or(AppError::NotFound("message"))?;
        drop(conn);
        if let (Some(dify_message_id), Some(dify)) = (&message.dify_message_id, dify) {
            let dify_rating = rating.map(|r| if r == Rating::Like { "like" } else { "dislike" });
            if let Err(error) = dify
                .client
                .feedback(
                    dify_message_id,
                    dify_rating,
                    content.as_deref(),
                    &dify_user(user.id),
                )
                .await
            {
                tracing::warn!(message.id = %id, %error, "sending feedback to Dify failed");
            }
        }
        Ok(stored.into())
    }
}

#[derive(Default)]
pub struct SuggestionQuery;

#[Object]
impl SuggestionQuery {
    /// Dify's follow-up questions for one of your answers; `[]` when its app has them turned
    /// off (`AppParameters.suggestedQuestionsAfterAnswer`), for an answer Dify did not store, or
    /// once its app was deleted. `NOT_FOUND` for someone else's message.
    async fn suggested_questions(
        &self,
        ctx: &Context<'_>,
        message_id: ID,
    ) -> AppResult<Vec<String>> {
        let user = ctx.user()?;
        let id = MessageId::parse("messageId", &message_id)?;
        let (message, dify) = owned_assistant_message(ctx, user.id, id, "messageId").await?;
        let (Some(dify_message_id), Some(dify)) = (message.dify_message_id, dify) else {
            return Ok(Vec::new());
        };
        let apps = ctx.app().apps().await?;
        let disabled = apps
            .get(dify.id)
            .and_then(|app| app.parameters.as_ref())
            .is_some_and(|p| !p.suggested_questions_after_answer);
        if disabled || !dify.mode.has_conversations() {
            return Ok(Vec::new());
        }
        Ok(dify
            .client
            .suggested(&dify_message_id, &dify_user(user.id))
            .await?)
    }
}

/// One of `user`'s answers, with the Dify app of its conversation (`None`: deleted, or none).
async fn owned_assistant_message(
    ctx: &Context<'_>,
    user: crate::users::domain::UserId,
    id: MessageId,
    field: &'static str,
) -> AppResult<(conversations_db::MessageRecord, Option<Dify>)> {
    let app = ctx.app();
    let mut conn = app.db.get().await?;
    let (message, app_id) = conversations_db::find_message_owned(&mut conn, id, user)
        .await?
        .ok_or(AppError::NotFound("message"))?;
    drop(conn);
    if message.role != MessageRole::Assistant {
        return Err(AppError::bad_input(
            field,
            "this is a user message; pass an assistant message's id",
        ));
    }
    let dify = app.dify_of(app_id).await.unwrap_or_else(|error| {
        tracing::warn!(
            error = error.message(),
            "the app of a message could not be read"
        );
        None
    });
    Ok((message, dify))
}
