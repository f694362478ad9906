//! Counting attempts in fixed windows, in bounded memory: the sign-in throttles (per account, per
//! client address) and the chat turns per user use one [`Window`] each.
//!
//! An attempt is counted before the work it guards (argon2, a Dify call), so concurrent attempts
//! cannot all slip under the limit. Keys are small (an account id, an address): whatever clients
//! send, an entry costs tens of bytes, and the table never holds more than [`CAPACITY`] keys.
//!
//! With `REDIS_URL` set, attempts are counted in Redis (one atomic script per attempt), so the
//! limits hold across every gateway; without it, or while Redis is away, each process counts in
//! its own memory, which bounds attempts to (processes × limit) per window.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::shared::Shared;
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
    /// Keys the hash of unknown emails, the same in every gateway with the same secret.
    salt: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccountKey {
    Account(UserId),
    Unknown(u64),
}

impl Throttles {
    /// The throttles of a process; `secret` keys the hash of unknown emails.
    pub fn new(shared: &Shared, secret: &[u8]) -> Self {
        Self {
            accounts: Window::new("accounts", ACCOUNT_WINDOW, shared.clone()),
            addresses: Window::new("addresses", MINUTE, shared.clone()),
            turns: Window::new("turns", MINUTE, shared.clone()),
            uploads: Window::new("uploads", MINUTE, shared.clone()),
            salt: Sha256::new()
                .chain_update(b"rechat throttle salt")
                .chain_update(secret)
                .finalize()
                .into(),
        }
    }

    /// The key of an email that has no account (normalised); 8 bytes whatever its length.
    pub fn unknown_email(&self, email: &str) -> AccountKey {
        let digest = Sha256::new()
            .chain_update(self.salt)
            .chain_update(email.as_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        AccountKey::Unknown(u64::from_be_bytes(first))
    }
}

/// A key's name in Redis.
pub trait WindowKey {
    fn shared_key(&self) -> String;
}

impl WindowKey for UserId {
    fn shared_key(&self) -> String {
        self.to_string()
    }
}

impl WindowKey for IpAddr {
    fn shared_key(&self) -> String {
        self.to_string()
    }
}

impl WindowKey for AccountKey {
    fn shared_key(&self) -> String {
        match self {
            Self::Account(id) => format!("account-{id}"),
            Self::Unknown(hash) => format!("email-{hash:016x}"),
        }
    }
}

/// Counts one attempt in a fixed window: the count, or minus the milliseconds left in the
/// window when `max` were counted already (and then nothing is counted).
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local count = redis.call('INCR', KEYS[1])
        if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
        if count > tonumber(ARGV[1]) then
            redis.call('DECR', KEYS[1])
            local left = redis.call('PTTL', KEYS[1])
            if left < 0 then
                redis.call('PEXPIRE', KEYS[1], ARGV[2])
                left = tonumber(ARGV[2])
            end
            return -left
        end
        return count
        ",
    )
});

/// Uncounts one attempt, if any is counted.
static GIVE_BACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local count = tonumber(redis.call('GET', KEYS[1]) or '0')
        if count > 0 then return redis.call('DECR', KEYS[1]) end
        return 0
        ",
    )
});

/// Attempts per key in fixed windows of `length`.
pub struct Window<K> {
    name: &'static str,
    length: Duration,
    counts: Mutex<HashMap<K, (u32, Instant)>>,
    shared: Shared,
}

impl<K: Hash + Eq + Clone + WindowKey> Window<K> {
    pub fn new(name: &'static str, length: Duration, shared: Shared) -> Self {
        Self {
            name,
            length,
            counts: Mutex::default(),
            shared,
        }
    }

    fn shared_key(&self, key: &K) -> String {
        self.shared.key(&["limit", self.name, &key.shared_key()])
    }

    /// Counts one attempt for `key`, unless `max` were already counted in its window: then
    /// `Err(seconds until the window ends)`, and nothing is counted. In Redis when it is
    /// configured and answers, else in this process.
    pub async fn take(&self, key: &K, max: u32) -> Result<(), u64> {
        let shared_key = self.shared_key(key);
        let window_ms = u64::try_from(self.length.as_millis()).unwrap_or(u64::MAX);
        let counted = self
            .shared
            .run(move |mut connection| async move {
                TAKE.key(shared_key)
                    .arg(max)
                    .arg(window_ms)
                    .invoke_async::<i64>(&mut connection)
                    .await
            })
            .await;
        match counted {
            Some(count) if count > 0 => Ok(()),
            Some(left_ms) => Err(left_ms.unsigned_abs().div_ceil(1000).max(1)),
            None => self.take_here(key, max),
        }
    }

    /// Uncounts one attempt of `key` in its current window (one that turned out to be a
    /// retry of an earlier one).
    pub async fn give_back(&self, key: &K) {
        let shared_key = self.shared_key(key);
        let shared = self
            .shared
            .run(move |mut connection| async move {
                GIVE_BACK
                    .key(shared_key)
                    .invoke_async::<i64>(&mut connection)
                    .await
            })
            .await;
        if shared.is_none() {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((count, _)) = counts.get_mut(key) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// Forgets `key`'s attempts (a successful sign-in), here and in Redis.
    pub async fn reset(&self, key: &K) {
        let shared_key = self.shared_key(key);
        self.shared
            .run(move |mut connection| async move {
                redis::cmd("DEL")
                    .arg(shared_key)
                    .query_async::<i64>(&mut connection)
                    .await
            })
            .await;
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// [`take`](Self::take) in this process's memory.
    fn take_here(&self, key: &K, max: u32) -> Result<(), u64> {
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

    impl WindowKey for &str {
        fn shared_key(&self) -> String {
            (*self).to_owned()
        }
    }

    impl WindowKey for usize {
        fn shared_key(&self) -> String {
            self.to_string()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn counts_per_key_in_windows() {
        let window = Window::new("test", MINUTE, Shared::default());
        for _ in 0..3 {
            window.take(&"a", 3).await.unwrap();
        }
        let wait = window.take(&"a", 3).await.unwrap_err();
        assert_eq!(wait, 60);
        window.take(&"b", 3).await.expect("per key");
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(
            window.take(&"a", 3).await.unwrap_err(),
            15,
            "refusals are not counted"
        );
        tokio::time::advance(Duration::from_secs(15)).await;
        window.take(&"a", 3).await.expect("a new window");
        window.reset(&"a").await;
        for _ in 0..3 {
            window.take(&"a", 3).await.unwrap();
        }
        window.give_back(&"a").await;
        window.take(&"a", 3).await.expect("an attempt given back");
        assert!(window.take(&"a", 3).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_whatever_the_keys() {
        let window = Window::new("test", MINUTE, Shared::default());
        for key in 0..CAPACITY {
            window.take(&key, 1).await.unwrap();
        }
        assert!(
            window.take(&CAPACITY, 1).await.is_err(),
            "full: new keys wait"
        );
        tokio::time::advance(MINUTE).await;
        window
            .take(&CAPACITY, 1)
            .await
            .expect("expired keys make room");
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
