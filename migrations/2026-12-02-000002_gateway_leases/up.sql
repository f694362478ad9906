-- Gateway processes and their leases: each running gateway renews its row every few seconds
-- (on the database's clock); the answers it relays name it, so that when its lease expires any
-- other gateway marks them INTERRUPTED at once instead of waiting for them to go stale.
CREATE TABLE gateways (
    id BINARY(16) NOT NULL PRIMARY KEY,
    started_at DATETIME(6) NOT NULL,
    heartbeat_at DATETIME(6) NOT NULL,
    INDEX gateways_by_heartbeat (heartbeat_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

-- The gateway relaying an answer (NULL on rows older than leases), indexed so that marking a
-- dead gateway's answers touches only those rows.
ALTER TABLE messages
    ADD COLUMN gateway_id BINARY(16) NULL,
    ADD INDEX messages_by_gateway (gateway_id, status);
