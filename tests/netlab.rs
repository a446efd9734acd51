//! The network lab itself (`tests/common/netlab.rs`): each topology and operation the
//! node tests rely on does what it says, observed with real sockets opened inside the
//! lab's namespaces (TCP connects for reachability, UDP for the ports a NAT maps to).
//!
//! Needs root, iproute2, nftables, iptables and conntrack (`.ci/ensure-netlab`); without
//! them it prints `SKIPPED: <reason>` (a failure under `CI=true`).

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::netlab::{LAN_NET, Lab, Nat};
use common::or_skip;

const PORT: u16 = 7000;

/// A TCP listener on every address of `host` (the kernel completes handshakes for it).
fn listen(lab: &Lab, host: &str) -> TcpListener {
    lab.in_namespace(host, || TcpListener::bind(("0.0.0.0", PORT)).expect("listen"))
}

/// Whether a TCP connection from `from` to `ip` completes within `within`.
fn reaches_within(lab: &Lab, from: &str, ip: &str, within: Duration) -> bool {
    let addr: SocketAddr = format!("{ip}:{PORT}").parse().unwrap();
    lab.in_namespace(from, || TcpStream::connect_timeout(&addr, within).is_ok())
}

/// Whether `from` reaches `ip` (a second is far beyond a veth round trip).
fn reaches(lab: &Lab, from: &str, ip: &str) -> bool {
    reaches_within(lab, from, ip, Duration::from_secs(1))
}

/// Waits (up to 10 s) until `from` reaches `ip`, e.g. while a link comes back up.
fn reaches_again(lab: &Lab, from: &str, ip: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if reaches(lab, from, ip) {
            return true;
        }
    }
    false
}

#[test]
fn a_segment_partitions_and_heals_cuts_and_restores_and_loses_packets() {
    let Some(lab) = or_skip(Lab::segment(5)) else { return };
    let hosts = lab.hosts().to_vec();
    let _listeners: Vec<TcpListener> = hosts.iter().map(|h| listen(&lab, h)).collect();
    let ip = |i: usize| format!("{LAN_NET}.{}", i + 1);

    for (from, to) in [(0, 4), (4, 0), (1, 2)] {
        assert!(reaches(&lab, &hosts[from], &ip(to)), "{from} -> {to} on the whole segment");
    }

    // A,B | C,D,E
    lab.partition(&[&[0, 1], &[2, 3, 4]]);
    for (from, to) in [(0, 1), (2, 4), (4, 3)] {
        assert!(reaches(&lab, &hosts[from], &ip(to)), "{from} -> {to} within a group");
    }
    for (from, to) in [(0, 2), (1, 4), (4, 0), (3, 1)] {
        assert!(!reaches(&lab, &hosts[from], &ip(to)), "{from} -> {to} across the partition");
    }
    lab.heal();
    for (from, to) in [(0, 2), (4, 0)] {
        assert!(reaches_again(&lab, &hosts[from], &ip(to)), "{from} -> {to} after healing");
    }

    lab.cut(&hosts[3]);
    assert!(!reaches(&lab, &hosts[0], &ip(3)), "a cut link carries nothing");
    lab.restore(&hosts[3]);
    assert!(reaches_again(&lab, &hosts[0], &ip(3)), "a restored link carries again");

    lab.loss(&hosts[2], 100);
    assert!(!reaches(&lab, &hosts[0], &ip(2)), "a black-holed host is not reached");
    assert!(!reaches(&lab, &hosts[2], &ip(0)), "a black-holed host reaches nothing");
    // Half the packets each way: a handshake (SYN and SYN-ACK) gets through a quarter of
    // the time. 40 tries all failing or all succeeding is below one in ten thousand.
    lab.loss(&hosts[2], 50);
    let tries = 40;
    let ok = (0..tries).filter(|_| reaches_within(&lab, &hosts[0], &ip(2), Duration::from_millis(200))).count();
    assert!(ok > 0 && ok < tries, "50% loss: {ok} of {tries} connects succeeded");
    lab.clear_loss(&hosts[2]);
    assert!(reaches_again(&lab, &hosts[0], &ip(2)), "no loss after clear_loss");
    eprintln!(
        "netlab: segment of 5 partitioned A,B | C,D,E and healed, link cut and restored, 50% loss let {ok} of {tries} connects through"
    );
}

/// The public address and port a packet from `socket` appears to come from at `host`'s
/// UDP socket `seen`.
fn mapped_source(socket: &UdpSocket, seen: &UdpSocket, to: &str) -> SocketAddr {
    socket.send_to(b"probe", to).expect("send");
    seen.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0; 16];
    seen.recv_from(&mut buf).expect("the probe arrives").1
}

#[test]
fn nat_routers_map_as_their_kind_and_keep_the_outside_out() {
    let Some(lab) = or_skip(Lab::nat(Nat::EndpointIndependent, Nat::Symmetric)) else { return };
    let _listener = listen(&lab, "pub1");
    let _private = listen(&lab, "a1");
    assert!(reaches(&lab, "a1", "198.18.0.1"), "a private host reaches a public one");
    assert!(!reaches(&lab, "pub1", "10.10.1.2"), "a private address is not reachable from outside");
    assert!(!reaches(&lab, "pub1", "198.18.0.101"), "nothing is forwarded unasked");
    assert!(!reaches(&lab, "a1", "10.10.2.2"), "one home network does not reach another");

    let udp = |host: &str, port: u16| lab.in_namespace(host, || UdpSocket::bind(("0.0.0.0", port)).expect("bind"));
    let (seen1, seen2) = (udp("pub1", 3478), udp("pub2", 3478));
    let mapping = |host: &str| {
        let socket = udp(host, 40000);
        (mapped_source(&socket, &seen1, "198.18.0.1:3478"), mapped_source(&socket, &seen2, "198.18.0.2:3478"))
    };
    let (eim, eim_2) = mapping("a1");
    assert_eq!(eim, eim_2, "endpoint-independent: one mapping for every destination");
    assert_eq!(eim.to_string(), "198.18.0.101:40000", "the source port is kept");
    let (b_to_1, b_to_2) = mapping("b1");
    assert_eq!(b_to_1.ip(), b_to_2.ip());
    assert_ne!(b_to_1.port(), b_to_2.port(), "symmetric: a new mapping for each destination");

    lab.set_nat("nat-a", Nat::Symmetric);
    let (a_to_1, a_to_2) = mapping("a1");
    assert_ne!(a_to_1.port(), a_to_2.port(), "switched to symmetric");

    lab.cut("a1");
    assert!(!reaches(&lab, "a1", "198.18.0.1"), "cut behind its router");
    lab.restore("a1");
    assert!(reaches_again(&lab, "a1", "198.18.0.1"), "restored");
    eprintln!("netlab: eim maps a1:40000 to {eim} for both; sym maps b1:40000 to {b_to_1} and {b_to_2}");
}
