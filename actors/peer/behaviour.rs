//! The node's libp2p stack: transports (TCP + TLS 1.3 + yamux, QUIC; both encrypted, no
//! plaintext transport exists) and the composed `NetworkBehaviour` (Kademlia, identify,
//! ping, AutoNAT, circuit relay v2 server and client, DCUtR, connection limits, optional
//! mDNS and UPnP).
//!
//! Only `build_swarm` makes a Swarm, and only the PeerActor's event loop polls it. This
//! module must never log a key or read files: the key comes in as a `Keypair`.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, ping, relay, tls, upnp,
    yamux,
};

use crate::p2p::config::{KadMode, P2pConfig};

/// How long a Kademlia query may run: a lookup answers "not found" after this, well inside
/// the CLI's request timeout.
pub const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// The identify protocol version we announce; informational for other implementations.
pub const IDENTIFY_PROTOCOL: &str = "/cosmicsync/id/1.0.0";

/// A connection with no open stream is closed after this long. Ping keeps a stream open
/// on every live connection, so this only closes connections whose peer went silent.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Half-open incoming connections allowed at once: a flood of handshakes that never
/// finish cannot exhaust the node.
const MAX_PENDING_INCOMING: u32 = 64;

/// The replication protocol peers reconcile over (request-response, CBOR frames holding
/// sealed bytes).
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/cosmicsync/sync/1");

/// The largest gossip message accepted or sent. Deliberate: large enough for a batch of
/// row states, small enough that the message cache (a few heartbeats of messages) stays
/// small. Larger batches are split; a single state too large for it travels by
/// reconciliation instead.
pub const GOSSIP_MAX_BYTES: usize = 256 * 1024;

/// The largest sync request and response (request-response frames); batches stay well
/// under it.
pub const SYNC_MAX_BYTES: u64 = 8 * 1024 * 1024;

/// A sealed replication frame on the sync protocol: opaque bytes to the network layer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SyncFrame(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// Every behaviour the node runs, polled together by the Swarm.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// First, so a connection over the limits is refused before any other behaviour sees it.
    pub limits: connection_limits::Behaviour,
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub autonat: autonat::v1::Behaviour,
    pub dcutr: dcutr::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub upnp: Toggle<upnp::tokio::Behaviour>,
    pub gossipsub: gossipsub::Behaviour,
    pub sync: request_response::cbor::Behaviour<SyncFrame, SyncFrame>,
}

/// Why the network stack could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot set up the TCP/TLS transport: {0}")]
    Tls(String),
    #[error("cannot set up DNS resolution: {0}")]
    Dns(String),
    #[error("cannot set up the relay transport: {0}")]
    Relay(String),
    #[error("cannot set up the network behaviour: {0}")]
    Behaviour(String),
}

/// Builds the Swarm for `key` and `config` (listening and dialling are the caller's job).
pub fn build_swarm(key: Keypair, config: &P2pConfig) -> Result<Swarm<Behaviour>, BuildError> {
    let config = config.clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(libp2p::tcp::Config::default().nodelay(true), tls::Config::new, yamux::Config::default)
        .map_err(|e| BuildError::Tls(e.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|e| BuildError::Dns(e.to_string()))?
        .with_relay_client(tls::Config::new, yamux::Config::default)
        .map_err(|e| BuildError::Relay(e.to_string()))?
        .with_behaviour(|key, relay_client| behaviour(key, relay_client, &config))
        .map_err(|e| BuildError::Behaviour(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}

fn behaviour(
    key: &Keypair,
    relay_client: relay::client::Behaviour,
    config: &P2pConfig,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();

    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));

    let relay = (config.relay.max_reservations > 0).then(|| {
        let relay_config = relay::Config {
            max_reservations: config.relay.max_reservations,
            max_circuits: config.relay.max_circuits,
            max_circuit_duration: config.relay.max_circuit_duration,
            max_circuit_bytes: config.relay.max_circuit_bytes,
            ..Default::default()
        };
        relay::Behaviour::new(peer_id, relay_config)
    });

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(format!("cosmicsync/{}", env!("CARGO_PKG_VERSION")))
            // Peers learn a new address (a relay reservation, a UPnP mapping) at once.
            .with_push_listen_addr_updates(true),
    );

    let mut kad_config = kad::Config::new(config.kad_protocol.clone());
    kad_config.set_periodic_bootstrap_interval(Some(config.kad_refresh));
    kad_config.set_query_timeout(KAD_QUERY_TIMEOUT);
    let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
    match config.kad_mode {
        // A node that listens only on loopback is reachable exactly by the nodes of its
        // host, which can all dial it: it serves the DHT (no AutoNAT verdict would come).
        KadMode::Auto if config.listen.iter().all(crate::p2p::addr::is_loopback) => {
            kad.set_mode(Some(kad::Mode::Server))
        }
        KadMode::Auto => kad.set_mode(None),
        KadMode::Server => kad.set_mode(Some(kad::Mode::Server)),
        KadMode::Client => kad.set_mode(Some(kad::Mode::Client)),
    }

    let autonat = autonat::v1::Behaviour::new(
        peer_id,
        autonat::v1::Config {
            // Sooner and more often than the defaults (15 s, 90 s): status is shown to
            // operators and decides whether the node looks for a relay.
            boot_delay: Duration::from_secs(5),
            retry_interval: Duration::from_secs(30),
            refresh_interval: Duration::from_secs(300),
            timeout: Duration::from_secs(15),
            throttle_server_period: Duration::from_secs(15),
            // Private networks (a company LAN, a lab) are legitimate deployments: probing
            // only global addresses would leave every such node "unknown" forever.
            only_global_ips: false,
            ..Default::default()
        },
    );

    let gossipsub = gossip(key)?;
    let codec = request_response::cbor::codec::Codec::default()
        .set_request_size_maximum(SYNC_MAX_BYTES)
        .set_response_size_maximum(SYNC_MAX_BYTES);
    let sync = request_response::Behaviour::with_codec(
        codec,
        [(SYNC_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
    );

    let mdns = if config.mdns { Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?) } else { None };
    let upnp = config.upnp.then(upnp::tokio::Behaviour::default);

    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        relay_client,
        relay: relay.into(),
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        kad,
        autonat,
        dcutr: dcutr::Behaviour::new(peer_id),
        mdns: mdns.into(),
        upnp: upnp.into(),
        gossipsub,
        sync,
    })
}

/// Gossipsub for the replication topic: signed messages, ids from content (a sealed
/// message carries a fresh nonce, so equal changes still differ), explicit validation
/// (the event loop opens each message before it is forwarded), and peer scoring so a
/// peer that sends messages which do not open loses standing and is then ignored.
fn gossip(key: &Keypair) -> Result<gossipsub::Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let config = gossipsub::ConfigBuilder::default()
        .max_transmit_size(GOSSIP_MAX_BYTES)
        .validate_messages()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .message_id_fn(|m: &gossipsub::Message| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            m.data.hash(&mut h);
            m.source.hash(&mut h);
            gossipsub::MessageId::from(h.finish().to_be_bytes().to_vec())
        })
        // Small networks: a few peers form the mesh; publish to every subscribed peer.
        .mesh_n_low(1)
        .mesh_n(4)
        .mesh_n_high(8)
        .mesh_outbound_min(0)
        .flood_publish(true)
        .build()
        .map_err(|e| e.to_string())?;
    let mut behaviour = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)?;
    behaviour.with_peer_score(gossipsub::PeerScoreParams::default(), gossipsub::PeerScoreThresholds::default())?;
    Ok(behaviour)
}

/// Score parameters of the replication topic: a message that does not open (another
/// network, forged, altered) costs its sender heavily; quiet peers cost nothing (a
/// network may be idle for hours).
pub fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    }
}
