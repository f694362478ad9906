ALTER TABLE messages DROP COLUMN gateway_id;
DROP TABLE gateways;
