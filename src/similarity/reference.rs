//! The exact reference: the model of `similarity`, computed the obvious way — every user
//! against every other user, from the raw labels, with ordered maps instead of sparse
//! matrices. O(users²): for tests and for measuring the fast path's recall, never for
//! serving.
//!
//! It shares only the definitions (`normalise_label`, `idf`, `Params::max_df`) with the
//! fast path and sums in the same ascending feature order, so the two agree bit for bit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{FeatureKind, Mode, Params, SharedFeature, UserFeatures, idf, normalise_label};

/// One neighbour as the reference sees it: index into the users, score, shared features.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    pub user: usize,
    pub score: f64,
    pub shared: Vec<SharedFeature>,
}

/// A user's unit vector: feature key → weight, iterated in key order.
type Vector<K> = BTreeMap<K, f64>;

fn unit<K: Ord>(raw: BTreeMap<K, f64>) -> Vector<K> {
    let mut norm = 0.0;
    for w in raw.values() {
        norm += w * w;
    }
    let norm: f64 = norm.sqrt();
    raw.into_iter().map(|(k, w)| (k, w / norm)).collect()
}

/// The exact top `k` of each user in `queries` (indices into `users`) in `mode`.
pub fn top_k(users: &[UserFeatures], params: &Params, mode: Mode, k: usize, queries: &[usize]) -> Vec<Vec<Neighbour>> {
    let n = users.len();
    let held: Vec<BTreeSet<(FeatureKind, String)>> = users
        .iter()
        .map(|u| {
            let s = u.skills.iter().filter_map(|l| normalise_label(l)).map(|l| (FeatureKind::Skill, l));
            let i = u.interests.iter().filter_map(|l| normalise_label(l)).map(|l| (FeatureKind::Interest, l));
            s.chain(i).collect()
        })
        .collect();
    let mut df: HashMap<(FeatureKind, String), usize> = HashMap::new();
    for f in held.iter().flatten() {
        *df.entry(f.clone()).or_insert(0) += 1;
    }
    let max_df = params.max_df(n);
    let df_of = |kind: FeatureKind, name: &str| df.get(&(kind, name.to_owned())).copied().unwrap_or(0);

    match mode {
        Mode::Similar => {
            let vectors: Vec<Vector<(FeatureKind, String)>> = held
                .iter()
                .map(|fs| unit(fs.iter().filter(|f| df[*f] <= max_df).map(|f| (f.clone(), idf(df[f], n))).collect()))
                .collect();
            let shared = |f: &(FeatureKind, String)| SharedFeature { kind: f.0, name: f.1.clone() };
            queries.iter().map(|&u| rank(users, &vectors, &vectors, u, k, shared)).collect()
        }
        Mode::Complementary => {
            let usable =
                |name: &str| df_of(FeatureKind::Skill, name) <= max_df && df_of(FeatureKind::Interest, name) <= max_df;
            let side = |kind: FeatureKind| -> Vec<Vector<String>> {
                held.iter()
                    .map(|fs| {
                        unit(
                            fs.iter()
                                .filter(|(k, name)| *k == kind && usable(name))
                                .map(|(_, name)| (name.clone(), idf(df_of(FeatureKind::Skill, name), n)))
                                .collect(),
                        )
                    })
                    .collect()
            };
            let (interests, skills) = (side(FeatureKind::Interest), side(FeatureKind::Skill));
            let shared = |name: &String| SharedFeature { kind: FeatureKind::Skill, name: name.clone() };
            queries.iter().map(|&u| rank(users, &interests, &skills, u, k, shared)).collect()
        }
    }
}

/// Scores `queries[u]` against every other user's document vector and keeps the top k.
fn rank<K: Ord>(
    users: &[UserFeatures],
    queries: &[Vector<K>],
    docs: &[Vector<K>],
    u: usize,
    k: usize,
    shared: impl Fn(&K) -> SharedFeature,
) -> Vec<Neighbour> {
    let mut found = Vec::new();
    for (v, doc) in docs.iter().enumerate() {
        if v == u {
            continue;
        }
        let mut score = 0.0;
        let mut both = Vec::new();
        for (key, q) in &queries[u] {
            if let Some(w) = doc.get(key) {
                score += q * w;
                both.push((q * w, key));
            }
        }
        if both.is_empty() {
            continue;
        }
        // Largest contribution first; equal ones in key order (the sort is stable).
        both.sort_by(|a, b| b.0.total_cmp(&a.0));
        found.push(Neighbour { user: v, score, shared: both.into_iter().map(|(_, key)| shared(key)).collect() });
    }
    // Higher score first, equal scores by ascending id.
    found.sort_by(|a, b| b.score.total_cmp(&a.score).then(users[a.user].id.cmp(&users[b.user].id)));
    found.truncate(k);
    found
}
