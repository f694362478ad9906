CREATE INDEX users_updated_at ON users (updated_at);
