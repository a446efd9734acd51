//! Recommendation batch benchmark (`make bench-reco`, part of `make bench`): a synthetic
//! population with Zipf-distributed features, the whole batch of both modes timed, the
//! process's peak memory, and recall@10 against exact computations on a sample.
//!
//! A benchmark, not a test: it prints figures (and `RECO_RESULT key=value` lines that
//! `tests/bench/reco.sh` records in docs/BENCHMARKS.md); it asserts nothing about time.
//! Run it in release mode (`cargo bench --bench reco`).

use std::collections::HashSet;
use std::time::Instant;

use cosmicsync::similarity::{Mode, Model, Params, UserFeatures, defaults, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// A knob from the environment, or its default.
fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
        Err(_) => default,
    }
}

/// A figure of this process from /proc/self/status, in KiB (0 where there is no /proc).
fn proc_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// `users` users with 10–20 features each: labels drawn from a Zipf(`s`) vocabulary of
/// `vocabulary` labels, each one a skill or an interest with equal odds.
fn population(users: usize, vocabulary: usize, s: f64, seed: u64) -> Vec<UserFeatures> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cumulative = Vec::with_capacity(vocabulary);
    let mut total = 0.0;
    for rank in 1..=vocabulary {
        total += 1.0 / (rank as f64).powf(s);
        cumulative.push(total);
    }
    let labels: Vec<String> = (0..vocabulary).map(|i| format!("feature {i}")).collect();
    (0..users)
        .map(|_| {
            let n = rng.random_range(10..=20);
            let (mut skills, mut interests) = (Vec::new(), Vec::new());
            for _ in 0..n {
                let x = rng.random::<f64>() * total;
                let label = labels[cumulative.partition_point(|c| *c < x).min(vocabulary - 1)].clone();
                if rng.random_bool(0.5) { skills.push(label) } else { interests.push(label) }
            }
            UserFeatures { id: Uuid::from_u128(rng.random()), skills, interests }
        })
        .collect()
}

/// The share of `want`'s users that `got` also has, over all sampled users.
fn recall(got: &[Vec<u32>], want: &[Vec<u32>]) -> f64 {
    let (mut hit, mut all) = (0usize, 0usize);
    for (g, w) in got.iter().zip(want) {
        let g: HashSet<u32> = g.iter().copied().collect();
        hit += w.iter().filter(|u| g.contains(u)).count();
        all += w.len();
    }
    if all == 0 { 1.0 } else { hit as f64 / all as f64 }
}

fn main() {
    let users: usize = knob("BENCH_RECO_USERS", 100_000);
    let vocabulary: usize = knob("BENCH_RECO_VOCABULARY", 5_000);
    let zipf: f64 = knob("BENCH_RECO_ZIPF", 1.0);
    let k: usize = knob("BENCH_RECO_K", defaults::K);
    let sample: usize = knob("BENCH_RECO_SAMPLE", 200);
    let reference_sample: usize = knob("BENCH_RECO_REFERENCE_SAMPLE", 50);
    let params = Params {
        max_df_fraction: knob("BENCH_RECO_MAX_DF", defaults::MAX_DF_FRACTION),
        max_df_floor: defaults::MAX_DF_FLOOR,
    };
    let threads = rayon::current_num_threads();
    eprintln!("generating {users} users over {vocabulary} labels (Zipf s = {zipf})");
    let people = population(users, vocabulary, zipf, 42);
    let rss_input = proc_kib("VmRSS");

    // The batch as RecommendActor runs it: build, both modes' top k, and the reasons of
    // every match (which it writes next to the scores).
    let start = Instant::now();
    let model = Model::build(&people, &params);
    let built = start.elapsed();
    let mut results = Vec::new();
    let mut reasons = 0usize;
    for mode in Mode::ALL {
        let top = model.top_k(mode, k, &|_| {});
        for (u, ms) in top.iter().enumerate() {
            for m in ms {
                reasons += model.shared(mode, u as u32, m.user).len();
            }
        }
        results.push(top);
    }
    let batch = start.elapsed();
    let peak = proc_kib("VmHWM");
    let stats = model.stats().clone();
    let matches: usize = results.iter().flatten().map(Vec::len).sum();
    let empty: usize = results[0].iter().filter(|ms| ms.is_empty()).count();

    // Recall of the top 10 on a sample: (a) against the brute-force reference of the same
    // model, (b) against the exact model without the common-feature cut-off.
    let mut rng = StdRng::seed_from_u64(7);
    let picks: Vec<u32> = (0..sample.min(users)).map(|_| rng.random_range(0..users as u32)).collect();
    let top10 = |ms: &Vec<cosmicsync::similarity::Match>| ms.iter().take(10).map(|m| m.user).collect::<Vec<_>>();
    let full = Model::build(&people, &Params { max_df_fraction: 1.0, max_df_floor: 0 });
    let mut recall_full = Vec::new();
    let mut recall_reference = Vec::new();
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        let got: Vec<Vec<u32>> = picks.iter().map(|&u| top10(&results[i][u as usize])).collect();
        let exact: Vec<Vec<u32>> = full.top_k_of(mode, 10, &picks, &|_| {}).iter().map(top10).collect();
        recall_full.push(recall(&got, &exact));
        let few: Vec<usize> = picks.iter().take(reference_sample).map(|&u| u as usize).collect();
        let brute: Vec<Vec<u32>> = reference::top_k(&people, &params, mode, 10, &few)
            .iter()
            .map(|ns| ns.iter().map(|n| n.user as u32).collect())
            .collect();
        recall_reference.push(recall(&got[..few.len()], &brute));
    }

    println!(
        "users {users}, labels {vocabulary}, features {} ({} dropped as held by more than {} users), \
         holdings {} ({} kept)",
        stats.features, stats.dropped_features, stats.max_df, stats.holdings, stats.kept_holdings
    );
    println!(
        "batch (build + top {k} of both modes + reasons): {:.2} s (build {:.2} s) on {threads} threads",
        batch.as_secs_f64(),
        built.as_secs_f64()
    );
    println!("peak RSS {:.0} MiB (input alone {:.0} MiB)", peak as f64 / 1024.0, rss_input as f64 / 1024.0);
    println!("matches {matches}, reasons {reasons}, users without a similar neighbour {empty}");
    println!(
        "recall@10 vs brute-force reference (same model, {} users): similar {:.3}, complementary {:.3}",
        reference_sample.min(picks.len()),
        recall_reference[0],
        recall_reference[1]
    );
    println!(
        "recall@10 vs exact model without the cut-off ({} users): similar {:.3}, complementary {:.3}",
        picks.len(),
        recall_full[0],
        recall_full[1]
    );
    println!(
        "RECO_RESULT users={users} vocabulary={vocabulary} zipf={zipf} k={k} threads={threads} \
         max_df_fraction={} max_df={} features={} dropped={} holdings={} kept_holdings={} \
         batch_s={:.3} build_s={:.3} peak_kib={peak} input_kib={rss_input} matches={matches} empty={empty} \
         sample={} reference_sample={} recall_ref_similar={:.4} recall_ref_complementary={:.4} \
         recall_full_similar={:.4} recall_full_complementary={:.4}",
        params.max_df_fraction,
        stats.max_df,
        stats.features,
        stats.dropped_features,
        stats.holdings,
        stats.kept_holdings,
        batch.as_secs_f64(),
        built.as_secs_f64(),
        picks.len(),
        reference_sample.min(picks.len()),
        recall_reference[0],
        recall_reference[1],
        recall_full[0],
        recall_full[1]
    );
}
