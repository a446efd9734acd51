use proptest::prelude::*;

use super::*;

fn user(n: u128, skills: &[&str], interests: &[&str]) -> UserFeatures {
    UserFeatures {
        id: Uuid::from_u128(n),
        skills: skills.iter().map(|s| s.to_string()).collect(),
        interests: interests.iter().map(|s| s.to_string()).collect(),
    }
}

/// One helper for the fast path: the (user index, score) lists of every user.
fn fast(users: &[UserFeatures], params: &Params, mode: Mode, k: usize) -> Vec<Vec<(u32, f64)>> {
    let model = Model::build(users, params);
    model.top_k(mode, k, &|_| {}).into_iter().map(|ms| ms.into_iter().map(|m| (m.user, m.score)).collect()).collect()
}

fn all_params() -> Params {
    Params { max_df_fraction: 1.0, max_df_floor: 0 }
}

#[test]
fn labels_are_trimmed_collapsed_and_case_folded() {
    for (raw, want) in [
        ("Rust", Some("rust")),
        ("  Quantum   Chemistry\t", Some("quantum chemistry")),
        ("ÉCOLE", Some("école")),
        ("", None),
        (" \t\n ", None),
    ] {
        assert_eq!(normalise_label(raw).as_deref(), want, "{raw:?}");
    }
}

#[test]
fn the_common_cut_off_has_a_floor() {
    let p = Params { max_df_fraction: 0.02, max_df_floor: 100 };
    assert_eq!(p.max_df(10), 100);
    assert_eq!(p.max_df(100_000), 2000);
    assert_eq!(Params { max_df_fraction: f64::NAN, max_df_floor: 0 }.max_df(7), 7);
}

#[test]
fn a_shared_rare_feature_beats_a_shared_common_one() {
    let users = [
        user(1, &["rust", "haskell", "a"], &[]),
        user(2, &["rust", "b", "c"], &[]),
        user(3, &["Haskell ", "d", "e"], &[]),
        user(4, &["rust", "f", "g"], &[]),
        user(5, &["rust", "h", "i"], &[]),
    ];
    let model = Model::build(&users, &all_params());
    let top = model.top_k(Mode::Similar, 10, &|_| {});
    // User 1 shares the rare "haskell" with user 3 and the common "rust" with 2, 4 and 5,
    // whose scores tie and so come in id order.
    assert_eq!(top[0].iter().map(|m| m.user).collect::<Vec<_>>(), vec![2, 1, 3, 4], "{:?}", top[0]);
    assert!(top.iter().enumerate().all(|(u, ms)| ms.iter().all(|m| m.user as usize != u)), "never themself");
    let haskell = SharedFeature { kind: FeatureKind::Skill, name: "haskell".into() };
    assert_eq!(model.shared(Mode::Similar, 0, 2), vec![haskell]);
}

#[test]
fn equal_scores_are_ordered_by_id_and_k_limits() {
    let users = [user(30, &["go"], &[]), user(10, &["go"], &[]), user(20, &["go"], &[]), user(40, &["go"], &[])];
    let top = fast(&users, &all_params(), Mode::Similar, 2);
    assert_eq!(top[0].iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(top[1].iter().map(|m| m.0).collect::<Vec<_>>(), vec![2, 0]);
    assert!(fast(&users, &all_params(), Mode::Similar, 0).iter().all(Vec::is_empty));
}

#[test]
fn common_features_are_dropped_from_every_vector() {
    let users =
        [user(1, &["email"], &[]), user(2, &["email"], &[]), user(3, &["email", "rust"], &[]), user(4, &["rust"], &[])];
    // At most 2 holders: "email" (3 holders) is dropped, "rust" (2) kept.
    let params = Params { max_df_fraction: 0.5, max_df_floor: 0 };
    let model = Model::build(&users, &params);
    assert_eq!(model.stats().dropped_features, 1);
    let top = model.top_k(Mode::Similar, 5, &|_| {});
    assert!(top[0].is_empty() && top[1].is_empty(), "{top:?}");
    assert_eq!(top[2], vec![Match { user: 3, score: top[2][0].score }]);
    assert!((top[2][0].score - 1.0).abs() < 1e-12, "rust is all either vector holds");
}

#[test]
fn complementary_matches_my_interests_to_their_skills() {
    let users = [
        user(1, &["rust"], &["Gardening", "knitting"]),
        user(2, &["gardening"], &[]),
        user(3, &[], &["gardening"]),
        user(4, &["knitting", "gardening"], &["rust"]),
    ];
    let model = Model::build(&users, &all_params());
    let top = model.top_k(Mode::Complementary, 5, &|_| {});
    assert_eq!(top[0].iter().map(|m| m.user).collect::<Vec<_>>(), vec![3, 1], "{:?}", top[0]);
    assert_eq!(top[2].iter().map(|m| m.user).collect::<Vec<_>>(), vec![1, 3], "an interest finds its skill holders");
    assert_eq!(top[3].iter().map(|m| m.user).collect::<Vec<_>>(), vec![0]);
    let why = model.shared(Mode::Complementary, 0, 3);
    assert_eq!(why.len(), 2);
    assert!(why.iter().all(|f| f.kind == FeatureKind::Skill));
    assert!(top[1].is_empty(), "no interests, nobody to learn from");
}

#[test]
fn empty_and_featureless_populations_work() {
    assert!(fast(&[], &Params::default(), Mode::Similar, 5).is_empty());
    let users = [user(1, &[], &[]), user(2, &["  "], &[""])];
    for mode in Mode::ALL {
        assert!(fast(&users, &Params::default(), mode, 5).iter().all(Vec::is_empty));
    }
}

#[test]
fn modes_round_trip_their_names() {
    for mode in Mode::ALL {
        assert_eq!(Mode::parse(mode.as_str()), Some(mode));
    }
    assert_eq!(Mode::parse("Similar"), None);
}

/// A label from a small vocabulary, dressed up in the ways people type it.
fn label() -> impl Strategy<Value = String> {
    let words = ["rust", "Go", "quantum chemistry", "ML", "cooking", "Design", "sql", "art", "math", "  "];
    (0..words.len(), 0..4u8).prop_map(move |(i, dress)| match dress {
        0 => words[i].to_owned(),
        1 => words[i].to_uppercase(),
        2 => format!("  {} ", words[i].replace(' ', "   ")),
        _ => words[i].to_lowercase(),
    })
}

fn population() -> impl Strategy<Value = Vec<UserFeatures>> {
    prop::collection::vec(
        (any::<u128>(), prop::collection::vec(label(), 0..6), prop::collection::vec(label(), 0..6)),
        0..40,
    )
    .prop_map(|users| {
        users
            .into_iter()
            .map(|(id, skills, interests)| UserFeatures { id: Uuid::from_u128(id), skills, interests })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The fast path's top-k is the exact top-k: same users, same order, same scores,
    /// same reasons, in both modes, for any cut-off and k.
    #[test]
    fn top_k_equals_the_brute_force_reference(
        users in population(),
        k in 0usize..8,
        fraction in 0.0f64..1.0,
        floor in 0usize..12,
    ) {
        let params = Params { max_df_fraction: fraction, max_df_floor: floor };
        let model = Model::build(&users, &params);
        let everyone: Vec<usize> = (0..users.len()).collect();
        for mode in Mode::ALL {
            let got = model.top_k(mode, k, &|_| {});
            let want = reference::top_k(&users, &params, mode, k, &everyone);
            prop_assert_eq!(got.len(), want.len());
            for (u, (g, w)) in got.iter().zip(&want).enumerate() {
                let g_users: Vec<usize> = g.iter().map(|m| m.user as usize).collect();
                let w_users: Vec<usize> = w.iter().map(|n| n.user).collect();
                prop_assert_eq!(&g_users, &w_users, "user {} in {:?} mode", u, mode);
                for (m, n) in g.iter().zip(w) {
                    prop_assert!((m.score - n.score).abs() <= 1e-12, "{} vs {}", m.score, n.score);
                    prop_assert_eq!(model.shared(mode, u as u32, m.user), n.shared.clone());
                }
            }
        }
    }

    /// Scores are cosines: in (0, 1], and symmetric in similar mode.
    #[test]
    fn similar_scores_are_symmetric_cosines(users in population()) {
        let model = Model::build(&users, &all_params());
        let top = model.top_k(Mode::Similar, users.len(), &|_| {});
        for (u, ms) in top.iter().enumerate() {
            for m in ms {
                prop_assert!(m.score > 0.0 && m.score <= 1.0 + 1e-12, "{}", m.score);
                let back = top[m.user as usize].iter().find(|b| b.user as usize == u);
                prop_assert!(back.is_some_and(|b| (b.score - m.score).abs() < 1e-12));
            }
        }
    }
}
