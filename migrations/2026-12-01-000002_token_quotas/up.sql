-- Per-user token quotas. `token_quota_set` tells an admin's choice (a number, or NULL for
-- unlimited) from "never set" (DEFAULT_TOKEN_QUOTA applies).
ALTER TABLE users
    ADD COLUMN token_quota BIGINT NULL,
    ADD COLUMN token_quota_set BOOLEAN NOT NULL DEFAULT FALSE;

-- Tokens used per user per calendar month (UTC), settled from Dify's usage as answers end.
CREATE TABLE token_usage (
    user_id BINARY(16) NOT NULL,
    period_start DATE NOT NULL,
    total_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start),
    CONSTRAINT token_usage_user_fk FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- An answer's tokens (Dify's total_tokens), written by its final write; the writer adds them to
-- token_usage in batches and marks them settled in the same transaction, so a retried final
-- write (which writes the same number again) never counts them twice.
ALTER TABLE messages
    ADD COLUMN tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN tokens_settled BOOLEAN NOT NULL DEFAULT FALSE,
    ADD INDEX messages_unsettled (tokens_settled, tokens);
