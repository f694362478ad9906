-- One row (id = 1): process-wide settings shared by every gateway process.
CREATE TABLE settings (
    id INT NOT NULL PRIMARY KEY,
    secret_key VARCHAR(255) NULL,
    dify_api_key_encrypted VARBINARY(1024) NULL,
    dify_api_key_preview VARCHAR(16) NULL,
    dify_api_url VARCHAR(2048) NULL,
    dify_app_mode VARCHAR(32) NULL,
    dify_app_name VARCHAR(255) NULL,
    dify_updated_at DATETIME(6) NULL,
    CONSTRAINT settings_single_row CHECK (id = 1)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

INSERT INTO settings (id) VALUES (1);
