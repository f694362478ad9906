//! One fresh MySQL database per test, dropped afterwards; leftovers of crashed runs swept.

use std::time::{SystemTime, UNIX_EPOCH};

use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};
use tokio::sync::OnceCell;

pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

const PREFIX: &str = "rechat_test_";
/// Databases older than this belong to a run that crashed.
const LEFTOVER_AFTER_SECS: u64 = 3600;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

static SWEPT: OnceCell<()> = OnceCell::const_new();

async fn sweep_leftovers() {
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "Database")]
        name: String,
    }
    let Ok(mut conn) = AsyncMysqlConnection::establish(&server_url()).await else {
        return;
    };
    let names: Vec<Name> = diesel::sql_query(format!("SHOW DATABASES LIKE '{PREFIX}%'"))
        .load(&mut conn)
        .await
        .unwrap_or_default();
    for Name { name } in names {
        let created: u64 = name[PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        if unix_now().saturating_sub(created) > LEFTOVER_AFTER_SECS {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS `{name}`"))
                .execute(&mut conn)
                .await;
        }
    }
}

pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub async fn new() -> Self {
        SWEPT.get_or_init(sweep_leftovers).await;
        let name = format!("{PREFIX}{}_{}", unix_now(), uuid::Uuid::new_v4().simple());
        Self { name }
    }

    /// The URL the app under test uses; the app creates and migrates the database itself.
    pub fn url(&self) -> String {
        format!("{}/{}", server_url().trim_end_matches('/'), self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let name = std::mem::take(&mut self.name);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = AsyncMysqlConnection::establish(&server_url()).await.ok()?;
                diesel::sql_query(format!("DROP DATABASE IF EXISTS `{name}`"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}
