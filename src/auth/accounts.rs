//! A short-lived cache of accounts as the database has them, so that checking a token (every
//! HTTP request, every WebSocket connection) does not cost a query each time. An entry lives
//! `TTL`; a change made through this gateway (deactivation, promotion, demotion) forgets the
//! entry at once, and one made through another gateway is seen within `TTL`. Chat turns still
//! re-check the account in their own transaction.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::users::db::UserRecord;
use crate::users::domain::UserId;

pub const TTL: Duration = Duration::from_secs(2);
/// Most accounts kept; beyond that, expired entries are dropped, then everything.
const CAPACITY: usize = 50_000;

#[derive(Default)]
pub struct AccountCache(Mutex<HashMap<UserId, (UserRecord, Instant)>>);

impl AccountCache {
    pub fn get(&self, id: UserId) -> Option<UserRecord> {
        let entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&id)
            .filter(|(_, at)| at.elapsed() < TTL)
            .map(|(user, _)| user.clone())
    }

    pub fn put(&self, user: &UserRecord) {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAPACITY {
            entries.retain(|_, (_, at)| at.elapsed() < TTL);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(user.id, (user.clone(), Instant::now()));
    }

    pub fn forget(&self, id: UserId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::db::NewUserRecord;

    fn user() -> UserRecord {
        let new = NewUserRecord::new("a@example.com", "hash", None, false);
        UserRecord {
            id: new.id,
            email: new.email.to_owned(),
            password_hash: new.password_hash.to_owned(),
            full_name: None,
            is_active: true,
            is_admin: false,
            token_version: 0,
            created_at: new.created_at,
            updated_at: new.updated_at,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_and_can_be_forgotten() {
        let cache = AccountCache::default();
        let user = user();
        cache.put(&user);
        assert!(cache.get(user.id).is_some());
        tokio::time::advance(TTL).await;
        assert!(cache.get(user.id).is_none(), "expired");
        cache.put(&user);
        cache.forget(user.id);
        assert!(cache.get(user.id).is_none(), "forgotten");
    }
}
