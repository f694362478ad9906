-- Resumable streams and idempotent sends.
ALTER TABLE messages
    -- The seq of the last event the stored row covers: the terminal event's once the answer
    -- ended, else the last event whose content was written. A resume after the gateway's
    -- retained log is gone numbers its ChatSnapshot and terminal event from it.
    ADD COLUMN last_seq INT NULL,
    -- The idempotency key a user message was sent with (ChatInput.clientMessageId), and its
    -- owner: together unique, so two sends racing with one key start one turn.
    ADD COLUMN client_message_id VARCHAR(64) NULL,
    ADD COLUMN client_owner_id BINARY(16) NULL,
    ADD UNIQUE INDEX messages_client_message (client_owner_id, client_message_id);
