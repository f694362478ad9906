ALTER TABLE messages DROP INDEX messages_unsettled, DROP COLUMN tokens_settled, DROP COLUMN tokens;
DROP TABLE token_usage;
ALTER TABLE users DROP COLUMN token_quota_set, DROP COLUMN token_quota;
