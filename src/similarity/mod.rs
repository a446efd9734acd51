//! User-user similarity for recommendations: sparse TF-IDF vectors over profile features,
//! compared by cosine similarity, top-k neighbours for every user in one batch.
//!
//! # The model
//!
//! - A **feature** is a `(kind, label)` pair: kind `skill` or `interest`, label normalised
//!   by [`normalise_label`] (trimmed, inner white space collapsed, case-folded). A user
//!   holds a feature or not (binary term frequency); repeats count once.
//! - **Common features are dropped.** A feature held by more than [`Params::max_df`] users
//!   (`max(max_df_floor, ceil(max_df_fraction × users))`) is removed from every vector, as
//!   a stop word is. It says little about who is alike (its IDF is near the minimum), and
//!   its posting list would make the work quadratic: a feature held by `d` users costs
//!   `d²` multiply-adds. Users who share only such features are not neighbours.
//! - **Weights**: `idf(d) = ln((1 + N) / (1 + d)) + 1` for a feature held by `d` of the `N`
//!   users, so rare features count more; each vector is then scaled to unit length.
//! - **Similar** mode: a user's vector holds their skills and their interests (as separate
//!   features); the score of a pair is the cosine of their vectors.
//! - **Complementary** mode ("who has the skills I want to learn?"): my *interests* vector
//!   against other users' *skills* vectors, over the shared vocabulary of labels. Both
//!   sides weight a label by the IDF of the *skill* (how rare it is to be able to teach
//!   it); a label is left out on both sides when either its skill or its interest feature
//!   is common. Interests nobody has as a skill stay in my vector (they match no one, and
//!   scale all of my scores alike).
//! - **Top-k**: the `k` highest-scoring other users (never the user themself) with a
//!   score above zero; equal scores are ordered by user id, ascending. Scores are summed
//!   in ascending feature order, so every implementation of this definition that follows
//!   that order gets bit-identical scores (see `reference`, which the property test
//!   compares against exactly).
//!
//! # The computation
//!
//! Sparse rows (CSR) and their posting lists (the transpose): for each user, walk their
//! features' posting lists and accumulate products into a dense per-thread accumulator,
//! then select the top k of the touched candidates. The cost is `Σ d(f)²` over kept
//! features (bounded by `max_df × Σ d(f)`), never all pairs; memory is the vectors, their
//! postings, `k` matches per user and one accumulator of `N` floats per thread. Work is
//! spread over the rayon pool in chunks of users.
//!
//! This module is pure: no actor, no I/O, no async. It must never panic on any input.

mod records;
pub mod reference;

pub use records::{RecoInput, RecoRow, RunRecord};

use std::collections::{BinaryHeap, HashMap};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// What a feature says about a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// Something the user can do.
    Skill,
    /// Something the user wants to do or learn.
    Interest,
}

/// Which question a recommendation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Users whose skills and interests are most like mine.
    Similar,
    /// Users whose skills match my interests.
    Complementary,
}

impl Mode {
    /// Both modes, in the order a batch computes them.
    pub const ALL: [Mode; 2] = [Mode::Similar, Mode::Complementary];

    /// The name used in URLs and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Similar => "similar",
            Mode::Complementary => "complementary",
        }
    }

    /// Parses `similar` or `complementary`.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// One user's raw features, as stored in their profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFeatures {
    pub id: Uuid,
    pub skills: Vec<String>,
    pub interests: Vec<String>,
}

/// A feature that made a match: why two users were paired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SharedFeature {
    /// In complementary mode always `skill`: the other user's skill that matches my interest.
    pub kind: FeatureKind,
    /// The normalised label.
    pub name: String,
}

/// One neighbour of a user: an index into the users the model was built from, and the score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    pub user: u32,
    pub score: f64,
}

/// The tunable parts of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Features held by more than this fraction of users are dropped (see the module docs).
    pub max_df_fraction: f64,
    /// …but never when held by at most this many users, so small populations keep all.
    pub max_df_floor: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params { max_df_fraction: defaults::MAX_DF_FRACTION, max_df_floor: defaults::MAX_DF_FLOOR }
    }
}

/// Defaults of the model, in one place so docs, config and code agree.
pub mod defaults {
    /// Neighbours kept per user and mode.
    pub const K: usize = 20;
    /// See [`super::Params::max_df_fraction`].
    pub const MAX_DF_FRACTION: f64 = 0.02;
    /// See [`super::Params::max_df_floor`].
    pub const MAX_DF_FLOOR: usize = 100;
}

impl Params {
    /// The most users a feature may be held by and still count, for `users` users.
    pub fn max_df(&self, users: usize) -> usize {
        let fraction = if self.max_df_fraction.is_finite() { self.max_df_fraction.clamp(0.0, 1.0) } else { 1.0 };
        let by_fraction = (fraction * users as f64).ceil() as usize;
        by_fraction.max(self.max_df_floor)
    }
}

/// Trimmed, inner white space collapsed to one space, case-folded; `None` if empty.
pub fn normalise_label(label: &str) -> Option<String> {
    let words: Vec<&str> = label.split_whitespace().collect();
    (!words.is_empty()).then(|| words.join(" ").to_lowercase())
}

/// The inverse document frequency of a feature held by `df` of `n` users (always ≥ 1).
pub fn idf(df: usize, n: usize) -> f64 {
    ((1.0 + n as f64) / (1.0 + df as f64)).ln() + 1.0
}

/// Figures about a built model, for logs and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    pub users: usize,
    /// Distinct features seen (skills and interests counted apart).
    pub features: usize,
    /// Features dropped as common.
    pub dropped_features: usize,
    /// The cut-off: features held by more users than this were dropped.
    pub max_df: usize,
    /// Feature holdings before and after dropping the common ones.
    pub holdings: usize,
    pub kept_holdings: usize,
}

/// Sparse rows with sorted columns (compressed sparse rows).
#[derive(Debug, Default)]
struct Csr {
    offsets: Vec<usize>,
    cols: Vec<u32>,
    vals: Vec<f64>,
}

impl Csr {
    /// Builds rows from per-row (column, weight) lists: sorts each by column and scales
    /// it to unit length, summing squares in column order.
    fn from_rows(rows: impl Iterator<Item = Vec<(u32, f64)>>) -> Csr {
        let mut csr = Csr { offsets: vec![0], ..Csr::default() };
        for mut row in rows {
            row.sort_by_key(|(c, _)| *c);
            row.dedup_by_key(|(c, _)| *c);
            let norm = row.iter().fold(0.0, |s, (_, w)| s + w * w).sqrt();
            for (c, w) in row {
                csr.cols.push(c);
                csr.vals.push(w / norm);
            }
            csr.offsets.push(csr.cols.len());
        }
        csr
    }

    fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    fn row(&self, r: usize) -> impl Iterator<Item = (u32, f64)> + '_ {
        let range = self.offsets[r]..self.offsets[r + 1];
        self.cols[range.clone()].iter().copied().zip(self.vals[range].iter().copied())
    }

    /// The transpose, `columns` wide: for each column, its (row, weight) in row order.
    fn transpose(&self, columns: usize) -> Csr {
        let mut counts = vec![0usize; columns + 1];
        for &c in &self.cols {
            counts[c as usize + 1] += 1;
        }
        for i in 1..counts.len() {
            counts[i] += counts[i - 1];
        }
        let mut next = counts.clone();
        let mut cols = vec![0u32; self.cols.len()];
        let mut vals = vec![0.0; self.vals.len()];
        for r in 0..self.rows() {
            for (c, w) in self.row(r) {
                let at = &mut next[c as usize];
                cols[*at] = r as u32;
                vals[*at] = w;
                *at += 1;
            }
        }
        Csr { offsets: counts, cols, vals }
    }
}

/// The vectors one mode compares: queries against documents, through the documents' postings.
#[derive(Debug, Default)]
struct Space {
    queries: Csr,
    /// `None` when the documents are the queries themselves (similar mode).
    docs: Option<Csr>,
    postings: Csr,
}

impl Space {
    fn docs(&self) -> &Csr {
        self.docs.as_ref().unwrap_or(&self.queries)
    }
}

/// The built model: vectors for both modes over one population.
#[derive(Debug)]
pub struct Model {
    ids: Vec<Uuid>,
    /// Feature id → (kind, label), sorted, so feature order is (kind, label) order.
    features: Vec<(FeatureKind, String)>,
    /// Term id → label, sorted (complementary mode's columns).
    terms: Vec<String>,
    similar: Space,
    complementary: Space,
    stats: ModelStats,
}

/// What one rayon task reuses from user to user: the dense accumulator (one slot per
/// document), the slots it touched, and the candidates.
struct Scratch {
    acc: Vec<f64>,
    touched: Vec<u32>,
    found: BinaryHeap<Ranked>,
}

/// A candidate in ranking order: `a < b` when `a` ranks before `b` (higher score, then
/// lower id), so a max-heap's top is the worst candidate kept.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    score: f64,
    id: Uuid,
    user: u32,
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.score.total_cmp(&self.score).then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ranked {}

/// How many users a rayon task handles: large enough that allocating its accumulator
/// is cheap next to the work, small enough to balance two cores.
const CHUNK: usize = 512;

impl Model {
    /// Builds the vectors of both modes for `users` (their order is the index of every
    /// [`Match`]).
    pub fn build(users: &[UserFeatures], params: &Params) -> Model {
        let n = users.len();
        // Each user's distinct normalised features.
        let held: Vec<Vec<(FeatureKind, String)>> = users
            .iter()
            .map(|u| {
                let skills = u.skills.iter().filter_map(|s| normalise_label(s)).map(|s| (FeatureKind::Skill, s));
                let interests =
                    u.interests.iter().filter_map(|s| normalise_label(s)).map(|s| (FeatureKind::Interest, s));
                let mut f: Vec<_> = skills.chain(interests).collect();
                f.sort();
                f.dedup();
                f
            })
            .collect();
        let mut df: HashMap<&(FeatureKind, String), usize> = HashMap::new();
        for f in held.iter().flatten() {
            *df.entry(f).or_default() += 1;
        }
        let max_df = params.max_df(n);
        let mut features: Vec<(FeatureKind, String)> = df.keys().map(|f| (*f).clone()).collect();
        features.sort();
        let feature_id: HashMap<&(FeatureKind, String), u32> =
            features.iter().enumerate().map(|(i, f)| (f, i as u32)).collect();
        let df_of = |kind: FeatureKind, name: &str| df.get(&(kind, name.to_owned())).copied().unwrap_or(0);
        let kept = |f: &(FeatureKind, String)| df[f] <= max_df;

        let similar_rows = held
            .iter()
            .map(|fs| fs.iter().filter(|f| kept(f)).map(|f| (feature_id[f], idf(df[f], n))).collect::<Vec<_>>());
        let similar_queries = Csr::from_rows(similar_rows);
        let similar =
            Space { postings: similar_queries.transpose(features.len()), queries: similar_queries, docs: None };

        // Complementary: labels usable on both sides are those whose skill and interest
        // features are both kept (or absent).
        let mut terms: Vec<String> = features.iter().map(|(_, name)| name.clone()).collect();
        terms.sort();
        terms.dedup();
        let term_id: HashMap<&str, u32> = terms.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
        let term_weight: Vec<Option<f64>> = terms
            .iter()
            .map(|t| {
                let (s, i) = (df_of(FeatureKind::Skill, t), df_of(FeatureKind::Interest, t));
                (s <= max_df && i <= max_df).then(|| idf(s, n))
            })
            .collect();
        let side = |kind: FeatureKind| {
            Csr::from_rows(held.iter().map(|fs| {
                fs.iter()
                    .filter(|(k, _)| *k == kind)
                    .filter_map(|(_, name)| {
                        let t = term_id[name.as_str()];
                        term_weight[t as usize].map(|w| (t, w))
                    })
                    .collect::<Vec<_>>()
            }))
        };
        let docs = side(FeatureKind::Skill);
        let complementary =
            Space { queries: side(FeatureKind::Interest), postings: docs.transpose(terms.len()), docs: Some(docs) };

        let holdings = held.iter().map(Vec::len).sum();
        let stats = ModelStats {
            users: n,
            features: features.len(),
            dropped_features: features.iter().filter(|f| !kept(f)).count(),
            max_df,
            holdings,
            kept_holdings: similar.queries.cols.len(),
        };
        Model { ids: users.iter().map(|u| u.id).collect(), features, terms, similar, complementary, stats }
    }

    /// Figures about the model.
    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the model has no users.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of user `index`.
    pub fn id(&self, index: u32) -> Uuid {
        self.ids[index as usize]
    }

    fn space(&self, mode: Mode) -> &Space {
        match mode {
            Mode::Similar => &self.similar,
            Mode::Complementary => &self.complementary,
        }
    }

    /// The top `k` neighbours of every user (best first); `progress` is called with the
    /// number of users finished since its last call.
    pub fn top_k(&self, mode: Mode, k: usize, progress: &(dyn Fn(usize) + Sync)) -> Vec<Vec<Match>> {
        let everyone: Vec<u32> = (0..self.len() as u32).collect();
        self.top_k_of(mode, k, &everyone, progress)
    }

    /// The top `k` neighbours of the users in `queries` (indices), in that order; an index
    /// out of range gets no neighbours.
    pub fn top_k_of(
        &self,
        mode: Mode,
        k: usize,
        queries: &[u32],
        progress: &(dyn Fn(usize) + Sync),
    ) -> Vec<Vec<Match>> {
        let space = self.space(mode);
        let parts: Vec<Vec<Vec<Match>>> = queries
            .par_chunks(CHUNK)
            .map(|chunk| {
                let mut scratch =
                    Scratch { acc: vec![0.0; space.docs().rows()], touched: Vec::new(), found: BinaryHeap::new() };
                let part: Vec<Vec<Match>> = chunk
                    .iter()
                    .map(|&u| {
                        if (u as usize) < self.len() {
                            self.neighbours(space, u as usize, k, &mut scratch)
                        } else {
                            Vec::new()
                        }
                    })
                    .collect();
                progress(chunk.len());
                part
            })
            .collect();
        parts.into_iter().flatten().collect()
    }

    /// One user's top k: accumulate over the postings of their features, then select
    /// from the touched candidates (in `scratch`, reused across users).
    fn neighbours(&self, space: &Space, u: usize, k: usize, scratch: &mut Scratch) -> Vec<Match> {
        let Scratch { acc, touched, found } = scratch;
        for (c, q) in space.queries.row(u) {
            for (v, w) in space.postings.row(c as usize) {
                let slot = &mut acc[v as usize];
                // Weights are positive, so an untouched slot is exactly zero.
                if *slot == 0.0 {
                    touched.push(v);
                }
                *slot += q * w;
            }
        }
        // Keep the best k in a heap whose top is the worst kept: most candidates lose to
        // it on the score alone.
        found.clear();
        for v in touched.drain(..) {
            let score = std::mem::take(&mut acc[v as usize]);
            if v as usize == u || k == 0 {
                continue;
            }
            let candidate = Ranked { score, id: self.ids[v as usize], user: v };
            if found.len() < k {
                found.push(candidate);
            } else if found.peek().is_some_and(|worst| candidate < *worst) {
                found.pop();
                found.push(candidate);
            }
        }
        let mut top = Vec::with_capacity(found.len());
        while let Some(worst) = found.pop() {
            top.push(Match { user: worst.user, score: worst.score });
        }
        top.reverse();
        top
    }

    /// The features that made `u` and `v` a match in `mode`, largest contribution first
    /// (then by kind and label).
    pub fn shared(&self, mode: Mode, u: u32, v: u32) -> Vec<SharedFeature> {
        let space = self.space(mode);
        if u as usize >= self.len() || v as usize >= self.len() {
            return Vec::new();
        }
        let (a, b) = (space.queries.row(u as usize), space.docs().row(v as usize));
        let mut both: Vec<(f64, u32)> = merge_join(a, b).map(|(c, x, y)| (x * y, c)).collect();
        both.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        both.into_iter()
            .map(|(_, c)| match mode {
                Mode::Similar => {
                    let (kind, name) = &self.features[c as usize];
                    SharedFeature { kind: *kind, name: name.clone() }
                }
                Mode::Complementary => SharedFeature { kind: FeatureKind::Skill, name: self.terms[c as usize].clone() },
            })
            .collect()
    }
}

/// The columns two sorted sparse rows share, with both weights.
fn merge_join(
    a: impl Iterator<Item = (u32, f64)>,
    b: impl Iterator<Item = (u32, f64)>,
) -> impl Iterator<Item = (u32, f64, f64)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || {
        loop {
            let (&(ca, wa), &(cb, wb)) = (a.peek()?, b.peek()?);
            match ca.cmp(&cb) {
                std::cmp::Ordering::Less => {
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    a.next();
                    b.next();
                    return Some((ca, wa, wb));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;
