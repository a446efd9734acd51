//! Multiaddr helpers: is an address relayed, whose peer is it, which addresses may go
//! into the DHT. Pure functions; they must never panic on an address a peer sent.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// True when the address goes through a circuit relay (`…/p2p-circuit/…`).
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The peer id an address ends with (`…/p2p/<id>`), if any. For a relayed address that is
/// the destination, not the relay.
pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last()? {
        Protocol::P2p(id) => Some(id),
        _ => None,
    }
}

/// The address without a trailing `/p2p/<id>` (how listen addresses are shown).
pub fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// True when the address is on a loopback interface (127.0.0.0/8 or ::1).
pub fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// True for an address worth telling other peers about: not loopback-only unless
/// `allow_loopback`, not unspecified (`0.0.0.0`), and not a relayed address whose relay
/// part is itself relayed.
pub fn is_shareable(addr: &Multiaddr, allow_loopback: bool) -> bool {
    if is_loopback(addr) && !allow_loopback {
        return false;
    }
    let mut circuits = 0;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(ip) if ip.is_unspecified() => return false,
            Protocol::Ip6(ip) if ip.is_unspecified() => return false,
            Protocol::P2pCircuit => circuits += 1,
            _ => {}
        }
    }
    circuits <= 1
}

/// `configured` with a port 0 replaced by the port `bound` got (same transport), so a
/// restarted listener binds the port the node already announced.
pub fn with_port_of(configured: &Multiaddr, bound: &Multiaddr) -> Multiaddr {
    let tcp = bound.iter().find_map(|p| if let Protocol::Tcp(port) = p { Some(port) } else { None });
    let udp = bound.iter().find_map(|p| if let Protocol::Udp(port) = p { Some(port) } else { None });
    configured
        .iter()
        .map(|p| match (p, tcp, udp) {
            (Protocol::Tcp(0), Some(port), _) => Protocol::Tcp(port),
            (Protocol::Udp(0), _, Some(port)) => Protocol::Udp(port),
            (p, _, _) => p,
        })
        .collect()
}

/// The socket address of a plain TCP listen address with a fixed port
/// (`/ip4|ip6/<ip>/tcp/<port>` and nothing after), for checking that the port is free.
/// Port 0 and any other shape give `None`.
pub fn tcp_listen_socket(addr: &Multiaddr) -> Option<std::net::SocketAddr> {
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    match (parts.next()?, parts.next()) {
        (Protocol::Tcp(port), None) if port != 0 => Some((ip, port).into()),
        _ => None,
    }
}

/// True when the address uses a transport this node speaks (TCP or QUIC v1 over IP or
/// DNS, optionally through a relay), so configuration errors surface at start.
pub fn is_supported_transport(addr: &Multiaddr) -> bool {
    // Only the part before a circuit names the transport we dial.
    let mut head = addr.iter().take_while(|p| !matches!(p, Protocol::P2pCircuit));
    let network = matches!(
        head.next(),
        Some(Protocol::Ip4(_) | Protocol::Ip6(_) | Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_))
    );
    let transport = match head.next() {
        Some(Protocol::Tcp(_)) => true,
        Some(Protocol::Udp(_)) => matches!(head.next(), Some(Protocol::QuicV1)),
        _ => false,
    };
    network && transport
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    const ID: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    #[test]
    fn tcp_listen_sockets() {
        assert_eq!(tcp_listen_socket(&ma("/ip4/127.0.0.1/tcp/4001")), Some("127.0.0.1:4001".parse().unwrap()));
        assert_eq!(tcp_listen_socket(&ma("/ip6/::/tcp/4001")), Some("[::]:4001".parse().unwrap()));
        for other in ["/ip4/0.0.0.0/tcp/0", "/ip4/1.2.3.4/udp/4001/quic-v1", "/dns4/a.example/tcp/1", "/ip4/1.2.3.4"] {
            assert_eq!(tcp_listen_socket(&ma(other)), None, "{other}");
        }
        assert_eq!(tcp_listen_socket(&Multiaddr::empty()), None);
    }

    #[test]
    fn relayed_or_direct() {
        assert!(!is_relayed(&ma("/ip4/1.2.3.4/tcp/4001")));
        assert!(is_relayed(&ma(&format!("/ip4/1.2.3.4/udp/4001/quic-v1/p2p/{ID}/p2p-circuit"))));
        assert!(is_relayed(&ma(&format!("/ip4/1.2.3.4/tcp/1/p2p/{ID}/p2p-circuit/p2p/{ID}"))));
    }

    #[test]
    fn peer_ids() {
        let id: PeerId = ID.parse().unwrap();
        assert_eq!(peer_id_of(&ma(&format!("/ip4/1.2.3.4/tcp/1/p2p/{ID}"))), Some(id));
        assert_eq!(peer_id_of(&ma("/ip4/1.2.3.4/tcp/1")), None);
        assert_eq!(peer_id_of(&Multiaddr::empty()), None);
        assert_eq!(without_peer_id(&ma(&format!("/ip4/1.2.3.4/tcp/1/p2p/{ID}"))), ma("/ip4/1.2.3.4/tcp/1"));
        assert_eq!(without_peer_id(&ma("/ip4/1.2.3.4/tcp/1")), ma("/ip4/1.2.3.4/tcp/1"));
    }

    #[test]
    fn shareable_addresses() {
        assert!(is_shareable(&ma("/ip4/198.18.0.1/tcp/4001"), false));
        assert!(!is_shareable(&ma("/ip4/0.0.0.0/tcp/4001"), true));
        assert!(!is_shareable(&ma("/ip4/127.0.0.1/tcp/4001"), false));
        assert!(is_shareable(&ma("/ip4/127.0.0.1/tcp/4001"), true));
        assert!(!is_shareable(&ma(&format!("/ip4/1.2.3.4/tcp/1/p2p/{ID}/p2p-circuit/p2p/{ID}/p2p-circuit")), true));
    }

    #[test]
    fn bound_ports_replace_port_zero_only() {
        let bound = ma("/ip4/127.0.0.1/tcp/40123");
        assert_eq!(with_port_of(&ma("/ip4/0.0.0.0/tcp/0"), &bound), ma("/ip4/0.0.0.0/tcp/40123"));
        assert_eq!(with_port_of(&ma("/ip4/0.0.0.0/tcp/4001"), &bound), ma("/ip4/0.0.0.0/tcp/4001"));
        let quic = ma("/ip4/127.0.0.1/udp/40999/quic-v1");
        assert_eq!(with_port_of(&ma("/ip4/127.0.0.1/udp/0/quic-v1"), &quic), quic);
        assert_eq!(with_port_of(&ma("/ip4/127.0.0.1/udp/0/quic-v1"), &bound), ma("/ip4/127.0.0.1/udp/0/quic-v1"));
    }

    #[test]
    fn supported_transports() {
        let dns = format!("/dns4/boot.example.org/tcp/4001/p2p/{ID}");
        for ok in ["/ip4/1.2.3.4/tcp/0", "/ip6/::1/udp/0/quic-v1", &dns] {
            assert!(is_supported_transport(&ma(ok)), "{ok}");
        }
        for bad in ["/ip4/1.2.3.4/udp/0", "/ip4/1.2.3.4/udp/0/quic", "/tcp/1", "/ip4/1.2.3.4"] {
            assert!(!is_supported_transport(&ma(bad)), "{bad}");
        }
        assert!(!is_supported_transport(&Multiaddr::empty()));
    }
}
