-- Files people uploaded to a Dify app through rechat: only their owner may attach them, and
-- only to a turn on the same app (Dify scopes a file to its app and its user).
CREATE TABLE uploaded_files (
    id BINARY(16) NOT NULL PRIMARY KEY,
    user_id BINARY(16) NOT NULL,
    app_id BINARY(16) NOT NULL,
    dify_file_id VARCHAR(64) NOT NULL,
    name VARCHAR(255) NOT NULL,
    size BIGINT NOT NULL,
    mime_type VARCHAR(255) NULL,
    extension VARCHAR(32) NULL,
    file_type VARCHAR(16) NOT NULL,
    created_at DATETIME(6) NOT NULL,
    CONSTRAINT uploaded_files_user_fk FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT uploaded_files_app_fk FOREIGN KEY (app_id) REFERENCES dify_apps (id),
    INDEX uploaded_files_by_user (user_id, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
