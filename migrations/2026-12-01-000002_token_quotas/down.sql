ALTER TABLE messages DROP COLUMN tokens_settled;
DROP TABLE token_usage;
ALTER TABLE users DROP COLUMN token_quota_set, DROP COLUMN token_quota;
