//! Replication benchmark (`make bench-sync`, part of `make bench`): real nodes on
//! loopback, each with its own PostgreSQL.
//!
//! (a) propagation: p50 and p99 from a write's 201 on one node until the change is
//!     committed on every one of `SYNC_NODES` nodes (seen on each node's WebSocket),
//!     beside the libp2p ping round trip between the same nodes;
//! (b) catch-up: changes applied per second by a node that rejoins after missing
//!     `SYNC_MISSED` changes, beside `COPY` of the same rows into the same PostgreSQL;
//! (c) reconciliation bytes: two nodes holding those rows, differing in 10.
//!
//! A benchmark, not a test: it prints figures and `SYNC_RESULT key=value` lines that
//! `tests/bench/sync.sh` records in docs/BENCHMARKS.md; it asserts nothing about time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{NetworkKey, create_projects, login_on, start_member};
use common::{Node, TestUser, wait_for};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
        Err(_) => default,
    }
}

fn result(key: &str, value: impl std::fmt::Display) {
    println!("SYNC_RESULT {key}={value}");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Arrival times of project changes on one node's WebSocket, by project id.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn watch(node: &Node, user: &TestUser, arrivals: Arrivals) {
    let mut ws = node.ws(Some(&user.token)).await;
    ws.send(Message::text(json!({ "type": "subscribe", "topics": ["projects"] }).to_string()))
        .await
        .expect("subscribe");
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(text) = msg
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["type"] == "change"
                && let Some(id) = v["id"].as_str()
            {
                arrivals.lock().expect("arrivals").entry(id.to_owned()).or_insert_with(Instant::now);
            }
        }
    });
}

async fn propagation(nodes: usize, writes: usize) {
    let key = NetworkKey::new();
    let first = start_member(&key.path, &[], &[]).await;
    let mut all = vec![first];
    for _ in 1..nodes {
        let n = start_member(&key.path, &[&all[0]], &[]).await;
        all.push(n);
    }
    let ada = all[0].user("ada").await;
    let mut users = vec![ada.clone()];
    for n in &all[1..] {
        users.push(login_on(n, &ada).await);
    }
    // Wait until the network has settled: everyone connected to several peers.
    for n in &all {
        wait_for("peers", Duration::from_secs(120), || async {
            let peers = common::p2p::ask(n, cosmicsync::control::Request::NetworkPeers)?;
            (peers.as_array()?.len() >= (nodes - 1).min(4)).then_some(())
        })
        .await;
    }
    let arrivals: Vec<Arrivals> = (0..nodes).map(|_| Arc::new(Mutex::new(HashMap::new()))).collect();
    for ((n, u), a) in all.iter().zip(&users).zip(&arrivals) {
        watch(n, u, a.clone()).await;
    }
    let mut times = Vec::with_capacity(writes);
    for i in 0..writes + 10 {
        let w = i % nodes;
        let res = all[w]
            .req(Method::POST, "/api/v1/projects", &users[w])
            .json(&json!({ "name": format!("p{i}") }))
            .send()
            .await
            .expect("post");
        let acked = Instant::now();
        assert_eq!(res.status(), 201);
        let id = res.json::<Value>().await.expect("body")["id"].as_str().expect("id").to_owned();
        let last = wait_for("the change on every node", Duration::from_secs(60), || {
            let seen: Option<Vec<Instant>> =
                arrivals.iter().map(|a| a.lock().expect("arrivals").get(&id).copied()).collect();
            async move { seen.map(|s| s.into_iter().max().expect("nodes")) }
        })
        .await;
        if i >= 10 {
            times.push(last.saturating_duration_since(acked).as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    let rtts: Vec<f64> = common::p2p::ask(&all[0], cosmicsync::control::Request::NetworkPeers)
        .and_then(|p| p.as_array().map(|a| a.iter().filter_map(|x| x["rtt_ms"].as_f64()).collect()))
        .unwrap_or_default();
    let mut rtts = rtts;
    rtts.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    let ping = if rtts.is_empty() { f64::NAN } else { percentile(&rtts, 0.5) };
    eprintln!(
        "propagation over {nodes} nodes, {writes} writes: p50 {p50:.1} ms, p99 {p99:.1} ms; ping median {ping:.2} ms"
    );
    result("nodes", nodes);
    result("writes", writes);
    result("propagation_p50_ms", format!("{p50:.1}"));
    result("propagation_p99_ms", format!("{p99:.1}"));
    result("propagation_max_ms", format!("{:.1}", times.last().copied().unwrap_or(f64::NAN)));
    result("ping_median_ms", format!("{ping:.2}"));
}

/// Projects (rows) on a node, over all its shards.
async fn project_count(dir: &std::path::Path, shards: usize) -> i64 {
    let mut n = 0;
    for s in 0..shards {
        let db = common::shard_db(dir, s).await;
        n += db.query_one("SELECT count(*) FROM projects", &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(0);
    }
    n
}

async fn catch_up(missed: usize) {
    let shards: usize = common::cluster::SHARDS.parse().expect("shards");
    let key = NetworkKey::new();
    let a = start_member(&key.path, &[], &[]).await;
    let mut b = start_member(&key.path, &[&a], &[]).await;
    let ada = a.user("ada").await;
    common::cluster::wait_identical(&[&a, &b], shards).await;
    let dir = b.dir.clone();
    let _keep = b.take_temp();
    b.stop();
    let made = Instant::now();
    create_projects(&a, &ada, missed, 32).await;
    eprintln!("made {missed} changes on A in {:.1} s", made.elapsed().as_secs_f64());

    // B comes back: from its start until it holds every row.
    let started = Instant::now();
    let b = common::cluster::restart_member(&dir, &key.path, &[&a]).await;
    let ready = started.elapsed();
    let target = project_count(&a.dir, shards).await;
    wait_for("B to hold every project", Duration::from_secs(1800), || async {
        (project_count(&b.dir, shards).await >= target).then_some(())
    })
    .await;
    let total = started.elapsed();
    let applying = total.saturating_sub(ready);
    let rate = missed as f64 / applying.as_secs_f64();
    eprintln!("catch-up of {missed}: {:.1} s after B was ready ({rate:.0} changes/s)", applying.as_secs_f64());

    // Reference: the same rows with COPY into a table of the same layout in B's PostgreSQL.
    let src = common::shard_db(&a.dir, 0).await;
    let mut rows = Vec::new();
    for s in 0..shards {
        let db = common::shard_db(&a.dir, s).await;
        let out = db
            .copy_out("COPY (SELECT id, creator_id, name, description, tags, created_at, updated_at, deleted_at, vclock, stamps, hlc FROM projects) TO STDOUT")
            .await
            .expect("copy out");
        futures_util::pin_mut!(out);
        while let Some(chunk) = out.next().await {
            rows.extend_from_slice(&chunk.expect("chunk"));
        }
    }
    drop(src);
    let dst = common::shard_db(&b.dir, 0).await;
    dst.batch_execute("DROP TABLE IF EXISTS copy_reference; CREATE TABLE copy_reference (LIKE projects INCLUDING ALL)")
        .await
        .expect("reference table");
    let copied = Instant::now();
    let sink = dst.copy_in("COPY copy_reference (id, creator_id, name, description, tags, created_at, updated_at, deleted_at, vclock, stamps, hlc) FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(rows)).await.expect("copy data");
    let n = sink.finish().await.expect("copy finish");
    let copy_s = copied.elapsed().as_secs_f64();
    dst.batch_execute("DROP TABLE copy_reference").await.expect("drop reference");
    let copy_rate = n as f64 / copy_s;
    eprintln!("COPY of the same {n} rows: {copy_s:.2} s ({copy_rate:.0} rows/s); ratio {:.2}", rate / copy_rate);
    result("missed", missed);
    result("catchup_s", format!("{:.1}", applying.as_secs_f64()));
    result("catchup_rate", format!("{rate:.0}"));
    result("copy_rate", format!("{copy_rate:.0}"));
    result("catchup_ratio", format!("{:.2}", rate / copy_rate));

    // (c) Ten rows differ: B away again while A changes ten projects.
    let dir = b.dir.clone();
    let mut b = b;
    let _keep2 = b.take_temp();
    b.stop();
    let ids = common::cluster::first_projects(&a, &ada, 10).await;
    for id in &ids {
        let res = a.req(Method::PUT, &format!("/api/v1/projects/{id}"), &ada).json(&json!({ "name": "changed" }));
        assert_eq!(res.send().await.expect("put").status(), 200);
    }
    // No periodic rounds: a later session that finds nothing would replace the one to read.
    let args = common::cluster::member_args(&key.path, &[&a], &["--sync-interval", "off"]);
    let b = Node::start_in(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    common::cluster::wait_identical(&[&a, &b], shards).await;
    // Both nodes start a session when they meet; the one that moved the ten rows is the
    // one to measure (the other then finds nothing left to move).
    let ada_b = login_on(&b, &ada).await;
    let session = wait_for("the session that moved the changed rows", Duration::from_secs(120), || async {
        let mut sessions = Vec::new();
        for (node, user) in [(&a, &ada), (&b, &ada_b)] {
            let status: Value = common::cluster::get(node, "/api/v1/sync/status", user).await.1;
            sessions.extend(status["peers"].as_array()?.iter().filter_map(|p| p["last_session"].as_object().cloned()));
        }
        sessions.into_iter().find(|s| s["received"].as_u64().unwrap_or(0) + s["sent"].as_u64().unwrap_or(0) > 0)
    })
    .await;
    let rows = project_count(&a.dir, shards).await + 2;
    eprintln!("reconciliation of {rows} rows differing in 10: {session:?}");
    result("recon_rows", rows);
    result("recon_bytes", &session["bytes"]);
    result("recon_rounds", &session["rounds"]);
    let moved = session["received"].as_u64().unwrap_or(0) + session["sent"].as_u64().unwrap_or(0);
    result("recon_moved", moved);
    result("recon_ms", &session["millis"]);
}

fn main() {
    let nodes: usize = knob("SYNC_NODES", 10);
    let writes: usize = knob("SYNC_WRITES", 200);
    let missed: usize = knob("SYNC_MISSED", 100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        propagation(nodes, writes).await;
        catch_up(missed).await;
    });
}
