//! The GraphQL schema: per-domain roots merged into `Query`, `Mutation` and `Subscription`.

pub mod context;
pub mod limits;
pub mod pagination;

use async_graphql::{MergedObject, MergedSubscription, Schema, SchemaBuilder};

use crate::admin::graphql::{AdminMutation, AdminQuery};
use crate::app::App;
use crate::apps::graphql::{AppMutation, AppQuery};
use crate::auth::graphql::AuthMutation;
use crate::chat::graphql::{ChatMutation, ChatSubscription, SuggestionQuery};
use crate::conversations::graphql::{ConversationMutation, ConversationQuery};
use crate::files::graphql::FileMutation;
use crate::users::graphql::{UserMutation, UserQuery};

/// Reads: your account, your conversations and messages, and (admins) users and Dify settings.
#[derive(MergedObject, Default)]
pub struct Query(
    UserQuery,
    ConversationQuery,
    SuggestionQuery,
    AppQuery,
    AdminQuery,
);

/// Changes: sign-up and sign-in, conversations, answers, and (admins) users and Dify settings.
#[derive(MergedObject, Default)]
pub struct Mutation(
    AuthMutation,
    ConversationMutation,
    ChatMutation,
    FileMutation,
    AppMutation,
    AdminMutation,
    UserMutation,
);

/// Live streams over WebSocket (graphql-transport-ws or graphql-ws).
#[derive(MergedSubscription, Default)]
pub struct Subscription(ChatSubscription);

pub type AppSchema = Schema<Query, Mutation, Subscription>;

/// Deep enough for GraphiQL's introspection query, shallow enough to stop abusive nesting.
pub const MAX_DEPTH: usize = 16;
pub const MAX_COMPLEXITY: usize = 5_000;

pub fn schema_builder() -> SchemaBuilder<Query, Mutation, Subscription> {
    Schema::build(
        Query::default(),
        Mutation::default(),
        Subscription::default(),
    )
    .limit_depth(MAX_DEPTH)
    .limit_complexity(MAX_COMPLEXITY)
    .extension(limits::QueryLimits)
    .extension(context::SessionViewer)
}

pub fn schema(app: App) -> AppSchema {
    schema_builder().data(app).finish()
}

/// The SDL that `rechat schema` prints and `schema.graphql` pins.
pub fn sdl() -> String {
    schema_builder().finish().sdl()
}
