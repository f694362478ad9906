ALTER TABLE messages DROP INDEX messages_by_gateway, DROP COLUMN gateway_id;
DROP TABLE gateways;
