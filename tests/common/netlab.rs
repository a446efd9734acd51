//! The project's own network lab: topologies of Linux network namespaces, built and
//! changed by driving `ip` and `nft` directly, for the tests that run real nodes in them
//! (`tests/nat.rs`, `tests/lan.rs`, `tests/shard_stall.rs`, and the replication partition
//! tests). It needs nothing outside this repository: root, iproute2, nftables, iptables
//! and conntrack (`.ci/ensure-netlab` installs them).
//!
//! Written in Rust rather than as a shell script so that a lab is a value: built under
//! the lab lock, torn down by `Drop` (also when the test panics), with typed reasons, and
//! no second language or file path between the test and the commands it runs.
//!
//! Topologies (namespace names are global to the machine, so they are fixed and every
//! lab holds `LOCK` while its namespaces exist; leftovers of a killed run are removed
//! first):
//!
//! - [`Lab::nat`]: an "internet", bridge `br0` in namespace `natlab-inet`, 198.18.0.0/24,
//!   with public hosts `pub1` (.1) and `pub2` (.2) and NAT routers `nat-a` (.101) and
//!   `nat-b` (.102) on it (`wan0`). Behind each router a private host: `a1` 10.10.1.2
//!   behind `nat-a` (`lan0` 10.10.1.1), `b1` 10.10.2.2 behind `nat-b`. A router is
//!   [`Nat::EndpointIndependent`] (masquerade keeping the source port: one mapping per
//!   inside socket, so hole punching works) or [`Nat::Symmetric`] (masquerade
//!   `fully-random`: a new port for every destination); both drop unsolicited packets
//!   from the WAN and never answer them.
//! - [`Lab::segment`]: a plain LAN, bridge `br0` in namespace `cslan-sw`, hosts
//!   `cslan-1` … `cslan-N` at 10.77.0.1 … 10.77.0.N/24 (switch ports `p1` … `pN`).
//!   [`Lab::partition`] splits the hosts into groups that cannot reach each other
//!   (`partition(&[&[0, 1], &[2, 3, 4]])` is `A,B | C,D,E`: an nftables bridge table in
//!   the switch drops every frame, multicast included, from a port of one group to a
//!   port of another); [`Lab::heal`] removes it.
//! - [`Lab::linked`]: one host namespace joined to the test's own namespace by a veth
//!   pair (10.78.0.1 on the test's side, 10.78.0.2 in the host), for a server the test
//!   process must reach directly, such as a PostgreSQL shard.
//!
//! On any of them: [`Lab::cut`] / [`Lab::restore`] take a host's link down and up (on the
//! switch or router side), [`Lab::loss`] drops a share of a host's packets in both
//! directions with an nftables `numgen random` rule (the kernel has no `tc netem`;
//! `loss(host, 100)` black-holes it: no reset, no ICMP), [`Lab::clear_loss`] ends that,
//! [`Lab::set_nat`] switches a router's NAT type, and [`Lab::in_namespace`] runs a
//! closure on a thread inside a host, so the processes it spawns live there.
//!
//! Only a missing privilege or tool is a [`Skip`]; a lab that fails to come up panics,
//! which fails the test (see `common::or_skip` for how a skip is reported, and why it
//! fails under `CI=true`). Nothing here sleeps to synchronise.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::process::Command;
use std::time::Duration;

use cosmicsync::control::{self, Request, Response};
use serde_json::Value;

use super::Node;

/// Generous: AutoNAT needs a probe to time out before it says "private".
pub const DEADLINE: Duration = Duration::from_secs(180);

/// The lock every namespace test holds while its namespaces exist.
pub const LOCK: &str = "/tmp/cosmicsync-natlab.lock";

/// Listen on fixed ports on every interface, as a node behind a home router would.
pub const LISTEN: &[&str] =
    &["--p2p-listen", "/ip4/0.0.0.0/tcp/4001", "--p2p-listen", "/ip4/0.0.0.0/udp/4001/quic-v1", "--kad-refresh", "10"];

/// The NAT lab's "internet" namespace.
const INET: &str = "natlab-inet";
/// The LAN segment's switch namespace.
const SWITCH: &str = "cslan-sw";
/// The test's own interface on a reachable segment (see `Lab::segment_reachable`).
const TEST_PORT: &str = "cslan-test";
/// The LAN segment's prefix; host `i` (from 1) is `<LAN_NET>.<i>`.
pub const LAN_NET: &str = "10.77.0";
/// The linked host's addresses: the test's side, the host's side.
pub const LINK_NEAR: &str = "10.78.0.1";
pub const LINK_FAR: &str = "10.78.0.2";

/// Why a lab cannot be built here: only a missing privilege or tool.
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A NAT router's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping (source port kept), address-and-port-dependent filtering.
    EndpointIndependent,
    /// A new mapping (random port) for every destination.
    Symmetric,
}

/// Ok when this process is root and every tool in `tools` is on the PATH; else why not.
pub fn require(tools: &[&str]) -> Result<(), Skip> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Skip("needs root to create network namespaces".into()));
    }
    for tool in tools {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Err(Skip(format!("`{tool}` is not installed (run .ci/ensure-netlab)")));
        }
    }
    Ok(())
}

/// Takes `LOCK` (blocking until the test holding it is done); released when dropped.
fn lock() -> File {
    let lock = File::create(LOCK).unwrap_or_else(|e| panic!("cannot create {LOCK}: {e}"));
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0, "cannot lock {LOCK}");
    lock
}

/// Runs a command; its stdout, or its stderr as the error.
pub fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command that builds or changes the lab: a failure fails the test.
fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("the network lab failed: {e}");
    }
}

/// Loads an nftables ruleset into namespace `ns`.
fn nft(ns: &str, ruleset: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    use std::io::Write as _;
    child.stdin.take().expect("stdin").write_all(ruleset.as_bytes()).expect("write the ruleset");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(out.status.success(), "nft in {ns} failed: {}\n{ruleset}", String::from_utf8_lossy(&out.stderr));
}

/// A host's uplink: the interface on the far side that [`Lab::cut`] takes down.
struct Uplink {
    /// The namespace holding the far end (`None`: the test's own namespace).
    ns: Option<String>,
    ifname: String,
    /// The host's own end, where loss rules go.
    host_if: &'static str,
}

/// A lab's namespaces and how its hosts are attached; torn down on drop.
pub struct Lab {
    namespaces: Vec<String>,
    hosts: Vec<(String, Uplink)>,
    /// The LAN segment's hosts, in order (for `partition`).
    segment: Vec<String>,
    _lock: File,
}

impl Lab {
    /// An empty lab over `namespaces`, under the lock, with any leftovers removed.
    fn empty(namespaces: Vec<String>) -> Lab {
        let lab = Lab { namespaces, hosts: Vec::new(), segment: Vec::new(), _lock: lock() };
        lab.down();
        lab
    }

    /// Adds namespace `ns`: IPv4 only (as mDNS and the tests use it), loopback up.
    fn add_namespace(&self, ns: &str) {
        must(&["ip", "netns", "add", ns]);
        must(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        must(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// Joins `host` (interface `host_if`, address `addr`) to the bridge `br0` of `switch`
    /// through port `port`.
    fn plug(&mut self, switch: &str, port: &str, host: &str, host_if: &'static str, addr: &str) {
        must(&["ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", host_if, "netns", host]);
        must(&["ip", "-n", switch, "link", "set", port, "master", "br0", "up"]);
        must(&["ip", "-n", host, "addr", "add", addr, "dev", host_if]);
        must(&["ip", "-n", host, "link", "set", host_if, "up"]);
        self.hosts.push((host.to_owned(), Uplink { ns: Some(switch.to_owned()), ifname: port.to_owned(), host_if }));
    }

    fn bridge(&self, ns: &str) {
        must(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", ns, "link", "set", "br0", "up"]);
    }

    /// The NAT lab (see the module docs) with routers `nat-a` and `nat-b` of kinds `a`, `b`.
    pub fn nat(a: Nat, b: Nat) -> Result<Lab, Skip> {
        require(&["ip", "nft", "iptables", "conntrack"])?;
        let names = [INET, "pub1", "pub2", "nat-a", "nat-b", "a1", "b1"];
        let mut lab = Lab::empty(names.iter().map(|n| n.to_string()).collect());
        for ns in names {
            lab.add_namespace(ns);
        }
        lab.bridge(INET);
        for (host, ip, ifname) in [
            ("pub1", "198.18.0.1", "eth0"),
            ("pub2", "198.18.0.2", "eth0"),
            ("nat-a", "198.18.0.101", "wan0"),
            ("nat-b", "198.18.0.102", "wan0"),
        ] {
            lab.plug(INET, &format!("p-{host}"), host, ifname, &format!("{ip}/24"));
        }
        for (router, host, net, kind) in [("nat-a", "a1", "10.10.1", a), ("nat-b", "b1", "10.10.2", b)] {
            must(&["ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host]);
            must(&["ip", "-n", router, "addr", "add", &format!("{net}.1/24"), "dev", "lan0"]);
            must(&["ip", "-n", router, "link", "set", "lan0", "up"]);
            must(&["ip", "-n", host, "addr", "add", &format!("{net}.2/24"), "dev", "eth0"]);
            must(&["ip", "-n", host, "link", "set", "eth0", "up"]);
            must(&["ip", "-n", host, "route", "add", "default", "via", &format!("{net}.1")]);
            must(&["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            lab.hosts.push((
                host.to_owned(),
                Uplink { ns: Some(router.to_owned()), ifname: "lan0".into(), host_if: "eth0" },
            ));
            lab.set_nat(router, kind);
        }
        Ok(lab)
    }

    /// A LAN segment of `n` hosts (see the module docs); host `i` (from 0) is
    /// `hosts()[i]` at `10.77.0.<i + 1>`.
    pub fn segment(n: usize) -> Result<Lab, Skip> {
        require(&["ip", "nft"])?;
        let hosts: Vec<String> = (1..=n).map(|i| format!("cslan-{i}")).collect();
        let mut lab = Lab::empty([SWITCH.to_owned()].into_iter().chain(hosts.iter().cloned()).collect());
        lab.add_namespace(SWITCH);
        lab.bridge(SWITCH);
        for (i, host) in hosts.iter().enumerate() {
            lab.add_namespace(host);
            lab.plug(SWITCH, &format!("p{}", i + 1), host, "eth0", &format!("{LAN_NET}.{}/24", i + 1));
        }
        lab.segment = hosts;
        Ok(lab)
    }

    /// A LAN segment of `n` hosts (as `segment`) that the test's own namespace is plugged
    /// into too, at `<LAN_NET>.254` (switch port `p0`, in no partition group): the test
    /// talks HTTPS to nodes on the segment while they are split from each other.
    pub fn segment_reachable(n: usize) -> Result<Lab, Skip> {
        let lab = Lab::segment(n)?;
        // The test's end is a plain interface of this namespace; it goes with the switch.
        must(&["ip", "link", "add", TEST_PORT, "type", "veth", "peer", "name", "p0", "netns", SWITCH]);
        must(&["ip", "-n", SWITCH, "link", "set", "p0", "master", "br0", "up"]);
        must(&["ip", "addr", "add", &format!("{LAN_NET}.254/24"), "dev", TEST_PORT]);
        must(&["ip", "link", "set", TEST_PORT, "up"]);
        Ok(lab)
    }

    /// One host namespace `host`, joined to the test's own namespace by a veth pair:
    /// `LINK_NEAR` on this side (interface `<host>0`, at most 15 characters), `LINK_FAR`
    /// in the host (`eth0`).
    pub fn linked(host: &str) -> Result<Lab, Skip> {
        require(&["ip", "nft"])?;
        let near = format!("{host}0");
        assert!(near.len() <= 15, "interface name {near} is too long");
        let mut lab = Lab::empty(vec![host.to_owned()]);
        lab.add_namespace(host);
        must(&["ip", "link", "add", &near, "type", "veth", "peer", "name", "eth0", "netns", host]);
        must(&["ip", "addr", "add", &format!("{LINK_NEAR}/30"), "dev", &near]);
        must(&["ip", "link", "set", &near, "up"]);
        must(&["ip", "-n", host, "addr", "add", &format!("{LINK_FAR}/30"), "dev", "eth0"]);
        must(&["ip", "-n", host, "link", "set", "eth0", "up"]);
        lab.hosts.push((host.to_owned(), Uplink { ns: None, ifname: near, host_if: "eth0" }));
        Ok(lab)
    }

    /// The LAN segment's hosts, in order.
    pub fn hosts(&self) -> &[String] {
        &self.segment
    }

    fn uplink(&self, host: &str) -> &Uplink {
        &self.hosts.iter().find(|(h, _)| h == host).unwrap_or_else(|| panic!("no host {host} in this lab")).1
    }

    fn set_far_link(&self, host: &str, state: &str) {
        let up = self.uplink(host);
        match &up.ns {
            Some(ns) => must(&["ip", "-n", ns, "link", "set", &up.ifname, state]),
            None => must(&["ip", "link", "set", &up.ifname, state]),
        }
    }

    /// Cuts `host`'s link (the far end goes down: its packets go nowhere).
    pub fn cut(&self, host: &str) {
        self.set_far_link(host, "down");
    }

    /// Brings `host`'s link back up.
    pub fn restore(&self, host: &str) {
        self.set_far_link(host, "up");
    }

    /// Drops `percent` (1..=100) of the packets `host` sends or receives on its link,
    /// at random; 100 black-holes it. Replaces an earlier loss rule.
    pub fn loss(&self, host: &str, percent: u32) {
        assert!((1..=100).contains(&percent), "loss is 1 to 100 percent");
        let dev = self.uplink(host).host_if;
        // numgen's value is 0..99, so "< 100" is out of its range: all is a plain drop.
        let share = if percent == 100 { String::new() } else { format!("numgen random mod 100 < {percent} ") };
        self.clear_loss(host);
        nft(
            host,
            &format!(
                "table inet cslab_loss {{
  chain input {{
    type filter hook input priority -300; policy accept;
    iifname \"{dev}\" {share}drop
  }}
  chain output {{
    type filter hook output priority -300; policy accept;
    oifname \"{dev}\" {share}drop
  }}
}}"
            ),
        );
    }

    /// Ends `host`'s packet loss.
    pub fn clear_loss(&self, host: &str) {
        let _ = run(&["ip", "netns", "exec", host, "nft", "delete", "table", "inet", "cslab_loss"]);
    }

    /// Splits the LAN segment: hosts (by index into `hosts()`) in different groups no
    /// longer reach each other; within a group, and hosts in no group, nothing changes.
    pub fn partition(&self, groups: &[&[usize]]) {
        assert!(!self.segment.is_empty(), "partition needs a LAN segment");
        let ports = |g: &[usize]| g.iter().map(|i| format!("\"p{}\"", i + 1)).collect::<Vec<_>>().join(", ");
        let mut rules = String::new();
        for (i, from) in groups.iter().enumerate() {
            for (j, to) in groups.iter().enumerate() {
                if i != j && !from.is_empty() && !to.is_empty() {
                    rules += &format!("    iifname {{ {} }} oifname {{ {} }} drop\n", ports(from), ports(to));
                }
            }
        }
        self.heal();
        nft(
            SWITCH,
            &format!(
                "table bridge cslab_partition {{\n  chain forward {{ type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}"
            ),
        );
    }

    /// Ends a partition of the LAN segment.
    pub fn heal(&self) {
        let _ = run(&["ip", "netns", "exec", SWITCH, "nft", "delete", "table", "bridge", "cslab_partition"]);
    }

    /// Makes `router` (`nat-a` or `nat-b`) a NAT of kind `kind`, forgetting its mappings.
    pub fn set_nat(&self, router: &str, kind: Nat) {
        let (lan, random) = match router {
            "nat-a" => ("10.10.1.0/24", kind == Nat::Symmetric),
            "nat-b" => ("10.10.2.0/24", kind == Nat::Symmetric),
            _ => panic!("no router {router}"),
        };
        let _ = run(&["ip", "netns", "exec", router, "nft", "delete", "table", "ip", "natlab"]);
        // Unsolicited WAN packets are dropped, never answered. A dropped packet's
        // conntrack entry is never confirmed, so an early hole-punch packet from the peer
        // cannot leave an entry that makes the NAT pick another port for our own flow.
        nft(
            router,
            &format!(
                "table ip natlab {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" ip saddr {lan} masquerade{}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"lan0\" oifname \"wan0\" ip daddr != {{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 }} accept
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    iifname \"lan0\" accept
    icmp type echo-request accept
  }}
}}",
                if random { " fully-random" } else { "" }
            ),
        );
        let _ = run(&["ip", "netns", "exec", router, "conntrack", "-F"]);
    }

    /// Runs `f` on a thread inside `host`'s network namespace: processes it spawns (and
    /// their children) live there, whichever thread later waits for or signals them.
    pub fn in_namespace<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        assert!(self.namespaces.iter().any(|n| n == host), "no namespace {host} in this lab");
        let path = format!("/run/netns/{host}");
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: moves only this new thread into a namespace we created.
                let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(entered, 0, "setns {host}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the closure in the namespace panicked")
        })
    }

    /// Kills whatever still runs in the lab's namespaces, then deletes them (a veth pair
    /// goes with its namespace).
    fn down(&self) {
        for ns in &self.namespaces {
            let Ok(pids) = run(&["ip", "netns", "pids", ns]) else { continue };
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: signalling a process inside a namespace this lab owns.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.down();
    }
}

/// Starts a node inside namespace `ns`, listening as `LISTEN` says, with `extra` arguments.
pub async fn node_in(ns: &str, extra: &[&str]) -> Node {
    let args: Vec<&str> = LISTEN.iter().chain(extra).copied().collect();
    Node::start_wrapped_temp(&["ip", "netns", "exec", ns], &args).await
}

/// The HTTPS port of nodes started by `reachable_node_in` (each in its own namespace).
pub const HTTP_PORT: u16 = 8443;

/// Starts a node on host `index` of a reachable segment (`Lab::segment_reachable`) with
/// `extra` arguments; the returned handle talks HTTPS to it across the segment (as
/// `localhost`, the name its certificate holds, resolved to the host's address).
pub async fn reachable_node_in(lab: &Lab, index: usize, extra: &[&str]) -> Node {
    let http = format!("0.0.0.0:{HTTP_PORT}");
    let args: Vec<&str> = ["--http-addr", http.as_str()].into_iter().chain(extra.iter().copied()).collect();
    let mut node = node_in(&lab.hosts()[index], &args).await;
    let addr: std::net::SocketAddr = format!("{LAN_NET}.{}:{HTTP_PORT}", index + 1).parse().expect("address");
    let cert = std::path::PathBuf::from(node.info["tls_cert"].as_str().expect("tls_cert"));
    node.client = super::client_trusting_at(&cert, "localhost", addr);
    node.api = format!("https://localhost:{HTTP_PORT}");
    node
}

/// The libp2p address other hosts of the segment dial host `index`'s node at.
pub fn segment_bootstrap(index: usize, node: &Node) -> String {
    format!("/ip4/{LAN_NET}.{}/tcp/4001/p2p/{}", index + 1, super::p2p::peer_id(node))
}

/// The network report over the control socket (it works across network namespaces).
pub fn network(node: &Node) -> Option<Value> {
    match control::request(&node.dir, &Request::Status, Duration::from_secs(30)) {
        Ok(Response::Ok { data }) => Some(data["network"].clone()).filter(|n| !n.is_null()),
        _ => None,
    }
}
