// Written to match `migrations/` (MySQL dialect); `diesel print-schema` produces the same tables.

diesel::table! {
    users (id) {
        id -> Binary,
        email -> Varchar,
        password_hash -> Varchar,
        full_name -> Nullable<Varchar>,
        is_active -> Bool,
        is_admin -> Bool,
        token_version -> Integer,
        created_at -> Datetime,
        updated_at -> Datetime,
        token_quota -> Nullable<Bigint>,
        token_quota_set -> Bool,
    }
}

diesel::table! {
    token_usage (user_id, period_start) {
        user_id -> Binary,
        period_start -> Date,
        total_tokens -> Bigint,
    }
}

diesel::table! {
    settings (id) {
        id -> Integer,
        secret_key -> Nullable<Varchar>,
        dify_api_key_encrypted -> Nullable<Varbinary>,
        dify_api_key_preview -> Nullable<Varchar>,
        dify_api_url -> Nullable<Varchar>,
        dify_app_mode -> Nullable<Varchar>,
        dify_app_name -> Nullable<Varchar>,
        dify_updated_at -> Nullable<Datetime>,
    }
}

diesel::table! {
    conversations (id) {
        id -> Binary,
        user_id -> Binary,
        title -> Varchar,
        is_archived -> Bool,
        is_pinned -> Bool,
        dify_conversation_id -> Nullable<Varchar>,
        message_count -> Integer,
        created_at -> Datetime,
        updated_at -> Datetime,
        app_id -> Nullable<Binary>,
    }
}

diesel::table! {
    dify_apps (id) {
        id -> Binary,
        name -> Varchar,
        name_is_custom -> Bool,
        description -> Nullable<Text>,
        mode -> Varchar,
        api_url -> Nullable<Varchar>,
        api_key_encrypted -> Nullable<Varbinary>,
        api_key_preview -> Nullable<Varchar>,
        is_default -> Bool,
        is_enabled -> Bool,
        parameters -> Nullable<Mediumtext>,
        parameters_at -> Nullable<Datetime>,
        deleted_at -> Nullable<Datetime>,
        created_at -> Datetime,
        updated_at -> Datetime,
    }
}

diesel::table! {
    messages (id) {
        id -> Binary,
        conversation_id -> Binary,
        role -> Varchar,
        content -> Mediumtext,
        status -> Varchar,
        error -> Nullable<Text>,
        dify_message_id -> Nullable<Varchar>,
        dify_task_id -> Nullable<Varchar>,
        dify_workflow_run_id -> Nullable<Varchar>,
        usage -> Nullable<Text>,
        retriever_resources -> Nullable<Mediumtext>,
        agent_thoughts -> Nullable<Mediumtext>,
        files -> Nullable<Mediumtext>,
        feedback -> Nullable<Varchar>,
        stop_requested -> Bool,
        created_at -> Datetime,
        updated_at -> Datetime,
        tokens -> Bigint,
        tokens_settled -> Bool,
        last_seq -> Nullable<Integer>,
        client_message_id -> Nullable<Varchar>,
        client_owner_id -> Nullable<Binary>,
        gateway_id -> Nullable<Binary>,
    }
}

diesel::table! {
    gateways (id) {
        id -> Binary,
        started_at -> Datetime,
        heartbeat_at -> Datetime,
    }
}

diesel::joinable!(conversations -> users (user_id));
diesel::joinable!(messages -> conversations (conversation_id));
diesel::joinable!(token_usage -> users (user_id));

diesel::table! {
    uploaded_files (id) {
        id -> Binary,
        user_id -> Binary,
        app_id -> Binary,
        dify_file_id -> Varchar,
        name -> Varchar,
        size -> Bigint,
        mime_type -> Nullable<Varchar>,
        extension -> Nullable<Varchar>,
        file_type -> Varchar,
        created_at -> Datetime,
    }
}

diesel::joinable!(conversations -> dify_apps (app_id));

diesel::allow_tables_to_appear_in_same_query!(
    users,
    settings,
    conversations,
    messages,
    token_usage,
    dify_apps,
    uploaded_files
);
