CREATE TABLE messages (
    id BINARY(16) NOT NULL PRIMARY KEY,
    conversation_id BINARY(16) NOT NULL,
    role VARCHAR(16) NOT NULL,
    content MEDIUMTEXT NOT NULL,
    status VARCHAR(16) NOT NULL,
    error TEXT NULL,
    dify_message_id VARCHAR(64) NULL,
    dify_task_id VARCHAR(64) NULL,
    dify_workflow_run_id VARCHAR(64) NULL,
    `usage` TEXT NULL,
    retriever_resources MEDIUMTEXT NULL,
    agent_thoughts MEDIUMTEXT NULL,
    files MEDIUMTEXT NULL,
    feedback VARCHAR(16) NULL,
    -- Set by stopChat (from any gateway process); the relay then stores the answer as STOPPED.
    stop_requested BOOLEAN NOT NULL DEFAULT FALSE,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    CONSTRAINT messages_conversation_fk FOREIGN KEY (conversation_id) REFERENCES conversations (id) ON DELETE CASCADE,
    -- Ids are UUIDv7, so (conversation_id, id) is chronological order within a conversation.
    INDEX messages_by_conversation (conversation_id, id),
    -- The sweeper looks for STREAMING messages whose flushes stopped.
    INDEX messages_streaming (status, updated_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
