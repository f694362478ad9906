//! `App`: the one cloneable state every request and stream shares.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use rand::RngCore as _;
use secrecy::ExposeSecret;

use crate::auth::password::PasswordHasher;
use crate::auth::token::Keys;
use crate::chat::writer::Writer;
use crate::config::Config;
use crate::db::{self, Db};
use crate::gateways::GatewayId;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct App(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    /// Interactive work: requests, start-up of a chat, mutations.
    pub db: Db,
    /// Background work: write-behind batches, final writes of answers, the sweeper. Kept apart
    /// so that interactive work never queues behind thousands of streams' writes.
    pub writer_db: Db,
    /// The write-behind writer of live answers.
    pub writer: Writer,
    /// Final writes of answers, batched.
    pub finals: crate::chat::finals::Finals,
    /// Checks and saves chat turns (new conversations' first turns in batches).
    pub turns: crate::chat::turns::Turns,
    pub metrics: Arc<Metrics>,
    /// The connected Dify apps, as recently read.
    pub app_cache: crate::apps::AppCache,
    /// Accounts as recently read, for token checks.
    pub accounts: crate::auth::accounts::AccountCache,
    pub keys: Keys,
    pub passwords: PasswordHasher,
    /// Shared by every Dify call (connection reuse); the key is per call.
    pub dify_http: reqwest::Client,
    /// Sign-in attempts per account and per address; chat turns per user.
    pub throttles: crate::auth::throttle::Throttles,
    /// Answers this process is streaming.
    pub streams: crate::chat::Streams,
    /// Accounts changed, for open sockets.
    pub account_events: crate::auth::sessions::AccountEvents,
    /// This process, as the answers it relays name it (see `gateways`).
    pub gateway: GatewayId,
    /// Redis, when several gateways share it (`REDIS_URL`).
    pub shared: crate::shared::Shared,
    writer_task: tokio::task::JoinHandle<()>,
    lease_task: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer_task.abort();
        self.lease_task.abort();
    }
}

impl Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub use crate::apps::Dify;

pub struct WeakApp(std::sync::Weak<Inner>);

impl WeakApp {
    pub fn upgrade(&self) -> Option<App> {
        self.0.upgrade().map(App)
    }
}

impl App {
    /// Creates the database if needed, migrates it and loads the keys.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        db::ensure_database(&config).await?;
        db::migrate(config.database_url.as_str()).await?;
        let metrics = Arc::new(Metrics::default());
        let url = config.database_url.as_str();
        let wait = || metrics.pool_wait_seconds.clone();
        let pool = Db::connect(url, config.db_pool_size, db::Checkout::Verified, wait()).await?;
        let writer_db =
            Db::connect(url, config.writer_pool_size, db::Checkout::Fast, wait()).await?;
        let writer = Writer::new(writer_db.clone(), metrics.clone());
        let streams = crate::chat::Streams::default();
        let writer_task = writer.clone().spawn(config.flush_interval, {
            let streams = streams.clone();
            move || streams.ids()
        });
        let secret = match &config.secret_key {
            Some(secret) => secret.expose_secret().to_owned(),
            None => {
                let mut candidate = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut candidate);
                let candidate = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(candidate);
                let mut conn = pool.get().await.context("connecting to MySQL")?;
                let stored = crate::admin::db::secret_key_or_insert(&mut conn, &candidate)
                    .await
                    .context("reading the stored secret key")?;
                tracing::warn!(
                    "SECRET_KEY is not set: using the key generated and stored in the database; \
                     set SECRET_KEY (32+ bytes) to manage it yourself"
                );
                stored
            }
        };
        let keys = Keys::new(secret.as_bytes(), config.jwt_expire);
        // The lease exists before the first answer names this gateway.
        let gateway = GatewayId::new();
        let mut conn = writer_db.get().await.context("connecting to MySQL")?;
        crate::gateways::renew(&mut conn, gateway)
            .await
            .context("taking the gateway's lease")?;
        drop(conn);
        let shared = match &config.redis_url {
            Some(url) => {
                crate::shared::Shared::connect(url.expose_secret(), &config.redis_prefix, gateway)
                    .context("REDIS_URL")?
            }
            None => crate::shared::Shared::default(),
        };
        let lease_task = crate::gateways::spawn_lease(
            writer_db.clone(),
            shared.clone(),
            gateway,
            config.gateway_lease,
        );
        let throttles = crate::auth::throttle::Throttles::new(&shared, secret.as_bytes());
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        let app = Self(Arc::new(Inner {
            keys,
            passwords: PasswordHasher::new(parallelism),
            dify_http: crate::dify::client::http_client(
                Duration::from_secs(10),
                config.dify_read_timeout,
            ),
            turns: crate::chat::turns::Turns::spawn(pool.clone(), metrics.clone()),
            finals: crate::chat::finals::Finals::spawn(writer_db.clone(), metrics.clone()),
            db: pool,
            writer_db,
            writer,
            metrics,
            app_cache: Default::default(),
            accounts: Default::default(),
            streams,
            writer_task,
            gateway,
            shared,
            lease_task,
            throttles,
            account_events: Default::default(),
            config,
        }));
        crate::auth::sessions::spawn_watch(&app);
        crate::shared::act_on_signals(&app);
        Ok(app)
    }

    /// A handle that does not keep the app alive, for background tasks that end with it.
    pub fn downgrade(&self) -> WeakApp {
        WeakApp(Arc::downgrade(&self.0))
    }
}
