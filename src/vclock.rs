//! Vector clocks: the version of every replicated row.
//!
//! A clock maps a node id to the number of updates that node has made to the row.
//! Comparing two clocks tells whether one version descends from the other or whether
//! they were written concurrently (a conflict). Pure logic: no I/O, no actor, no time.
//! It must never lose an entry: merging is a pointwise maximum.

use std::cmp::Ordering as StdOrdering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How two clocks relate in the happened-before partial order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Both clocks describe the same history.
    Equal,
    /// The left clock happened before the right one (the right descends from it).
    Before,
    /// The left clock happened after the right one.
    After,
    /// Neither descends from the other: concurrent updates.
    Concurrent,
}

/// A vector clock `{node_id: counter}`; absent entries count as zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VectorClock(BTreeMap<String, u64>);

impl VectorClock {
    /// The empty clock (no updates yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `node` (zero when absent).
    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Records one more update made by `node`.
    pub fn increment(&mut self, node: &str) {
        let counter = self.0.entry(node.to_owned()).or_insert(0);
        *counter = counter.saturating_add(1);
    }

    /// The clock after one more update made by `node`.
    pub fn incremented(&self, node: &str) -> Self {
        let mut next = self.clone();
        next.increment(node);
        next
    }

    /// Pointwise maximum: the smallest clock that descends from both.
    pub fn merge(&mut self, other: &VectorClock) {
        for (node, &counter) in &other.0 {
            let mine = self.0.entry(node.clone()).or_insert(0);
            *mine = (*mine).max(counter);
        }
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &VectorClock) -> Causality {
        let mut less = false;
        let mut greater = false;
        for node in self.0.keys().chain(other.0.keys()) {
            match self.get(node).cmp(&other.get(node)) {
                StdOrdering::Less => less = true,
                StdOrdering::Greater => greater = true,
                StdOrdering::Equal => {}
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// True when `self` descends from `other` or equals it.
    pub fn dominates(&self, other: &VectorClock) -> bool {
        matches!(self.compare(other), Causality::Equal | Causality::After)
    }

    /// The clock's entries with zero counters dropped, so equal histories compare
    /// equal whatever zeros they carry.
    fn normalized(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.0.iter().filter(|(_, c)| **c > 0)
    }

    /// The non-zero entries in node order (equal histories give equal sequences).
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.normalized().map(|(n, c)| (n.as_str(), *c))
    }

    /// A strong HTTP entity tag for a row version: a hash of the normalised clock.
    /// Two versions have the same tag exactly when their clocks are equal.
    pub fn etag(&self) -> String {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for (node, counter) in self.normalized() {
            hasher.update(node.as_bytes());
            hasher.update(&[0]);
            hasher.update(&counter.to_le_bytes());
        }
        format!("\"{:032x}\"", hasher.digest128())
    }
}

/// Whether an `If-Match` header value allows a write to the version tagged `current`:
/// `*`, or a comma-separated list holding `current` (strong comparison: weak tags never match).
pub fn if_match_allows(header: &str, current: &str) -> bool {
    header.split(',').map(str::trim).any(|tag| tag == "*" || tag == current)
}

impl PartialOrd for VectorClock {
    fn partial_cmp(&self, other: &Self) -> Option<StdOrdering> {
        match self.compare(other) {
            Causality::Equal => Some(StdOrdering::Equal),
            Causality::Before => Some(StdOrdering::Less),
            Causality::After => Some(StdOrdering::Greater),
            Causality::Concurrent => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock(entries: &[(&str, u64)]) -> VectorClock {
        VectorClock(entries.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect())
    }

    fn check(a: &[(&str, u64)], b: &[(&str, u64)], expect: Causality) {
        assert_eq!(clock(a).compare(&clock(b)), expect, "{a:?} vs {b:?}");
    }

    #[test]
    fn compares_histories() {
        check(&[], &[], Causality::Equal);
        check(&[("a", 1)], &[("a", 1), ("b", 0)], Causality::Equal);
        check(&[("a", 1)], &[("a", 2)], Causality::Before);
        check(&[("a", 2), ("b", 1)], &[("a", 2)], Causality::After);
        check(&[("a", 1)], &[("b", 1)], Causality::Concurrent);
        check(&[("a", 2), ("b", 1)], &[("a", 1), ("b", 2)], Causality::Concurrent);
    }

    #[test]
    fn increment_makes_a_descendant() {
        let base = clock(&[("a", 3), ("b", 1)]);
        let next = base.incremented("b");
        assert_eq!(next.get("b"), 2);
        assert_eq!(base.compare(&next), Causality::Before);
        assert!(next.dominates(&base));
        assert!(!base.dominates(&next));
    }

    #[test]
    fn if_match_uses_strong_comparison() {
        let tag = clock(&[("a", 1)]).etag();
        assert!(if_match_allows("*", &tag));
        assert!(if_match_allows(&tag, &tag));
        assert!(if_match_allows(&format!("\"x\", {tag}"), &tag));
        assert!(!if_match_allows(&format!("W/{tag}"), &tag));
        assert!(!if_match_allows("\"nope\"", &tag));
    }

    #[test]
    fn etag_follows_clock_equality() {
        assert_eq!(clock(&[("a", 1)]).etag(), clock(&[("a", 1), ("b", 0)]).etag());
        assert_ne!(clock(&[("a", 1)]).etag(), clock(&[("a", 2)]).etag());
        assert_ne!(clock(&[("a", 1)]).etag(), clock(&[("b", 1)]).etag());
    }

    fn arb_clock() -> impl Strategy<Value = VectorClock> {
        prop::collection::btree_map(prop::sample::select(vec!["n1", "n2", "n3", "n4"]), 0u64..5, 0..4)
            .prop_map(|m| VectorClock(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    fn merged(a: &VectorClock, b: &VectorClock) -> VectorClock {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    proptest! {
        #[test]
        fn order_is_reflexive(a in arb_clock()) {
            prop_assert_eq!(a.compare(&a), Causality::Equal);
        }

        #[test]
        fn order_is_antisymmetric(a in arb_clock(), b in arb_clock()) {
            let expected = match a.compare(&b) {
                Causality::Before => Causality::After,
                Causality::After => Causality::Before,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), expected);
        }

        #[test]
        fn order_is_transitive(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
            if a.dominates(&b) && b.dominates(&c) {
                prop_assert!(a.dominates(&c));
            }
        }

        #[test]
        fn merge_is_commutative(a in arb_clock(), b in arb_clock()) {
            prop_assert_eq!(merged(&a, &b).compare(&merged(&b, &a)), Causality::Equal);
        }

        #[test]
        fn merge_is_associative(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
            let left = merged(&merged(&a, &b), &c);
            let right = merged(&a, &merged(&b, &c));
            prop_assert_eq!(left.compare(&right), Causality::Equal);
        }

        #[test]
        fn merge_is_idempotent(a in arb_clock(), b in arb_clock()) {
            let once = merged(&a, &b);
            prop_assert_eq!(merged(&once, &b).compare(&once), Causality::Equal);
            prop_assert_eq!(merged(&a, &a).compare(&a), Causality::Equal);
        }

        #[test]
        fn merge_is_the_least_upper_bound(a in arb_clock(), b in arb_clock()) {
            let m = merged(&a, &b);
            prop_assert!(m.dominates(&a) && m.dominates(&b));
        }
    }
}
