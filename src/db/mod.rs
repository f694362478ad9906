//! The MySQL connection pool, session settings, database creation and embedded migrations.

pub mod batch;
pub mod schema;
pub mod types;

use anyhow::Context as _;
use diesel::QueryResult;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::FutureExt;
use prometheus_client::metrics::histogram::Histogram;
use std::time::{Duration, Instant};

use crate::config::Config;

pub type DbPool = Pool<AsyncMysqlConnection>;
pub type DbConn = Object<AsyncMysqlConnection>;
pub type PoolError = diesel_async::pooled_connection::deadpool::PoolError;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Applied to every new connection: UTC timestamps, strict SQL and utf8mb4 on the wire.
const SESSION_SETUP: &str = "SET time_zone = '+00:00', \
     sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ZERO_IN_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', \
     NAMES utf8mb4 COLLATE utf8mb4_unicode_ci";

/// The longest any background statement (or transaction) may take before its connection is
/// dropped and the work counts as failed; a frozen server must not hold a writer forever.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Work moving more than this through a connection closes it afterwards (see `Db::run_moving`).
pub const LARGE_PAYLOAD: usize = 1 << 20;

/// A pool that records how long callers wait for a connection.
#[derive(Clone)]
pub struct Db {
    pool: DbPool,
    wait: Histogram,
}

impl Db {
    /// A pool of `size` connections, all opened now: the first burst of requests does not pay
    /// for connection set-up, and start-up fails at once when MySQL does not answer. `wait`
    /// records how long callers wait for a connection.
    pub async fn connect(
        database_url: &str,
        size: usize,
        checkout: Checkout,
        wait: Histogram,
    ) -> anyhow::Result<Self> {
        let db = Self {
            pool: pool(database_url, size, checkout)?,
            wait,
        };
        let conns = futures::future::try_join_all((0..size).map(|_| db.pool.get()))
            .await
            .context("connecting to MySQL")?;
        drop(conns);
        Ok(db)
    }

    pub async fn get(&self) -> Result<DbConn, PoolError> {
        let started = Instant::now();
        let conn = self.pool.get().await;
        self.wait.observe(started.elapsed().as_secs_f64());
        conn
    }

    /// Runs `work` on a pooled connection, giving up after `limit`. A connection whose work timed
    /// out is closed rather than returned to the pool: its protocol state is unknown.
    pub async fn run<T>(
        &self,
        limit: Duration,
        work: impl AsyncFnOnce(&mut AsyncMysqlConnection) -> QueryResult<T>,
    ) -> anyhow::Result<T> {
        self.run_moving(limit, 0, work).await
    }

    /// [`run`](Self::run) for work that sends or reads about `bytes`. A connection keeps its
    /// read and write buffers as large as the largest packet it carried, for its whole life:
    /// past [`LARGE_PAYLOAD`] it is closed after the work, so that a few answers of megabytes
    /// do not leave every pooled connection holding megabytes.
    pub async fn run_moving<T>(
        &self,
        limit: Duration,
        bytes: usize,
        work: impl AsyncFnOnce(&mut AsyncMysqlConnection) -> QueryResult<T>,
    ) -> anyhow::Result<T> {
        let started = Instant::now();
        let mut conn = tokio::time::timeout(limit, self.get())
            .await
            .map_err(|_| anyhow::anyhow!("no MySQL connection within {limit:?}"))??;
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, work(&mut conn)).await {
            Ok(Err(error)) if is_unavailable(&error) => {
                // Its socket is gone: a fresh connection next time.
                drop(Object::take(conn));
                Err(error.into())
            }
            Ok(result) => {
                if bytes > LARGE_PAYLOAD {
                    drop(Object::take(conn));
                }
                Ok(result?)
            }
            Err(_) => {
                drop(Object::take(conn));
                anyhow::bail!("MySQL did not answer within {limit:?}")
            }
        }
    }
}

/// How a pool checks a connection it hands out.
#[derive(Clone, Copy)]
pub enum Checkout {
    /// A `SELECT 1` first: a connection whose socket died (MySQL restarted) is replaced instead
    /// of failing the request, and keeps failing every later one.
    Verified,
    /// No check: for a pool used only through [`Db::run`], which closes a connection on the
    /// first error that shows its socket is gone.
    Fast,
}

/// Whether a query failed because MySQL could not be reached (as opposed to MySQL refusing the
/// statement). diesel-async reports both as `DatabaseError(Unknown, _)`; mysql_async's own
/// errors are the ones whose text starts with its error kind.
pub fn is_unavailable(error: &diesel::result::Error) -> bool {
    match error {
        diesel::result::Error::DatabaseError(_, info) => {
            let message = info.message();
            ["Input/output error", "Driver error", "Other error"]
                .iter()
                .any(|kind| message.starts_with(kind))
        }
        _ => false,
    }
}

fn pool(database_url: &str, size: usize, checkout: Checkout) -> anyhow::Result<DbPool> {
    let mut manager_config = ManagerConfig::default();
    manager_config.recycling_method = match checkout {
        Checkout::Verified => RecyclingMethod::Verified,
        Checkout::Fast => RecyclingMethod::Fast,
    };
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
