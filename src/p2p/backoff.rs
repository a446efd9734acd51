//! Dial back-off: after a failed dial a peer is not dialled again until a delay has
//! passed, doubling with each consecutive failure up to a ceiling, so an unreachable peer
//! costs the node almost nothing. A success forgets the peer's failures.
//!
//! Pure: the caller passes the current time, so it is tested without waiting.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Per-key exponential back-off.
#[derive(Debug)]
pub struct Backoff<K> {
    base: Duration,
    max: Duration,
    entries: HashMap<K, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    until: Instant,
}

impl<K: Eq + Hash + Clone> Backoff<K> {
    /// Back-off starting at `base`, never longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, entries: HashMap::new() }
    }

    /// Whether `key` may be dialled at `now`.
    pub fn may_dial(&self, key: &K, now: Instant) -> bool {
        self.entries.get(key).is_none_or(|e| now >= e.until)
    }

    /// Records a failed dial at `now`; returns how long the key now waits.
    pub fn failed(&mut self, key: K, now: Instant) -> Duration {
        let entry = self.entries.entry(key).or_insert(Entry { failures: 0, until: now });
        entry.failures = entry.failures.saturating_add(1);
        let factor = 1u32.checked_shl(entry.failures - 1).unwrap_or(u32::MAX);
        let delay = self.base.saturating_mul(factor).min(self.max);
        entry.until = now + delay;
        delay
    }

    /// Records a successful connection: the key's failures are forgotten.
    pub fn succeeded(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Forgets keys whose back-off ended before `now` at least `max` ago, so the map
    /// cannot grow without bound with peers seen once.
    pub fn prune(&mut self, now: Instant) {
        let max = self.max;
        self.entries.retain(|_, e| now.saturating_duration_since(e.until) < max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets_on_success() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let t = Instant::now();
        assert!(b.may_dial(&"p", t));
        let delays: Vec<u64> = (0..6).map(|_| b.failed("p", t).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert!(!b.may_dial(&"p", t + Duration::from_secs(9)));
        assert!(b.may_dial(&"p", t + Duration::from_secs(10)));
        assert!(b.may_dial(&"q", t), "other keys are not held back");
        b.succeeded(&"p");
        assert!(b.may_dial(&"p", t));
        assert!(b.entries.is_empty());
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let t = Instant::now();
        for _ in 0..1000 {
            assert!(b.failed(1, t) <= Duration::from_secs(300));
        }
    }

    #[test]
    fn prune_forgets_old_entries_only() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let t = Instant::now();
        b.failed("old", t);
        b.failed("new", t + Duration::from_secs(15));
        b.prune(t + Duration::from_secs(15));
        assert_eq!(b.entries.len(), 1);
        assert!(!b.may_dial(&"new", t + Duration::from_secs(15)));
    }
}
