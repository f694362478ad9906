//! Gateway processes on one database and their leases. Each process renews its lease (a row in
//! `gateways`, on the database's clock) every quarter of `GATEWAY_LEASE_SECONDS`; the answers it
//! relays name it. When a process dies (killed, its machine gone), its lease expires and any
//! other gateway's sweeper marks its answers INTERRUPTED, with what was saved, within about one
//! lease. Nothing is sticky: the lease only says who relays which live answer.

use std::time::Duration;

use diesel::sql_types::Binary;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl};

use crate::db::schema::gateways;
use crate::db::types::uuid_id;
use crate::db::{Db, STATEMENT_TIMEOUT};
use crate::shared::Shared;

uuid_id!(
    /// A gateway process, for as long as it runs.
    GatewayId,
    "gateway"
);

/// How often a lease is renewed, and how often the sweeper looks, for a lease of `ttl`.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(250))
}

/// Takes or renews `gateway`'s lease.
pub async fn renew(conn: &mut AsyncMysqlConnection, gateway: GatewayId) -> diesel::QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO gateways (id, started_at, heartbeat_at) VALUES (?, NOW(6), NOW(6)) \
         ON DUPLICATE KEY UPDATE heartbeat_at = NOW(6)",
    )
    .bind::<Binary, _>(gateway)
    .execute(conn)
    .await
    .map(drop)
}

/// Gives the lease up (a clean shutdown, once its answers are stored).
pub async fn release(
    conn: &mut AsyncMysqlConnection,
    gateway: GatewayId,
) -> diesel::QueryResult<()> {
    diesel::sql_query("DELETE FROM gateways WHERE id = ?")
        .bind::<Binary, _>(gateway)
        .execute(conn)
        .await
        .map(drop)
}

/// The gateways whose lease is older than `ttl`: they died (or lost the database that long).
/// A plain read: the usual answer is none, and nothing is locked to find out.
pub async fn expired(
    conn: &mut AsyncMysqlConnection,
    ttl: Duration,
) -> diesel::QueryResult<Vec<GatewayId>> {
    use diesel::QueryDsl as _;
    use diesel::dsl::sql;
    use diesel::sql_types::Bool;

    let micros = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
    gateways::table
        .filter(
            sql::<Bool>("heartbeat_at < NOW(6) - INTERVAL ")
                .bind::<diesel::sql_types::BigInt, _>(micros)
                .sql(" MICROSECOND"),
        )
        .select(gateways::id)
        .load(conn)
        .await
}

/// Renews `gateway`'s lease for as long as the process runs (the first renewal is at once).
/// Failures are logged once per outage. A lease that lapses while the database is away is
/// renewed when it returns, before any sweeper judges it (see `chat::spawn_sweeper`); one that
/// lapses while only this process is cut off lets the others mark its answers INTERRUPTED
/// early, and each answer's final write puts its real outcome back.
pub fn spawn_lease(
    db: Db,
    shared: Shared,
    gateway: GatewayId,
    ttl: Duration,
) -> tokio::task::JoinHandle<()> {
    let presence = shared.key(&["gateway", &gateway.to_string()]);
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(renew_every(ttl));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            every.tick().await;
            // The same presence in Redis, for what is counted there per gateway.
            let presence = presence.clone();
            shared
                .run(move |mut connection| async move {
                    redis::cmd("SET")
                        .arg(presence)
                        .arg(1)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async::<redis::Value>(&mut connection)
                        .await
                })
                .await;
            let result = db
                .run(STATEMENT_TIMEOUT, async |conn| renew(conn, gateway).await)
                .await;
            match result {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("the gateway's lease is renewed again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "renewing the gateway's lease failed"
                    );
                }
                Err(_) => {}
            }
        }
    })
}
