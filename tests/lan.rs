//! The two optional ways a node finds a way to its peers without a bootstrap node or
//! relay, run as real `cosmicsync` processes in Linux network namespaces:
//!
//! - **mDNS** (`--mdns`): three hosts on one LAN segment of the project's lab
//!   (`tests/common/netlab.rs`, `Lab::segment`: namespace `cslan-sw` holds a bridge;
//!   `cslan-1` … `cslan-3` are hosts on it, 10.77.0.1–3/24).
//!   Two nodes started with `--mdns` and no bootstrap peer must find each other and hold
//!   a direct connection; a third node on the same segment without `--mdns` must have no
//!   peer at all (see the test for why that observation cannot flake).
//! - **UPnP** (`--upnp`): the lab's NAT router `nat-a` (`Lab::nat`) runs a
//!   real UPnP IGD daemon, Debian's miniupnpd (nftables backend), with a config this test
//!   writes. A node behind it started with `--upnp` must get a port mapping (log line
//!   `UPnP port mapping made`, the mapped address among `external_addrs` in its status),
//!   and public nodes that know only that mapped address must connect to it **directly**,
//!   over TCP and over QUIC.
//!
//! Needs root, iproute2, nftables, iptables, conntrack and miniupnpd
//! (`.ci/ensure-netlab` installs them). Without them a test prints `SKIPPED: <reason>` and
//! returns (nextest shows its output), except under `CI=true`, where that fails; a lab
//! that fails to come up always fails the test. Both hold the lab's lock (namespace
//! names are global), tear their namespaces and daemons
//! down on drop, also when they fail, and wait only for observable conditions with
//! deadlines.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netlab::{DEADLINE, LAN_NET, Lab, Nat, Skip, network, node_in, require, run};
use common::p2p::{peer_id, wait_peer};
use common::{or_skip, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_lan_find_each_other_with_mdns_and_only_with_it() {
    let Some(segment) = or_skip(Lab::segment(3)) else { return };
    // No node has a bootstrap peer: mDNS is the only way any of them can learn of another.
    // The node without mDNS starts first, so it is on the segment before any query is sent.
    let quiet = node_in(&segment.hosts()[2], &[]).await;
    let m1 = node_in(&segment.hosts()[0], &["--mdns"]).await;
    let started = Instant::now();
    let m2 = node_in(&segment.hosts()[1], &["--mdns"]).await;
    let m2_up = started.elapsed();
    let (p1, p2, pq) = (peer_id(&m1), peer_id(&m2), peer_id(&quiet));

    let entry = wait_peer(&m1, &p2, "m1 to connect to m2, found by mDNS", DEADLINE, |p| p["route"] == "direct").await;
    let address = entry["address"].as_str().unwrap_or_default().to_owned();
    assert!(address.contains(&format!("/ip4/{LAN_NET}.2/")), "m2's LAN address: {entry:#}");
    wait_peer(&m2, &p1, "m2 to see the connection to m1", DEADLINE, |p| p["route"] == "direct").await;
    // libp2p's mDNS behaviour logs each discovery (through the log bridge, at info).
    m1.wait_log("m1 to log the mDNS discovery", |l| l.contains("discovered peer on address")).await;
    let network_up = m2.wait_log("m2 to log its network start", |l| l.contains("network starting")).await;
    let connected = wait_for("m2 to log the connection to m1", DEADLINE, || {
        let log = m2.log();
        let line = log.lines().find(|l| l.contains("peer connected") && l.contains(&p1)).map(str::to_owned);
        async move { line }
    })
    .await;
    let discovery = seconds_between(&network_up, &connected);

    // The negative. `quiet` was up before m1 and m2 sent their first query, and those
    // queries went to the multicast group on the one segment all three share (they reached
    // each other, so they reached `quiet` too). A node with mDNS on answers every query;
    // `quiet` has no mDNS behaviour, so it neither answers nor asks, and with no bootstrap
    // peer it has nothing else to dial. Its peers cannot appear later by timing: the only
    // way in is an answer it will never send, so checking once, now, cannot flake.
    let quiet_report = network(&quiet).expect("the quiet node's status");
    assert_eq!(quiet_report["peers"], serde_json::json!([]), "no mDNS, no peers: {quiet_report:#}");
    assert_eq!(quiet_report["routing_table_size"], 0, "{quiet_report:#}");
    for (name, node) in [("m1", &m1), ("m2", &m2)] {
        let report = network(node).expect("status");
        let peers = report["peers"].as_array().cloned().unwrap_or_default();
        assert!(peers.iter().all(|p| p["peer_id"] != pq), "{name} found the node without mDNS: {report:#}");
    }
    eprintln!(
        "mDNS: two nodes with --mdns and no bootstrap peer connected directly ({address}) {discovery:.3} s \
         after the second one's network started, by its log (its start, PostgreSQL included, took {:.1} s); \
         the node without --mdns on the same segment has no peers",
        m2_up.as_secs_f64()
    );
}

/// Router `nat-a`'s WAN address for UPnP, on the lab's "internet" bridge beside its own.
/// The lab's public range 198.18.0.0/15 is the benchmarking range, which libp2p's UPnP
/// client (rightly) treats as not public: a gateway with such an address sits behind
/// another NAT, where a mapping is useless, and the node reports `NonRoutableGateway`.
/// So the router also holds a global unicast address (the namespaces have no way out,
/// so nothing outside is ever reached), and so do the public hosts that dial it.
const WAN_GLOBAL: &str = "11.0.1.101";
const PUB1_GLOBAL: &str = "11.0.1.1";
const PUB2_GLOBAL: &str = "11.0.1.2";

/// miniupnpd's nftables skeleton: its backend fills the chains named in `MINIUPNPD_CONF`
/// (as Debian's `nft_init.sh` makes them, in a table of its own).
const MINIUPNPD_NFT: &str = "table inet miniupnpd {
  chain miniupnpd {
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    jump miniupnpd
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    jump postrouting_miniupnpd
  }
}
";

/// UPnP IGD on `lan0` only, mapping on `wan0`; LAN hosts may map their own ports above 1023.
const MINIUPNPD_CONF: &str = "ext_ifname=wan0
ext_ip=11.0.1.101
listening_ip=lan0
http_port=2189
enable_natpmp=no
enable_upnp=yes
secure_mode=yes
system_uptime=yes
uuid=3f8c0e1a-6f4e-4a55-9d0b-0c05a1b2c3d4
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
allow 1024-65535 10.10.1.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
";

/// The NAT lab (two endpoint-independent NATs) with a UPnP IGD on router `nat-a`. The daemon
/// is stopped on drop, before the lab goes down.
struct UpnpLab {
    daemon: Child,
    dir: tempfile::TempDir,
    _lab: Lab,
}

impl UpnpLab {
    /// The lab with miniupnpd ready (its HTTP port open and the SSDP group joined on
    /// `lan0`); `Err` says why it cannot run here. A lab or daemon that fails to come up
    /// fails the test.
    async fn up() -> Result<UpnpLab, Skip> {
        require(&["miniupnpd"])?;
        let lab = Lab::nat(Nat::EndpointIndependent, Nat::EndpointIndependent)?;
        Ok(UpnpLab::start(lab).await.unwrap_or_else(|e| panic!("the UPnP lab failed to come up: {e}")))
    }

    async fn start(lab: Lab) -> Result<UpnpLab, String> {
        run(&["ip", "-n", "nat-a", "addr", "add", &format!("{WAN_GLOBAL}/24"), "dev", "wan0"])?;
        run(&["ip", "-n", "pub1", "addr", "add", &format!("{PUB1_GLOBAL}/24"), "dev", "eth0"])?;
        run(&["ip", "-n", "pub2", "addr", "add", &format!("{PUB2_GLOBAL}/24"), "dev", "eth0"])?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let nft = dir.path().join("miniupnpd.nft");
        std::fs::write(&nft, MINIUPNPD_NFT).map_err(|e| e.to_string())?;
        run(&["ip", "netns", "exec", "nat-a", "nft", "-f", &nft.to_string_lossy()])?;
        // the lab's router drops every new connection from the WAN in its forward chain;
        // a router with UPnP forwards what its port mappings (DNAT by miniupnpd) send in.
        // Without a mapping nothing is DNATed, so this opens nothing by itself.
        run(&[
            "ip", "netns", "exec", "nat-a", "nft", "insert", "rule", "ip", "natlab", "forward", "ct", "status", "dnat",
            "accept",
        ])?;
        let conf = dir.path().join("miniupnpd.conf");
        std::fs::write(&conf, MINIUPNPD_CONF).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("miniupnpd.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        // `ip netns exec` execs the daemon, so the child is miniupnpd itself; -d keeps it in
        // the foreground, logging to stderr.
        let daemon = Command::new("ip")
            .args(["netns", "exec", "nat-a", "miniupnpd", "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(dir.path().join("miniupnpd.pid"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start miniupnpd: {e}"))?;
        let mut lab = UpnpLab { daemon, dir, _lab: lab };
        lab.wait_ready().await?;
        Ok(lab)
    }

    /// The node's gateway search is one SSDP query at start-up: the daemon must be
    /// answering before the node starts.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.daemon.try_wait() {
                return Err(format!("miniupnpd exited at start ({status}): {}", self.log().trim()));
            }
            let http = self.log().contains("HTTP listening on port");
            let ssdp = run(&["ip", "-n", "nat-a", "maddr", "show", "dev", "lan0"])
                .is_ok_and(|groups| groups.contains("239.255.255.250"));
            if http && ssdp {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("miniupnpd did not get ready in 30 s: {}", self.log().trim()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        read(&self.dir.path().join("miniupnpd.log"))
    }

    /// The port-mapping rules miniupnpd wrote into the router's nftables.
    fn redirects(&self) -> String {
        run(&["ip", "netns", "exec", "nat-a", "nft", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"])
            .unwrap_or_else(|e| e)
    }
}

impl Drop for UpnpLab {
    fn drop(&mut self) {
        // SAFETY: signalling the daemon this lab started.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(self.daemon.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.daemon.kill();
                let _ = self.daemon.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Seconds from log line `from` to log line `to`, by their timestamps
/// (`Nov 24 07:09:13.541 INFO …`); NaN if one has none.
fn seconds_between(from: &str, to: &str) -> f64 {
    let at = |line: &str| -> Option<f64> {
        let mut hms = line.split_whitespace().nth(2)?.split(':').map(|p| p.parse::<f64>().ok());
        Some(hms.next()?? * 3600.0 + hms.next()?? * 60.0 + hms.next()??)
    };
    match (at(from), at(to)) {
        (Some(a), Some(b)) => (b - a).rem_euclid(86_400.0),
        _ => f64::NAN,
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_upnp_router_maps_its_port_and_is_reached_directly() {
    let Some(lab) = or_skip(UpnpLab::up().await) else { return };
    // No bootstrap peer: the mapping is the only way anyone can reach this node.
    let started = Instant::now();
    let a = node_in("a1", &["--upnp"]).await;
    let a_up = started.elapsed();
    let pa = peer_id(&a);

    let line = a.wait_log("A to log a UPnP port mapping", |l| l.contains("UPnP port mapping made")).await;
    let network_up = a.wait_log("A to log its network start", |l| l.contains("network starting")).await;
    let mapping = seconds_between(&network_up, &line);
    let tcp = format!("/ip4/{WAN_GLOBAL}/tcp/4001");
    let quic = format!("/ip4/{WAN_GLOBAL}/udp/4001/quic-v1");
    let report = wait_for("A's status to list both mapped addresses as external", DEADLINE, || {
        let report = network(&a).filter(|n| {
            let external = n["external_addrs"].to_string();
            external.contains(&format!("\"{tcp}\"")) && external.contains(&format!("\"{quic}\""))
        });
        async move { report }
    })
    .await;
    let mapped_after = started.elapsed();
    // A mapping is an external address confirmed by the router: `--kad-mode auto` serves the DHT.
    assert_eq!(report["kad_mode"], "server", "{report:#}");
    let redirects = lab.redirects();
    assert!(redirects.contains("10.10.1.2") && redirects.contains("4001"), "miniupnpd's rules: {redirects}");

    // Public nodes that know A only by its mapped address dial it there, one per transport.
    let over_tcp = node_in("pub2", &["--bootstrap", &format!("{tcp}/p2p/{pa}")]).await;
    let over_quic = node_in("pub1", &["--bootstrap", &format!("{quic}/p2p/{pa}")]).await;
    for (dialler, mapped) in [(&over_tcp, &tcp), (&over_quic, &quic)] {
        let entry = wait_peer(dialler, &pa, &format!("a public node to reach A at {mapped}"), DEADLINE, |p| {
            p["route"] == "direct"
        })
        .await;
        let address = entry["address"].as_str().unwrap_or_default();
        assert!(address.starts_with(mapped.as_str()), "dialled at the mapped address: {entry:#}");
    }
    // A sees them come in from their own addresses: through the mapping, not through a relay.
    let entry = wait_peer(&a, &peer_id(&over_tcp), "A to see the TCP dialler", DEADLINE, |_| true).await;
    assert_eq!(entry["route"], "direct", "{entry:#}");
    assert!(entry["address"].as_str().unwrap_or_default().contains(PUB2_GLOBAL), "{entry:#}");

    eprintln!(
        "UPnP: behind nat-a with miniupnpd, the node logged its first mapping {mapping:.3} s after its \
         network started; both were in its status {:.1} s after it was started (its start, PostgreSQL \
         included, took {:.1} s; external_addrs {}; log: {}); public nodes connected directly to {tcp} \
         and {quic}; miniupnpd's redirects: {}",
        mapped_after.as_secs_f64(),
        a_up.as_secs_f64(),
        report["external_addrs"],
        line.trim(),
        redirects.split_whitespace().collect::<Vec<_>>().join(" ")
    );
}
