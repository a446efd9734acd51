//! The peer-to-peer network end to end: real `cosmicsync` processes on loopback finding
//! each other through the DHT, keeping their identity across restarts, shrugging off
//! garbage, and showing it all through the control socket, the CLI and the REST API.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use common::p2p::{ask, bootstrap_addr, peer_id, wait_peer};
use common::{Node, wait_for};
use cosmicsync::control::Request;
use reqwest::Method;
use serde_json::Value;

/// How long the network may take to converge on loopback (generous: 2 shared cores).
const CONVERGE: Duration = Duration::from_secs(90);

/// Every node here answers DHT queries: on loopback no AutoNAT verdict would come.
const P2P: &[&str] = &["--kad-mode", "server"];

/// The node's network report (`status.network`).
fn network(node: &Node) -> Value {
    ask(node, Request::Status).map(|s| s["network"].clone()).expect("network status")
}

/// Starts a node that knows `bootstrap` (if any).
async fn start_node(bootstrap: Option<&Node>) -> Node {
    let mut args: Vec<String> = P2P.iter().map(|s| s.to_string()).collect();
    if let Some(b) = bootstrap {
        args.extend(["--bootstrap".into(), bootstrap_addr(b)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start(&args).await
}

/// Runs the CLI on a node's data directory; returns (exit code, stdout, stderr).
fn cli(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let run = common::cli(dir, args);
    (run.code, run.stdout, run.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_knows_only_the_bootstrap_finds_the_others_through_the_dht() {
    let a = start_node(None).await;
    let b = start_node(Some(&a)).await;
    let c = start_node(Some(&a)).await;
    let (pa, pb, pc) = (peer_id(&a), peer_id(&b), peer_id(&c));
    assert!(pa != pb && pb != pc && pa != pc, "every node has its own peer id");

    // C was told only about A, yet ends up connected to B: it learnt B from the DHT.
    let entry = wait_peer(&c, &pb, "C to connect to B", CONVERGE, |_| true).await;
    assert_eq!(entry["route"], "direct");
    wait_peer(&b, &pc, "B to see C", CONVERGE, |_| true).await;
    let agent = wait_for("identify to tell B's agent", CONVERGE, || {
        let agent = ask(&c, Request::NetworkPeers).and_then(|peers| {
            peers.as_array()?.iter().find(|p| p["peer_id"] == pb)?["agent"].as_str().map(str::to_owned)
        });
        async move { agent }
    })
    .await;
    assert!(agent.starts_with("cosmicsync/"), "{agent}");
    wait_for("a ping round trip to B", CONVERGE, || {
        let rtt = ask(&c, Request::NetworkPeers)
            .and_then(|peers| peers.as_array()?.iter().find(|p| p["peer_id"] == pb)?["rtt_ms"].as_f64());
        async move { rtt }
    })
    .await;

    // The status report: identity, addresses, DHT.
    let report = network(&c);
    assert_eq!(report["peer_id"], pc.as_str());
    assert_eq!(report["kad_protocol"], "/cosmicsync/kad/1.0.0");
    assert_eq!(report["kad_mode"], "server");
    assert!(report["routing_table_size"].as_u64().unwrap_or(0) >= 2, "{report:#}");
    assert_eq!(report["listen_addrs"].as_array().map(Vec::len), Some(2), "TCP and QUIC: {report:#}");
    let p2p_addrs = c.info["p2p_addrs"].as_array().expect("p2p_addrs");
    assert!(p2p_addrs.iter().any(|a| a.as_str().is_some_and(|a| a.ends_with("/quic-v1"))), "{p2p_addrs:?}");
    assert!(
        p2p_addrs.iter().all(|a| !a.as_str().unwrap_or_default().contains("/tcp/0")),
        "actual ports: {p2p_addrs:?}"
    );

    // A DHT lookup from the CLI, as a person and as a script.
    let (code, out, err) = cli(&c.dir, &["network", "find-peer", &pb, "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let found: Value = serde_json::from_str(&out).expect("find-peer JSON");
    assert_eq!(found["peer_id"], pb.as_str());
    assert!(!found["addrs"].as_array().expect("addrs").is_empty(), "{found:#}");
    assert!(found["elapsed_ms"].as_f64().is_some(), "{found:#}");
    let (code, out, _) = cli(&c.dir, &["network", "find-peer", &pb]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with(&format!("peer {pb} found in ")), "{out}");

    // Peers as a table.
    let (code, out, _) = cli(&c.dir, &["network", "peers"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("PEER"), "{out}");
    assert!(out.contains(&pa) && out.contains(&pb) && out.contains("direct"), "{out}");

    // Bad and unknown peer ids are clear errors, not hangs or crashes.
    let (code, _, err) = cli(&c.dir, &["network", "find-peer", "not-a-peer-id"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a peer id") && err.contains("(400)"), "{err}");
    let (code, _, err) = cli(&c.dir, &["network", "find-peer", &pc]);
    assert_eq!(code, Some(1));
    assert!(err.contains("own peer id"), "{err}");
    let stranger = libp2p::PeerId::random().to_string();
    let (code, _, err) = cli(&c.dir, &["network", "find-peer", &stranger]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not found in the DHT") && err.contains("(404)"), "{err}");

    // The REST API reports the same network.
    let user = c.user("netwatcher").await;
    let res = c.req(Method::GET, "/api/v1/network/status", &user).send().await.expect("status request");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("status body");
    assert_eq!(body["network"]["peer_id"], pc.as_str());
    assert!(body["network"]["peers"].as_array().is_some_and(|p| p.len() >= 2), "{body:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_peer_id_and_rejoins() {
    use std::os::unix::fs::PermissionsExt;

    let a = start_node(None).await;
    let mut b = start_node(Some(&a)).await;
    let pb = peer_id(&b);
    wait_peer(&a, &pb, "A to see B", CONVERGE, |_| true).await;
    let key = b.dir.join("p2p.key");
    assert_eq!(std::fs::metadata(&key).expect("p2p.key").permissions().mode() & 0o777, 0o600);

    // A graceful stop disconnects B; A notices.
    let temp = b.take_temp();
    let dir = b.dir.clone();
    assert!(b.stop().is_some_and(|s| s.success()), "B stops cleanly");
    assert!(b.log().contains("disconnecting from peers"));
    drop(b);
    wait_for("A to drop B", CONVERGE, || {
        let gone = ask(&a, Request::NetworkPeers)
            .and_then(|p| p.as_array().map(|p| p.iter().all(|p| p["peer_id"] != pb.as_str())))
            .filter(|gone| *gone);
        async move { gone }
    })
    .await;

    // Same data directory: same peer id, and back in the network.
    let args = ["--kad-mode", "server", "--bootstrap", &bootstrap_addr(&a)];
    let b = Node::start_in(&dir, &args).await;
    assert_eq!(peer_id(&b), pb, "the peer id survives a restart");
    assert_eq!(network(&b)["peer_id"], pb.as_str());
    wait_peer(&a, &pb, "A to see B again", CONVERGE, |_| true).await;
    wait_peer(&b, &peer_id(&a), "B to see A again", CONVERGE, |_| true).await;
    drop(b);
    drop(temp);
}

/// Lines of `node`'s log that mention both `what` and `peer`.
fn log_lines_about(node: &Node, what: &str, peer: &str) -> usize {
    node.log().lines().filter(|l| l.contains(what) && l.contains(peer)).count()
}

/// The network's event loop dies inside a running node (a panic injected through the
/// `network-find-peer` fail point): the actix Supervisor restarts PeerActor with the same
/// key on the same ports, the node rejoins through its bootstrap peer, and the rest of
/// the node keeps serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_loop_that_dies_is_restarted_with_the_same_identity_and_rejoins() {
    let failpoints: Result<(), &str> = if cfg!(feature = "failpoints") {
        Ok(())
    } else {
        Err("needs a build with `--features failpoints` (`make test` turns it on)")
    };
    if common::or_skip(failpoints).is_none() {
        return;
    }
    let a = start_node(None).await;
    let pa = peer_id(&a);
    // B's first DHT lookup panics its event loop; later ones run normally.
    let args: Vec<String> = common::FAST
        .iter()
        .chain(P2P)
        .map(|s| s.to_string())
        .chain(["--bootstrap".into(), bootstrap_addr(&a)])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = Node::start_wrapped_temp(&["env", "FAILPOINTS=network-find-peer=1*panic"], &args).await;
    let pb = peer_id(&b);
    let c = start_node(Some(&a)).await;
    let pc = peer_id(&c);
    wait_peer(&b, &pa, "B to see A", CONVERGE, |_| true).await;
    wait_peer(&a, &pb, "A to see B", CONVERGE, |_| true).await;
    let before = network(&b);
    assert_eq!(before["restarts"], 0, "{before:#}");

    // The lookup kills the loop: the caller gets a clear error, not a hang.
    let (code, out, err) = cli(&b.dir, &["network", "find-peer", &pc]);
    assert_ne!(code, Some(0), "the lookup that killed the loop cannot succeed: {out}");
    assert!(err.contains("restarting"), "{err}");

    // The Supervisor brings the network back: same peer id, same ports, connected again.
    let after = wait_for("B's network to come back", CONVERGE, || {
        let back = ask(&b, Request::Status).map(|s| s["network"].clone()).filter(|n| {
            n["restarts"] == 1 && n["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["peer_id"] == pa.as_str()))
        });
        async move { back }
    })
    .await;
    assert_eq!(after["peer_id"], pb.as_str(), "the restarted network keeps the peer id");
    let addrs = |n: &Value| {
        let mut addrs: Vec<String> = serde_json::from_value(n["listen_addrs"].clone()).expect("listen_addrs");
        addrs.sort();
        addrs
    };
    assert_eq!(addrs(&after), addrs(&before), "and its listen addresses (in any order)");
    b.wait_log("B's log to tell why the network restarted", |l| {
        l.contains("actor restarting") && l.contains("panicked")
    })
    .await;

    // A saw B go and come back: the rejoin is a new connection, not a leftover one.
    wait_for("A to see B disconnect and reconnect", CONVERGE, || {
        let rejoined =
            log_lines_about(&a, "peer disconnected", &pb) >= 1 && log_lines_about(&a, "peer connected", &pb) >= 2;
        async move { rejoined.then_some(()) }
    })
    .await;

    // C, which knows only A, finds B through the DHT again, and B answers lookups again.
    wait_for("C to find B through the DHT", CONVERGE, || {
        let (code, out, _) = cli(&c.dir, &["network", "find-peer", &pb]);
        async move { (code == Some(0)).then_some(out) }
    })
    .await;
    let (code, out, err) = cli(&b.dir, &["network", "find-peer", &pc]);
    assert_eq!(code, Some(0), "B's lookups work after the restart: {out}{err}");

    // The rest of the node never stopped.
    assert_eq!(b.register("stillserving").await.status(), 201);
    assert_eq!(network(&b)["restarts"], 1, "one death, one restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_peer_cannot_crash_or_stall_the_node() {
    use std::net::{SocketAddr, TcpStream, UdpSocket};

    let a = start_node(None).await;
    let b = start_node(Some(&a)).await;
    let pb = peer_id(&b);
    wait_peer(&a, &pb, "A to see B", CONVERGE, |_| true).await;

    let port_of = |proto: &str| -> SocketAddr {
        let addrs = a.info["p2p_addrs"].as_array().expect("p2p_addrs");
        let addr = addrs.iter().filter_map(Value::as_str).find(|s| s.contains(proto)).expect("listen address");
        let port = addr.split('/').nth(4).and_then(|p| p.parse::<u16>().ok()).expect("port");
        SocketAddr::from(([127, 0, 0, 1], port))
    };
    let (tcp, udp) = (port_of("/tcp/"), port_of("/udp/"));

    // Random bytes, a half handshake that then stalls, a wrong protocol, many idle sockets.
    let mut junk = vec![0u8; 64 * 1024];
    rand::fill(&mut junk[..]);
    let mut held = Vec::new();
    for (i, payload) in [
        junk.clone(),
        b"/multistream/1.0.0\n".to_vec(),
        b"\x13/multistream/1.0.0\n\x0a/noise\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = TcpStream::connect(tcp).expect("connect to the p2p port");
        let _ = s.write_all(&payload);
        if i > 0 {
            held.push(s);
        }
    }
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(tcp) {
            held.push(s);
        }
    }
    let socket = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    for _ in 0..200 {
        let _ = socket.send_to(&junk[..1200], udp);
    }

    // Still healthy: answers, keeps B, and lets a newcomer in while the junk is held open.
    let c = start_node(Some(&a)).await;
    wait_peer(&a, &peer_id(&c), "A to accept a new peer", CONVERGE, |_| true).await;
    let peers = ask(&a, Request::NetworkPeers).expect("A answers");
    assert!(peers.as_array().is_some_and(|p| p.iter().any(|p| p["peer_id"] == pb.as_str())), "{peers:#}");
    let res = a.client.get(a.url("/healthz")).send().await.expect("healthz");
    assert_eq!(res.status(), 200);
    drop(held);
    assert!(a.log().contains("peer connected"));
}
