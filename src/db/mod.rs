//! The MySQL connection pool, session settings, database creation and embedded migrations.

pub mod schema;
pub mod types;

use anyhow::Context as _;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::FutureExt;

use crate::config::Config;

pub type DbPool = Pool<AsyncMysqlConnection>;
pub type DbConn = Object<AsyncMysqlConnection>;
pub type PoolError = diesel_async::pooled_connection::deadpool::PoolError;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Applied to every new connection: UTC timestamps, strict SQL and utf8mb4 on the wire.
const SESSION_SETUP: &str = "SET time_zone = '+00:00', \
     sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ZERO_IN_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', \
     NAMES utf8mb4 COLLATE utf8mb4_unicode_ci";

pub fn pool(database_url: &str, size: usize) -> anyhow::Result<DbPool> {
    let mut manager_config = ManagerConfig::default();
    manager_config.custom_setup = Box::new(|url| {
        let url = url.to_owned();
        async move {
            let mut conn = AsyncMysqlConnection::establish(&url).await?;
            conn.batch_execute(SESSION_SETUP)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        }
        .boxed()
    });
    let manager = AsyncDieselConnectionManager::new_with_config(database_url, manager_config);
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(10)))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("building the MySQL pool")
}

/// Creates the configured database if it does not exist (utf8mb4).
pub async fn ensure_database(config: &Config) -> anyhow::Result<()> {
    let mut conn = AsyncMysqlConnection::establish(config.server_url().as_str())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach MySQL at {}: {e}. Start MySQL/MariaDB or set DATABASE_URL=mysql://user:password@host:port/database",
                redact(&config.server_url())
            )
        })?;
    // The name was validated by Config (letters, digits, _ and $ only), so quoting is enough.
    diesel::sql_query(format!(
        "CREATE DATABASE IF NOT EXISTS `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        config.database_name()
    ))
    .execute(&mut conn)
    .await
    .with_context(|| format!("creating database {}", config.database_name()))?;
    Ok(())
}

/// Runs the embedded migrations on a dedicated blocking connection.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut conn =
            <AsyncConnectionWrapper<AsyncMysqlConnection> as diesel::Connection>::establish(&url)
                .context("connecting to MySQL to migrate")?;
        conn.run_pending_migrations(MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("running migrations: {e}"))?;
        Ok(())
    })
    .await
    .context("migration task")?
}

/// A URL safe to print: the password replaced.
pub fn redact(url: &url::Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    url.to_string()
}
