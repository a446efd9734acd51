//! Failed-login limits: per client address and per username, so neither one address
//! guessing many accounts nor many addresses guessing one account gets far.
//!
//! The counting is `governor`'s GCRA (a well-kept rate limiter): each failed login
//! takes a cell from both keys' buckets, and a failure that finds a bucket empty blocks
//! that key until the bucket has a cell again. Attempts from a blocked key are answered
//! at once, before any password hashing, so a flood cannot buy bcrypt work. Successful
//! logins take nothing. Unknown and known usernames count alike, so the limit reveals
//! nothing about which accounts exist.
//!
//! It must never store a password, and holds memory only for keys seen recently.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// What a limit applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    Username(String),
}

/// Failed-login limits of one node.
pub struct LoginLimiter {
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    per_username: DefaultKeyedRateLimiter<String>,
    blocked: Mutex<HashMap<Key, Instant>>,
    clock: DefaultClock,
}

fn quota(per_minute: NonZeroU32) -> Quota {
    // A bucket of `per_minute` cells that refills evenly over a minute.
    Quota::per_minute(per_minute).allow_burst(per_minute)
}

impl LoginLimiter {
    /// Allows `per_address` failures a minute from one address and `per_username` for one
    /// username (case-folded), each as a burst that refills over the minute.
    pub fn new(per_address: NonZeroU32, per_username: NonZeroU32) -> Self {
        Self {
            per_address: RateLimiter::keyed(quota(per_address)),
            per_username: RateLimiter::keyed(quota(per_username)),
            blocked: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    fn keys(address: IpAddr, username: &str) -> [Key; 2] {
        [Key::Address(address), Key::Username(crate::validate::username_key(username))]
    }

    /// Before an attempt: `Err(wait)` if the address or the username is blocked.
    pub fn check(&self, address: IpAddr, username: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let wait = Self::keys(address, username)
            .iter()
            .filter_map(|k| blocked.get(k))
            .filter(|until| **until > now)
            .map(|until| *until - now)
            .max();
        wait.map_or(Ok(()), Err)
    }

    /// After a failed attempt: counts it; `Err(wait)` if it used up a key's allowance.
    pub fn failed(&self, address: IpAddr, username: &str) -> Result<(), Duration> {
        let name = crate::validate::username_key(username);
        let now = self.clock.now();
        let mut waits = Vec::with_capacity(2);
        if let Err(not_until) = self.per_address.check_key(&address) {
            waits.push((Key::Address(address), not_until.wait_time_from(now)));
        }
        if let Err(not_until) = self.per_username.check_key(&name) {
            waits.push((Key::Username(name), not_until.wait_time_from(now)));
        }
        let longest = waits.iter().map(|(_, w)| *w).max();
        if !waits.is_empty() {
            let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            for (key, wait) in waits {
                blocked.insert(key, Instant::now() + wait);
            }
        }
        longest.map_or(Ok(()), Err)
    }

    /// Forgets keys whose buckets are full again and blocks that have ended (bounds memory).
    pub fn prune(&self) {
        self.per_address.retain_recent();
        self.per_username.retain_recent();
        let now = Instant::now();
        self.blocked.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_address: u32, per_username: u32) -> LoginLimiter {
        LoginLimiter::new(NonZeroU32::new(per_address).unwrap(), NonZeroU32::new(per_username).unwrap())
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_username_is_blocked_after_its_allowance_from_any_address() {
        let l = limiter(100, 3);
        for addr in [A, B, A] {
            assert!(l.check(addr, "Ada").is_ok());
            assert!(l.failed(addr, "ada").is_ok());
        }
        let wait = l.failed(B, "ADA").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60), "{wait:?}");
        assert!(l.check(A, "ada").is_err(), "blocked for every address");
        assert!(l.check(A, "grace").is_ok(), "other users are not affected");
    }

    #[test]
    fn an_address_is_blocked_after_its_allowance_across_usernames() {
        let l = limiter(2, 100);
        assert!(l.failed(A, "u1").is_ok());
        assert!(l.failed(A, "u2").is_ok());
        assert!(l.failed(A, "u3").is_err());
        assert!(l.check(A, "u4").is_err());
        assert!(l.check(B, "u4").is_ok());
    }

    #[test]
    fn only_failures_count() {
        let l = limiter(1, 1);
        for _ in 0..50 {
            // Successful logins call `check` only.
            assert!(l.check(A, "ada").is_ok());
        }
        assert!(l.failed(A, "ada").is_ok());
        assert!(l.failed(A, "ada").is_err());
    }

    #[test]
    fn prune_keeps_active_blocks() {
        let l = limiter(1, 1);
        let _ = l.failed(A, "ada");
        let _ = l.failed(A, "ada");
        l.prune();
        assert!(l.check(A, "ada").is_err());
    }
}
