-- Several Dify apps, each with its own key. The part-1 key (in `settings`) becomes the default
-- app, and every existing conversation is bound to it.
CREATE TABLE dify_apps (
    id BINARY(16) NOT NULL PRIMARY KEY,
    -- Dify's name from /info, unless an admin renamed the app (`name_is_custom`).
    name VARCHAR(255) NOT NULL,
    name_is_custom BOOLEAN NOT NULL DEFAULT FALSE,
    description TEXT NULL,
    mode VARCHAR(32) NOT NULL,
    -- NULL: DIFY_API_URL.
    api_url VARCHAR(2048) NULL,
    -- AES-256-GCM, like the part-1 key; NULL once the app is deleted.
    api_key_encrypted VARBINARY(1024) NULL,
    api_key_preview VARCHAR(16) NULL,
    is_default BOOLEAN NOT NULL DEFAULT FALSE,
    is_enabled BOOLEAN NOT NULL DEFAULT TRUE,
    -- Dify's /parameters answer, kept whole, and when it was read.
    parameters MEDIUMTEXT NULL,
    parameters_at DATETIME(6) NULL,
    -- Deleted apps stay as tombstones so their conversations can say so (`app: null`).
    deleted_at DATETIME(6) NULL,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    INDEX dify_apps_listed (deleted_at, is_enabled, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

INSERT INTO dify_apps (id, name, mode, api_url, api_key_encrypted, api_key_preview, is_default,
                       created_at, updated_at)
SELECT UNHEX(REPLACE(UUID(), '-', '')), COALESCE(dify_app_name, 'Dify app'),
       COALESCE(dify_app_mode, 'chat'), dify_api_url, dify_api_key_encrypted,
       dify_api_key_preview, TRUE, COALESCE(dify_updated_at, UTC_TIMESTAMP(6)),
       COALESCE(dify_updated_at, UTC_TIMESTAMP(6))
FROM settings
WHERE id = 1 AND dify_api_key_encrypted IS NOT NULL;

-- NULL: a conversation from before any app existed; it uses the default app.
ALTER TABLE conversations
    ADD COLUMN app_id BINARY(16) NULL,
    ADD CONSTRAINT conversations_app_fk FOREIGN KEY (app_id) REFERENCES dify_apps (id);

UPDATE conversations SET app_id = (SELECT id FROM dify_apps WHERE is_default LIMIT 1);
