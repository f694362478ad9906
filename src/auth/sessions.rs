//! Sessions follow their account. A change to an account (deactivation, demotion, revoked
//! tokens) is announced to every open WebSocket of this process, which re-checks its session and
//! closes when it no longer holds; a deactivation also stops the account's live answers.
//!
//! Changes made through this gateway are announced at once ([`App::account_changed`]). Changes
//! made through another gateway on the same database are found by [`spawn_watch`], which reads
//! the accounts whose `updated_at` moved, once a second: one small query per gateway, whatever
//! the number of sockets.

use std::collections::HashMap;
use std::time::Duration;

use chrono::NaiveDateTime;
use tokio::sync::broadcast;

use crate::app::App;
use crate::users::domain::UserId;

/// How often the accounts table is read for changes made elsewhere.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How far back each read looks: covers clock differences between gateways and a missed read.
const LOOK_BACK: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// Accounts that changed, for the sockets of this process. A socket that lags behind re-checks
/// its session anyway.
pub struct AccountEvents(broadcast::Sender<UserId>);

impl Default for AccountEvents {
    fn default() -> Self {
        Self(broadcast::Sender::new(1024))
    }
}

impl AccountEvents {
    pub fn subscribe(&self) -> broadcast::Receiver<UserId> {
        self.0.subscribe()
    }

    fn publish(&self, id: UserId) {
        // No receiver (no socket open) is not an error.
        let _ = self.0.send(id);
    }
}

impl App {
    /// An account changed: forget what is cached about it, stop its answers if it was
    /// deactivated, and have its sockets re-check their sessions.
    pub fn account_changed(&self, id: UserId, is_active: bool) {
        self.accounts.forget(id);
        if !is_active {
            let stopped = self.streams.stop_owner(id);
            if stopped > 0 {
                tracing::info!(user.id = %id, answers = stopped, "answers of a deactivated account stopped");
            }
        }
        self.account_events.publish(id);
    }
}

/// Reads the accounts changed recently, once a second, for as long as the app lives.
pub fn spawn_watch(app: &App) -> tokio::task::JoinHandle<()> {
    let app = app.downgrade();
    tokio::spawn(async move {
        // Changes already announced, by account, with the `updated_at` announced.
        let mut seen: HashMap<UserId, NaiveDateTime> = HashMap::new();
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            every.tick().await;
            let Some(app) = app.upgrade() else { return };
            let since = crate::db::types::now() - LOOK_BACK;
            let changed = app
                .writer_db
                .run(crate::db::STATEMENT_TIMEOUT, async |conn| {
                    crate::users::db::changed_since(conn, since).await
                })
                .await;
            let changed = match changed {
                Ok(changed) => changed,
                Err(error) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "reading changed accounts failed; retrying every second"
                        );
                    }
                    continue;
                }
            };
            failing = false;
            seen.retain(|_, at| *at >= since);
            for (id, is_active, updated_at) in changed {
                if seen.insert(id, updated_at) != Some(updated_at) {
                    app.account_changed(id, is_active);
                }
            }
        }
    })
}
