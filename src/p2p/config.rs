//! Configuration of the peer-to-peer network: the raw options (`P2pArgs` for flags and
//! `COSMICSYNC_*` variables, `P2pFile` for the `[p2p]` table of the TOML file) and the
//! checked `P2pConfig` that `actors::peer` builds its Swarm from.
//!
//! Same precedence as every other option: flags > env > file > defaults. This module only
//! parses and checks; it must never bind a socket or read a key.

use std::time::Duration;

use clap::{Args, ValueEnum};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::Deserialize;

use crate::config::{ConfigError, invalid, list};
use crate::p2p::addr::{is_supported_transport, peer_id_of};

/// Defaults, in one place so `--help`, the docs and the code agree.
pub mod defaults {
    /// TCP and QUIC on every interface, on the port IPFS made customary, so one firewall
    /// rule (4001 TCP and UDP) opens both.
    pub const LISTEN: &[&str] = &["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"];
    /// A protocol name of our own, so a CosmicSyncCore network never merges with the IPFS
    /// DHT (`/ipfs/kad/1.0.0`) or any other by accident.
    pub const KAD_PROTOCOL: &str = "/cosmicsync/kad/1.0.0";
    pub const KAD_REFRESH_SECS: u64 = 300;
    pub const MAX_CONNECTIONS: u32 = 256;
    pub const MAX_CONNECTIONS_PER_PEER: u32 = 4;
    pub const RELAY_MAX_RESERVATIONS: usize = 128;
    pub const RELAY_MAX_CIRCUITS: usize = 16;
    pub const RELAY_MAX_CIRCUIT_SECS: u64 = 120;
    pub const RELAY_MAX_CIRCUIT_BYTES: u64 = 1 << 20;
}

/// Whether the node answers DHT queries (Kademlia server mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KadMode {
    /// Server once an external address is confirmed (by AutoNAT, UPnP, a relay or
    /// `--external-addr`), client before: peers never add an unreachable node to their
    /// tables. A node listening only on loopback is a server at once (every node of its
    /// host can dial it).
    #[default]
    Auto,
    /// Always answer queries (a node known to be reachable, or nodes on one host or LAN).
    Server,
    /// Never answer queries.
    Client,
}

/// Peer-to-peer options of `cosmicsync start`.
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "Peer-to-peer network")]
pub struct P2pArgs {
    /// Multiaddr to listen on, repeatable; port 0 picks a free port (see p2p_addrs in node.json)
    /// [default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1]
    #[arg(long = "p2p-listen", env = "COSMICSYNC_P2P_LISTEN", value_delimiter = ',', value_name = "MULTIADDR")]
    pub listen: Vec<String>,

    /// Bootstrap peer, repeatable: a multiaddr ending in /p2p/<peer id>
    #[arg(long = "bootstrap", env = "COSMICSYNC_BOOTSTRAP", value_delimiter = ',', value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,

    /// Address other peers can reach this node at (a public IP or a port forward), repeatable
    #[arg(long = "external-addr", env = "COSMICSYNC_EXTERNAL_ADDR", value_delimiter = ',', value_name = "MULTIADDR")]
    pub external_addrs: Vec<String>,

    /// Kademlia protocol name; only nodes with the same name form one DHT [default: /cosmicsync/kad/1.0.0]
    #[arg(long, env = "COSMICSYNC_KAD_PROTOCOL", value_name = "NAME")]
    pub kad_protocol: Option<String>,

    /// Whether this node answers DHT queries [default: auto]
    #[arg(long, env = "COSMICSYNC_KAD_MODE", value_enum, value_name = "MODE")]
    pub kad_mode: Option<KadMode>,

    /// Seconds between DHT refreshes (a bootstrap walk that finds new peers) [default: 300]
    #[arg(long, env = "COSMICSYNC_KAD_REFRESH", value_name = "SECS")]
    pub kad_refresh: Option<u64>,

    /// Find peers on the local network with mDNS (off by default: it announces the node to the LAN)
    #[arg(long, env = "COSMICSYNC_MDNS")]
    pub mdns: bool,

    /// Ask the router for port mappings with UPnP (off by default: many routers should not be trusted with it)
    #[arg(long, env = "COSMICSYNC_UPNP")]
    pub upnp: bool,

    /// Most connections in total; more are refused [default: 256]
    #[arg(long, env = "COSMICSYNC_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<u32>,

    /// Most connections to one peer [default: 4]
    #[arg(long, env = "COSMICSYNC_MAX_CONNECTIONS_PER_PEER", value_name = "N")]
    pub max_connections_per_peer: Option<u32>,

    /// Relay slots this node offers to peers behind NAT when it is publicly reachable; 0 turns the relay service off [default: 128]
    #[arg(long, env = "COSMICSYNC_RELAY_MAX_RESERVATIONS", value_name = "N")]
    pub relay_max_reservations: Option<usize>,

    /// Relayed connections this node carries at once [default: 16]
    #[arg(long, env = "COSMICSYNC_RELAY_MAX_CIRCUITS", value_name = "N")]
    pub relay_max_circuits: Option<usize>,

    /// Seconds one relayed connection may last before the relay closes it [default: 120]
    #[arg(long, env = "COSMICSYNC_RELAY_MAX_CIRCUIT_SECS", value_name = "SECS")]
    pub relay_max_circuit_secs: Option<u64>,

    /// Bytes one relayed connection may carry before the relay closes it [default: 1048576]
    #[arg(long, env = "COSMICSYNC_RELAY_MAX_CIRCUIT_BYTES", value_name = "BYTES")]
    pub relay_max_circuit_bytes: Option<u64>,
}

/// The `[p2p]` table of the TOML file (keys as the flags, without the `p2p-` prefix).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct P2pFile {
    pub listen: Option<Vec<String>>,
    pub bootstrap: Option<Vec<String>>,
    pub external_addrs: Option<Vec<String>>,
    pub kad_protocol: Option<String>,
    pub kad_mode: Option<KadMode>,
    pub kad_refresh: Option<u64>,
    pub mdns: Option<bool>,
    pub upnp: Option<bool>,
    pub max_connections: Option<u32>,
    pub max_connections_per_peer: Option<u32>,
    pub relay_max_reservations: Option<usize>,
    pub relay_max_circuits: Option<usize>,
    pub relay_max_circuit_secs: Option<u64>,
    pub relay_max_circuit_bytes: Option<u64>,
}

/// A bootstrap peer: its id and where to dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapPeer {
    pub peer_id: PeerId,
    pub addr: Multiaddr,
}

/// Limits of the circuit relay service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    pub max_reservations: usize,
    pub max_circuits: usize,
    pub max_circuit_duration: Duration,
    pub max_circuit_bytes: u64,
}

/// The checked network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P2pConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<BootstrapPeer>,
    pub external_addrs: Vec<Multiaddr>,
    pub kad_protocol: StreamProtocol,
    pub kad_mode: KadMode,
    pub kad_refresh: Duration,
    pub mdns: bool,
    pub upnp: bool,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    pub relay: RelayLimits,
}

/// Parses multiaddrs of a transport this node speaks.
fn multiaddrs(field: &'static str, values: Vec<String>) -> Result<Vec<Multiaddr>, ConfigError> {
    values
        .into_iter()
        .map(|s| {
            let addr: Multiaddr = s.parse().map_err(|e| invalid(field, format!("{s:?} is not a multiaddr: {e}")))?;
            if !is_supported_transport(&addr) {
                return Err(invalid(
                    field,
                    format!("{s:?}: use /ip4|ip6|dns/…/tcp/PORT or /ip4|ip6|dns/…/udp/PORT/quic-v1"),
                ));
            }
            Ok(addr)
        })
        .collect()
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(field, format!("must be {}-{}", range.start(), range.end())))
    }
}

impl P2pConfig {
    /// Merges flags/env over the file over defaults, and checks.
    pub fn merge(args: &P2pArgs, file: Option<P2pFile>) -> Result<Self, ConfigError> {
        let file = file.unwrap_or_default();
        let listen = multiaddrs("p2p-listen", list(&args.listen, file.listen, defaults::LISTEN))?;
        if listen.is_empty() {
            return Err(invalid("p2p-listen", "at least one listen address is needed"));
        }
        let bootstrap = multiaddrs("bootstrap", list(&args.bootstrap, file.bootstrap, &[]))?
            .into_iter()
            .map(|addr| match peer_id_of(&addr) {
                Some(peer_id) => Ok(BootstrapPeer { peer_id, addr }),
                None => Err(invalid("bootstrap", format!("{addr} must end with /p2p/<peer id>"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let external_addrs = multiaddrs("external-addr", list(&args.external_addrs, file.external_addrs, &[]))?;
        let kad_protocol = args.kad_protocol.clone().or(file.kad_protocol).unwrap_or(defaults::KAD_PROTOCOL.into());
        let kad_protocol = StreamProtocol::try_from_owned(kad_protocol)
            .map_err(|e| invalid("kad-protocol", format!("must start with '/': {e}")))?;
        let kad_refresh = in_range(
            "kad-refresh",
            args.kad_refresh.or(file.kad_refresh).unwrap_or(defaults::KAD_REFRESH_SECS),
            1..=86_400,
        )?;
        let max_connections = in_range(
            "max-connections",
            args.max_connections.or(file.max_connections).unwrap_or(defaults::MAX_CONNECTIONS),
            1..=100_000,
        )?;
        let max_connections_per_peer = in_range(
            "max-connections-per-peer",
            args.max_connections_per_peer
                .or(file.max_connections_per_peer)
                .unwrap_or(defaults::MAX_CONNECTIONS_PER_PEER),
            // Hole punching briefly needs a relayed and a direct connection side by side.
            2..=64,
        )?;
        let relay = RelayLimits {
            max_reservations: in_range(
                "relay-max-reservations",
                args.relay_max_reservations.or(file.relay_max_reservations).unwrap_or(defaults::RELAY_MAX_RESERVATIONS),
                0..=100_000,
            )?,
            max_circuits: in_range(
                "relay-max-circuits",
                args.relay_max_circuits.or(file.relay_max_circuits).unwrap_or(defaults::RELAY_MAX_CIRCUITS),
                1..=100_000,
            )?,
            max_circuit_duration: Duration::from_secs(in_range(
                "relay-max-circuit-secs",
                args.relay_max_circuit_secs.or(file.relay_max_circuit_secs).unwrap_or(defaults::RELAY_MAX_CIRCUIT_SECS),
                1..=86_400,
            )?),
            max_circuit_bytes: in_range(
                "relay-max-circuit-bytes",
                args.relay_max_circuit_bytes
                    .or(file.relay_max_circuit_bytes)
                    .unwrap_or(defaults::RELAY_MAX_CIRCUIT_BYTES),
                1024..=u64::MAX,
            )?,
        };
        Ok(P2pConfig {
            listen,
            bootstrap,
            external_addrs,
            kad_protocol,
            kad_mode: args.kad_mode.or(file.kad_mode).unwrap_or_default(),
            kad_refresh: Duration::from_secs(kad_refresh),
            mdns: args.mdns || file.mdns.unwrap_or(false),
            upnp: args.upnp || file.upnp.unwrap_or(false),
            max_connections,
            max_connections_per_peer,
            relay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    fn file(toml: &str) -> Option<P2pFile> {
        Some(toml::from_str(toml).unwrap())
    }

    #[test]
    fn defaults_apply() {
        let c = P2pConfig::merge(&P2pArgs::default(), None).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.kad_protocol.as_ref(), "/cosmicsync/kad/1.0.0");
        assert_eq!(c.kad_mode, KadMode::Auto);
        assert!(c.bootstrap.is_empty() && !c.mdns && !c.upnp);
        assert_eq!(c.relay.max_reservations, defaults::RELAY_MAX_RESERVATIONS);
    }

    #[test]
    fn flags_beat_file() {
        let args = P2pArgs { listen: vec!["/ip4/127.0.0.1/tcp/0".into()], mdns: true, ..Default::default() };
        let c = P2pConfig::merge(
            &args,
            file(&format!(
                "listen = [\"/ip4/127.0.0.1/udp/0/quic-v1\"]\nbootstrap = [\"/ip4/10.0.0.1/tcp/4001/p2p/{ID}\"]\nkad_mode = \"server\""
            )),
        )
        .unwrap();
        assert_eq!(c.listen, vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()]);
        assert_eq!(c.bootstrap[0].peer_id.to_string(), ID);
        assert_eq!(c.kad_mode, KadMode::Server);
        assert!(c.mdns);
    }

    #[test]
    fn rejects_bad_values_with_the_field_name() {
        let cases: Vec<(P2pArgs, &str)> = vec![
            (P2pArgs { listen: vec!["not an address".into()], ..Default::default() }, "p2p-listen"),
            (P2pArgs { listen: vec!["/ip4/127.0.0.1/udp/0".into()], ..Default::default() }, "p2p-listen"),
            (P2pArgs { bootstrap: vec!["/ip4/10.0.0.1/tcp/4001".into()], ..Default::default() }, "bootstrap"),
            (P2pArgs { kad_protocol: Some("kad".into()), ..Default::default() }, "kad-protocol"),
            (P2pArgs { kad_refresh: Some(0), ..Default::default() }, "kad-refresh"),
            (P2pArgs { max_connections_per_peer: Some(1), ..Default::default() }, "max-connections-per-peer"),
            (P2pArgs { relay_max_circuit_bytes: Some(10), ..Default::default() }, "relay-max-circuit-bytes"),
        ];
        for (args, field) in cases {
            let err = P2pConfig::merge(&args, None).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        assert!(toml::from_str::<P2pFile>("no_such_option = 1").is_err());
    }
}
