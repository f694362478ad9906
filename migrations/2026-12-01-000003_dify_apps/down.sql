ALTER TABLE conversations DROP FOREIGN KEY conversations_app_fk;
ALTER TABLE conversations DROP COLUMN app_id;
DROP TABLE dify_apps;
