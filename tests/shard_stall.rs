//! No stall: a shard whose server stops answering without closing the connection
//! (black-holed, not reset) fails its own requests within the shard timeout, the other
//! shards keep serving, and the shard comes back by itself when the server answers again.
//!
//! Shard 0 is a PostgreSQL server on a Unix socket; shard 1 is a real PostgreSQL server
//! with TLS in a namespace of the project's network lab (`Lab::linked`), reached over TCP
//! through a veth pair. The black hole is the lab's `loss(host, 100)`: nftables drops
//! every packet the server's namespace sends or receives, so the node sees neither a
//! reset nor an ICMP error, only silence. Requests that are already waiting on the
//! server when it goes silent are the ones that used to stall (for as long as TCP
//! retransmits, about 15 minutes); this test sends them at that moment.
//!
//! Needs root, iproute2 and nftables (`.ci/ensure-netlab`) and PostgreSQL. Without them
//! it prints `SKIPPED: <reason>` (a failure under `CI=true`); a lab that fails to come up
//! fails it.

mod common;

use std::time::{Duration, Instant};

use common::netlab::{LINK_FAR, LINK_NEAR, Lab, Skip};
use common::pg_tls::{TlsServer, pg_installed};
use common::{Node, PgGuard, TestUser, or_skip, wait_for};
use cosmicsync::embedded_pg::EmbeddedPostgres;
use reqwest::Method;

/// The lab host holding shard 1's server.
const HOST: &str = "cs-pgshard";

/// The node's `--shard-timeout`, in seconds.
const SHARD_TIMEOUT: u64 = 2;

/// How far past the shard timeout an answer may come (scheduling on 2 busy cores).
const SLACK: Duration = Duration::from_secs(3);

/// A GET of the user's profile: its status and how long the answer took (status 0: no
/// answer within a minute, i.e. the request stalled).
async fn timed_get(node: &Node, user: &TestUser) -> (u16, Duration) {
    let started = Instant::now();
    let res = node
        .req(Method::GET, &format!("/api/v1/profiles/{}", user.profile_id), user)
        .timeout(Duration::from_secs(60))
        .send()
        .await;
    (res.map(|r| r.status().as_u16()).unwrap_or(0), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_shard_fails_in_bounded_time_and_recovers_while_others_serve() {
    let ready = pg_installed().map_err(Skip).and_then(|()| Lab::linked(HOST));
    let Some(lab) = or_skip(ready) else { return };
    let dirs = tempfile::tempdir().unwrap();
    // The remote server's processes are started inside the lab host, so they live there.
    let remote = TlsServer::start_at(LINK_FAR, LINK_FAR, Some(LINK_NEAR), &["s1"], |opts| {
        lab.in_namespace(HOST, || EmbeddedPostgres::start(opts))
    });
    let local = PgGuard::start(&dirs.path().join("local"));
    local.ensure_databases(&["s0".into()]).unwrap();
    let ca = remote.ca.display().to_string();
    let urls = [local.url("s0"), remote.url(LINK_FAR, "s1", &format!("sslmode=verify-ca&sslrootcert={ca}"))];
    let timeout = SHARD_TIMEOUT.to_string();
    let node = Node::start(&["--shard-url", &urls[0], "--shard-url", &urls[1], "--shard-timeout", &timeout]).await;

    // A user on the remote shard and one on the local shard.
    let (lost, kept) = node.users_on_and_off(2, 1).await;
    assert_eq!(timed_get(&node, &lost).await.0, 200);

    // Silence: the requests sent now find the shard up and a pooled connection, and wait
    // on a server that will never answer.
    lab.loss(HOST, 100);
    let silenced = Instant::now();
    let in_flight = futures_util::future::join_all((0..4).map(|_| timed_get(&node, &lost))).await;
    let bound = Duration::from_secs(SHARD_TIMEOUT) + SLACK;
    for (status, took) in &in_flight {
        assert_eq!(*status, 503, "a request to the black-holed shard (answered after {took:?})");
        assert!(*took <= bound, "a request to the black-holed shard took {took:?}, more than {bound:?}");
    }
    let slowest = in_flight.iter().map(|(_, t)| *t).max().unwrap_or_default();

    // The other shard serves, reads and writes, while shard 1 is silent.
    assert_eq!(timed_get(&node, &kept).await.0, 200);
    assert_eq!(node.create_project(&kept, "still working").await, 201);
    // The shard is marked down: from then on its requests fail at once, never waiting.
    let down = wait_for("shard 1 to be reported down", Duration::from_secs(30), || {
        let run = common::cli(&node.dir, &["status", "--json"]);
        let down = (run.code == Some(0)).then(|| run.json()).filter(|r| r["shards"][1]["state"] != "up");
        async move { down.map(|_| silenced.elapsed()) }
    })
    .await;
    let (status, took) = timed_get(&node, &lost).await;
    assert_eq!(status, 503);
    assert!(took <= bound, "a request to the shard marked down took {took:?}");
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 503);

    // The server answers again: the shard recovers without a restart of the node.
    lab.clear_loss(HOST);
    let healed = Instant::now();
    wait_for("shard 1 to serve again", Duration::from_secs(60), || async {
        (timed_get(&node, &lost).await.0 == 200).then_some(())
    })
    .await;
    let recovered = healed.elapsed();
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 200);
    assert!(node.log().contains("shard request timed out"), "the timeout is logged");
    eprintln!(
        "shard stall: with --shard-timeout {SHARD_TIMEOUT}, 4 requests in flight when shard 1's server was \
         black-holed got 503 after at most {:.2} s; the shard was reported down {:.2} s after the black hole \
         began, then failed requests in {:.3} s; shard 0 kept serving; {:.2} s after the server answered \
         again shard 1 served again",
        slowest.as_secs_f64(),
        down.as_secs_f64(),
        took.as_secs_f64(),
        recovered.as_secs_f64()
    );
    // The node first, then the servers, then the lab (locals drop in reverse order).
    drop(node);
}
