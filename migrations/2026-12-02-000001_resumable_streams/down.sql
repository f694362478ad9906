ALTER TABLE messages
    DROP INDEX messages_client_message,
    DROP COLUMN client_owner_id,
    DROP COLUMN client_message_id,
    DROP COLUMN last_seq;
