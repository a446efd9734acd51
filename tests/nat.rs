//! NAT traversal in Linux network namespaces: real `cosmicsync` processes behind NAT
//! routers of the project's own lab (`tests/common/netlab.rs`, `Lab::nat`).
//!
//! Topology: one public node on `pub1` (198.18.0.1) is the bootstrap peer and relay;
//! node A sits behind router `nat-a`, node B behind `nat-b`; each knows only the public
//! node. With two endpoint-independent NATs, A and B must end up with a **direct**
//! connection (DCUtR hole punching over the relay); with a symmetric NAT on B's side
//! hole punching cannot work and they must stay connected **through the relay**.
//!
//! Needs root, iproute2 network namespaces, nftables, iptables and conntrack
//! (`.ci/ensure-netlab` installs them). Without them each test prints
//! `SKIPPED: <reason>` and returns (nextest shows its output), except under `CI=true`,
//! where that fails; a lab that fails to come up always fails the test.

mod common;

use std::time::Instant;

use common::netlab::{DEADLINE, Lab, Nat, network, node_in};
use common::p2p::{peer_id, wait_peer};
use common::{Node, or_skip, wait_for};
use serde_json::Value;

const PUBLIC_IP: &str = "198.18.0.1";

/// Waits until `node` is behind NAT by AutoNAT's verdict and holds an accepted relay slot.
async fn wait_private_with_reservation(node: &Node, name: &str) -> Value {
    wait_for(&format!("{name}: NAT private and a relay reservation"), DEADLINE, || {
        let report = network(node).filter(|n| {
            n["nat_status"] == "private"
                && n["relay_reservations"].as_array().is_some_and(|r| r.iter().any(|r| r["accepted"] == true))
        });
        async move { report }
    })
    .await
}

/// The lab with NAT kinds `nat_a` and `nat_b` and the three nodes in it, or `None`
/// when this machine may skip it (see `or_skip`).
async fn scenario(nat_a: Nat, nat_b: Nat) -> Option<(Lab, Node, Node, Node)> {
    let lab = or_skip(Lab::nat(nat_a, nat_b))?;
    let (public, a, b) = three_nodes().await;
    Some((lab, public, a, b))
}

/// The public node, and A and B behind their NATs, each knowing only the public node.
async fn three_nodes() -> (Node, Node, Node) {
    let public = node_in(
        "pub1",
        &[
            "--kad-mode",
            "server",
            "--external-addr",
            "/ip4/198.18.0.1/tcp/4001",
            "--external-addr",
            "/ip4/198.18.0.1/udp/4001/quic-v1",
        ],
    )
    .await;
    let bootstrap = format!("/ip4/{PUBLIC_IP}/udp/4001/quic-v1/p2p/{}", peer_id(&public));
    let a = node_in("a1", &["--bootstrap", &bootstrap]).await;
    let b = node_in("b1", &["--bootstrap", &bootstrap]).await;
    (public, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behind_endpoint_independent_nats_connect_directly() {
    let Some((_lab, public, a, b)) = scenario(Nat::EndpointIndependent, Nat::EndpointIndependent).await else { return };
    let started = Instant::now();
    let (pa, pb) = (peer_id(&a), peer_id(&b));

    let report_a = wait_private_with_reservation(&a, "A").await;
    wait_private_with_reservation(&b, "B").await;
    let relayed = report_a["relay_reservations"][0]["relayed_addrs"].to_string();
    assert!(relayed.contains(PUBLIC_IP) && relayed.contains("p2p-circuit"), "{report_a:#}");

    // A learns B from the DHT (only the public node was named), reaches it through the
    // relay, and DCUtR replaces that with a direct connection.
    let entry = wait_peer(&a, &pb, "A to hold a direct connection to B", DEADLINE, |p| p["route"] == "direct").await;
    let address = entry["address"].as_str().unwrap_or_default();
    assert!(!address.contains("p2p-circuit"), "direct means not through the relay: {entry:#}");
    assert!(address.contains("198.18.0.102"), "B's NAT's public address: {entry:#}");
    wait_peer(&b, &pa, "B to see the direct connection", DEADLINE, |p| p["route"] == "direct").await;
    // The log is written asynchronously: wait for the line rather than race it.
    wait_for("DCUtR to log the upgrade", DEADLINE, || {
        let logs = format!("{}{}", a.log(), b.log());
        async move { logs.contains("hole punch succeeded").then_some(()) }
    })
    .await;

    let public_report = wait_for("the public node to be public by AutoNAT", DEADLINE, || {
        let r = network(&public).filter(|n| n["nat_status"] == "public");
        async move { r }
    })
    .await;
    assert_eq!(public_report["relay_service"], true);
    eprintln!(
        "NAT (eim/eim): A and B behind separate endpoint-independent NATs got a direct connection \
         ({address}) after {:.1} s; public node relay_service={} nat={}",
        started.elapsed().as_secs_f64(),
        public_report["relay_service"],
        public_report["nat_status"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_symmetric_nat_peers_stay_connected_through_the_relay() {
    let Some((_lab, public, a, b)) = scenario(Nat::EndpointIndependent, Nat::Symmetric).await else { return };
    let started = Instant::now();
    let (pa, pb) = (peer_id(&a), peer_id(&b));
    wait_private_with_reservation(&a, "A").await;
    wait_private_with_reservation(&b, "B").await;

    wait_peer(&a, &pb, "A to reach B through the relay", DEADLINE, |_| true).await;
    wait_for("a hole punch attempt to fail", DEADLINE, || {
        let logs = format!("{}{}", a.log(), b.log());
        async move { logs.contains("hole punch failed").then_some(()) }
    })
    .await;
    // After the failed upgrade they are still connected, through the relay.
    let entry = wait_peer(&a, &pb, "A still connected to B", DEADLINE, |_| true).await;
    assert_eq!(entry["route"], "relayed", "{entry:#}");
    assert!(entry["address"].as_str().unwrap_or_default().contains("p2p-circuit"), "{entry:#}");
    let entry_b = wait_peer(&b, &pa, "B still connected to A", DEADLINE, |_| true).await;
    assert_eq!(entry_b["route"], "relayed", "{entry_b:#}");
    assert!(network(&public).is_some(), "the relay is still healthy");
    eprintln!(
        "NAT (eim/sym): hole punching failed as it must with a symmetric NAT; A and B stay connected \
         through the relay ({}) after {:.1} s",
        entry["address"],
        started.elapsed().as_secs_f64()
    );
}
