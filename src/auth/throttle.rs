//! Counting attempts in fixed windows, in bounded memory: the sign-in throttles (per account, per
//! client address) and the chat turns per user use one [`Window`] each.
//!
//! An attempt is counted before the work it guards (argon2, a Dify call), so concurrent attempts
//! cannot all slip under the limit. Keys are small (an account id, an address): whatever clients
//! send, an entry costs tens of bytes, and the table never holds more than [`CAPACITY`] keys.
//!
//! Kept in process memory: with several gateways each counts on its own, which bounds attempts
//! to (processes × limit) per window.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::users::domain::UserId;

/// Most keys tracked per window. Past it, expired keys are dropped; if every key is still live,
/// new keys are refused (fail closed) until some expire.
pub const CAPACITY: usize = 100_000;

/// Per account: failed sign-ins before further attempts are refused, and for how long.
pub const ACCOUNT_MAX_FAILURES: u32 = 10;
pub const ACCOUNT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// The window of the per-address and per-user limits (their maximum is configured).
pub const MINUTE: Duration = Duration::from_secs(60);

/// The throttles of one process.
pub struct Throttles {
    /// Sign-in attempts per account, or per unknown email (hashed, so that a refusal does not
    /// tell which emails have accounts).
    pub accounts: Window<AccountKey>,
    /// Registrations and sign-ins per client address ([`address_key`]).
    pub addresses: Window<IpAddr>,
    /// Chat turns per user.
    pub turns: Window<UserId>,
    /// Uploads per user.
    pub uploads: Window<UserId>,
    hasher: RandomState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccountKey {
    Account(UserId),
    Unknown(u64),
}

impl Default for Throttles {
    fn default() -> Self {
        Self {
            accounts: Window::new(ACCOUNT_WINDOW),
            addresses: Window::new(MINUTE),
            turns: Window::new(MINUTE),
            uploads: Window::new(MINUTE),
            hasher: RandomState::new(),
        }
    }
}

impl Throttles {
    /// The key of an email that has no account (normalised); 8 bytes whatever its length.
    pub fn unknown_email(&self, email: &str) -> AccountKey {
        AccountKey::Unknown(self.hasher.hash_one(email))
    }
}

/// Attempts per key in fixed windows of `length`.
pub struct Window<K> {
    length: Duration,
    counts: Mutex<HashMap<K, (u32, Instant)>>,
}

impl<K: Hash + Eq + Clone> Window<K> {
    pub fn new(length: Duration) -> Self {
        Self {
            length,
            counts: Mutex::default(),
        }
    }

    /// Counts one attempt for `key`, unless `max` were already counted in its window: then
    /// `Err(seconds until the window ends)`, and nothing is counted.
    pub fn take(&self, key: &K, max: u32) -> Result<(), u64> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if !counts.contains_key(key) && counts.len() >= CAPACITY {
            counts.retain(|_, (_, since)| now - *since < self.length);
            if counts.len() >= CAPACITY {
                tracing::warn!(keys = CAPACITY, "a throttle is full; refusing new clients");
                return Err(self.length.as_secs());
            }
        }
        let (count, since) = counts.entry(key.clone()).or_insert((0, now));
        if now - *since >= self.length {
            (*count, *since) = (0, now);
        }
        if *count >= max {
            let left = self.length.saturating_sub(now - *since);
            return Err(left.as_secs().max(1));
        }
        *count += 1;
        Ok(())
    }

    /// Uncounts one attempt of `key` in its current window (one that turned out to be a
    /// retry of an earlier one).
    pub fn give_back(&self, key: &K) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((count, _)) = counts.get_mut(key) {
            *count = count.saturating_sub(1);
        }
    }

    /// Forgets `key`'s attempts (a successful sign-in).
    pub fn reset(&self, key: &K) {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// The throttle key of a client address: IPv6 clients are counted per /64, the block one
/// subscriber usually gets, so that rotating addresses within it does not multiply the limit.
pub fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_per_key_in_windows() {
        let window = Window::new(MINUTE);
        for _ in 0..3 {
            window.take(&"a", 3).unwrap();
        }
        let wait = window.take(&"a", 3).unwrap_err();
        assert_eq!(wait, 60);
        window.take(&"b", 3).expect("per key");
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(
            window.take(&"a", 3).unwrap_err(),
            15,
            "refusals are not counted"
        );
        tokio::time::advance(Duration::from_secs(15)).await;
        window.take(&"a", 3).expect("a new window");
        window.reset(&"a");
        for _ in 0..3 {
            window.take(&"a", 3).unwrap();
        }
        window.give_back(&"a");
        window.take(&"a", 3).expect("an attempt given back");
        assert!(window.take(&"a", 3).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_whatever_the_keys() {
        let window = Window::new(MINUTE);
        for key in 0..CAPACITY {
            window.take(&key, 1).unwrap();
        }
        assert!(window.take(&CAPACITY, 1).is_err(), "full: new keys wait");
        tokio::time::advance(MINUTE).await;
        window.take(&CAPACITY, 1).expect("expired keys make room");
        assert_eq!(window.counts.lock().unwrap().len(), 1);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
