//! What the PeerActor reports: the network status and the answer of a DHT peer lookup.
//! Plain data (serialised for the REST API, the control socket and the CLI); it must
//! never carry a key.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// This node's view of the peer-to-peer network.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct NetworkReport {
    /// This node's libp2p peer id (derived from `<data-dir>/p2p.key`).
    pub peer_id: String,
    /// True once every configured listen address is bound.
    pub listening: bool,
    /// The multiaddrs the node listens on (without relayed ones).
    pub listen_addrs: Vec<String>,
    /// Addresses confirmed reachable from outside (by AutoNAT, UPnP, a relay or config).
    pub external_addrs: Vec<String>,
    /// AutoNAT's verdict: `unknown`, `public` or `private`.
    pub nat_status: String,
    /// The address AutoNAT confirmed when `public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_addr: Option<String>,
    /// Slots this node holds on relays (while behind NAT).
    pub relay_reservations: Vec<RelayReservation>,
    /// True when this node offers the relay service (it is reachable and the service is on).
    pub relay_service: bool,
    /// Peers in the Kademlia routing table.
    pub routing_table_size: usize,
    /// `server` (answers DHT queries) or `client`.
    pub kad_mode: String,
    /// The Kademlia protocol name of this network.
    pub kad_protocol: String,
    /// Connected peers.
    pub peers: Vec<PeerReport>,
    /// How often the supervisor restarted the network since the node started (after the
    /// event loop died); the peer id and listen ports stay the same across restarts.
    #[serde(default)]
    pub restarts: u32,
}

/// A reservation on a relay.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RelayReservation {
    pub relay_peer_id: String,
    /// True once the relay accepted; the relayed address is then announced.
    pub accepted: bool,
    /// The address peers reach this node at through the relay.
    pub relayed_addrs: Vec<String>,
}

/// A connected peer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerReport {
    pub peer_id: String,
    /// The remote address of the peer's preferred (direct if any) connection.
    pub address: String,
    /// `direct` or `relayed`.
    pub route: String,
    /// Number of open connections to the peer.
    pub connections: usize,
    /// Last ping round-trip time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// The peer's agent version (from identify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The peer's gossip score: negative once it sent replication messages that do not
    /// open with this network's key (below -80 its messages are ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_score: Option<f64>,
}

/// The answer of a DHT peer lookup.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FoundPeer {
    pub peer_id: String,
    /// Addresses the DHT gave for the peer.
    pub addrs: Vec<String>,
    /// Milliseconds the lookup took (measured inside the node).
    pub elapsed_ms: f64,
    /// True when the node is connected to the peer now.
    pub connected: bool,
}
