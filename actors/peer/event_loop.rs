//! The swarm event loop: the one task that owns and polls the Swarm. It takes typed
//! commands from the PeerActor over an `mpsc` channel, answers on `oneshot` channels
//! (pending DHT lookups wait in a map keyed by query id), and keeps the facts the status
//! report shows (connections, round-trip times, agents, NAT status, relay reservations).
//!
//! Everything a peer sends arrives here as a libp2p event; this code must never panic on
//! one and never await anything that a peer controls (the loop would stall the network).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, gossipsub, identify, kad, mdns, ping, relay, upnp,
};
use slog_scope::{debug, info, warn};
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent, SYNC_PROTOCOL, SyncFrame, topic_score_params};
use super::report::{FoundPeer, NetworkReport, PeerReport, RelayReservation};
use crate::actors::sync::FromNetwork;
use crate::p2p::addr::{is_loopback, is_relayed, is_shareable, with_port_of, without_peer_id};
use crate::p2p::backoff::Backoff;
use crate::p2p::config::P2pConfig;
use crate::replication::netkey::{Kind, NetworkKeys};

/// How often the loop re-dials lost bootstrap peers and looks for a relay.
const MAINTAIN_INTERVAL: Duration = Duration::from_secs(5);

/// Dial back-off for unreachable peers: 2 s, doubling, at most 5 min.
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How long a graceful shutdown waits for peers to take the disconnect.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A command from the PeerActor.
pub enum Command {
    /// The network status.
    Status(oneshot::Sender<NetworkReport>),
    /// A DHT lookup of a peer's addresses.
    FindPeer(PeerId, oneshot::Sender<Result<FoundPeer, LookupError>>),
    /// Disconnect from every peer, then end the loop.
    Shutdown(oneshot::Sender<()>),
    /// Publishes a sealed batch on the replication topic (best effort).
    Publish(Vec<u8>),
    /// Sends a sealed sync request to a peer; the answer is its sealed response.
    Request(PeerId, Vec<u8>, oneshot::Sender<Result<Vec<u8>, String>>),
    /// Answers the inbound sync request `id` with a sealed response.
    Respond(u64, Vec<u8>),
}

/// At most this many inbound sync requests wait for an answer; more are refused.
const MAX_INBOUND: usize = 64;

/// The replication side of the loop: the network's keys (to open messages before they
/// are accepted) and where opened ones go.
#[derive(Clone)]
pub struct Replication {
    pub keys: NetworkKeys,
    pub sync: actix::Recipient<FromNetwork>,
}

/// Why a lookup gave no addresses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("peer {0} not found in the DHT")]
    NotFound(PeerId),
    #[error("that is this node's own peer id")]
    OwnId,
    #[error("the DHT has no peers to ask yet")]
    NoPeers,
}

/// One open connection.
struct Conn {
    addr: Multiaddr,
    relayed: bool,
    dialer: bool,
}

/// What the loop knows about a connected peer.
#[derive(Default)]
struct PeerState {
    conns: HashMap<ConnectionId, Conn>,
    rtt: Option<Duration>,
    agent: Option<String>,
    protocols: Vec<StreamProtocol>,
    listen_addrs: Vec<Multiaddr>,
}

impl PeerState {
    /// A direct connection if there is one, else any.
    fn preferred(&self) -> Option<&Conn> {
        self.conns.values().find(|c| !c.relayed).or_else(|| self.conns.values().next())
    }

    /// A direct connection we dialled to an address the peer itself announces: proof the
    /// peer is reachable, which is what a relay must be.
    fn reachable_addr(&self) -> Option<Multiaddr> {
        self.conns
            .values()
            .filter(|c| c.dialer && !c.relayed)
            .map(|c| without_peer_id(&c.addr))
            .find(|a| self.listen_addrs.iter().any(|l| without_peer_id(l) == *a))
    }
}

/// A DHT lookup waiting for its query to finish.
struct PendingFind {
    target: PeerId,
    started: Instant,
    reply: oneshot::Sender<Result<FoundPeer, LookupError>>,
}

/// A reservation we asked a relay for.
struct Reservation {
    relay: PeerId,
    accepted: bool,
    relayed_addrs: Vec<Multiaddr>,
}

/// The loop's state.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    config: P2pConfig,
    /// Configured listeners → index in `bound`; an address bound on port 0 is written back
    /// there, so a restarted loop listens on the same ports.
    listeners: HashMap<libp2p::core::transport::ListenerId, usize>,
    bound: Arc<Mutex<Vec<Multiaddr>>>,
    listening: HashMap<libp2p::core::transport::ListenerId, bool>,
    peers: HashMap<PeerId, PeerState>,
    nat: autonat::v1::NatStatus,
    reservations: HashMap<libp2p::core::transport::ListenerId, Reservation>,
    finds: HashMap<kad::QueryId, PendingFind>,
    backoff: Backoff<PeerId>,
    replication: Replication,
    topic: gossipsub::IdentTopic,
    /// Inbound sync requests waiting for the SyncActor's answer.
    inbound: HashMap<u64, ResponseChannel<SyncFrame>>,
    next_inbound: u64,
    outbound: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, String>>>,
}

impl EventLoop {
    /// A loop over `swarm`, whose listeners were opened on the addresses in `bound`.
    pub fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        config: P2pConfig,
        listeners: Vec<libp2p::core::transport::ListenerId>,
        bound: Arc<Mutex<Vec<Multiaddr>>>,
        replication: Replication,
    ) -> Self {
        let listening = listeners.iter().map(|id| (*id, false)).collect();
        let topic = gossipsub::IdentTopic::new(replication.keys.topic());
        Self {
            swarm,
            commands,
            config,
            listeners: listeners.into_iter().enumerate().map(|(i, id)| (id, i)).collect(),
            bound,
            listening,
            peers: HashMap::new(),
            nat: autonat::v1::NatStatus::Unknown,
            reservations: HashMap::new(),
            finds: HashMap::new(),
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            replication,
            topic,
            inbound: HashMap::new(),
            next_inbound: 0,
            outbound: HashMap::new(),
        }
    }

    /// Runs until the PeerActor asks for shutdown or drops its sender.
    pub async fn run(mut self) {
        for addr in self.config.external_addrs.clone() {
            self.swarm.add_external_address(addr);
        }
        self.join_bootstrap();
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        if let Err(e) = gossip.subscribe(&self.topic) {
            warn!("cannot subscribe to the replication topic"; "error" => %e);
        }
        if let Err(e) = gossip.set_topic_params(self.topic.clone(), topic_score_params()) {
            warn!("cannot set the replication topic's score parameters"; "error" => %e);
        }
        let mut tick = tokio::time::interval(MAINTAIN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        self.disconnect_all().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => return,
                },
                _ = tick.tick() => self.maintain(),
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.report());
            }
            Command::FindPeer(target, reply) => {
                // Test builds: `FAILPOINTS=network-find-peer=panic` makes the loop die here,
                // so a test can watch the Supervisor bring the network back.
                fail::fail_point!("network-find-peer");
                if target == *self.swarm.local_peer_id() {
                    let _ = reply.send(Err(LookupError::OwnId));
                    return;
                }
                if self.routing_table_size() == 0 {
                    let _ = reply.send(Err(LookupError::NoPeers));
                    return;
                }
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(target);
                self.finds.insert(id, PendingFind { target, started: Instant::now(), reply });
            }
            Command::Shutdown(_) => {}
            Command::Publish(bytes) => {
                let size = bytes.len();
                match self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), bytes) {
                    Ok(_) => {}
                    // Nobody to tell yet: reconciliation carries the change when a peer comes.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                    Err(e) => {
                        debug!("gossip publish failed; reconciliation will carry it"; "error" => %e, "bytes" => size)
                    }
                }
            }
            Command::Request(peer, bytes, reply) => {
                let id = self.swarm.behaviour_mut().sync.send_request(&peer, SyncFrame(bytes));
                self.outbound.insert(id, reply);
            }
            Command::Respond(id, bytes) => {
                if let Some(channel) = self.inbound.remove(&id)
                    && self.swarm.behaviour_mut().sync.send_response(channel, SyncFrame(bytes)).is_err()
                {
                    debug!("sync response not sent: the peer went away");
                }
            }
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message { propagation_source, message_id, message } => {
                let opened = self.replication.keys.open(Kind::Gossip, &message.data);
                let verdict = match &opened {
                    Ok(_) => gossipsub::MessageAcceptance::Accept,
                    Err(e) => {
                        warn!("gossip message refused: it does not open with this network's key";
                              "peer" => %propagation_source, "error" => %e);
                        gossipsub::MessageAcceptance::Reject
                    }
                };
                let gossip = &mut self.swarm.behaviour_mut().gossipsub;
                gossip.report_message_validation_result(&message_id, &propagation_source, verdict);
                if let Ok(payload) = opened {
                    self.replication.sync.do_send(FromNetwork::Gossip { from: propagation_source, payload });
                }
            }
            gossipsub::Event::Subscribed { peer_id, .. } => {
                debug!("peer joined the replication topic"; "peer" => %peer_id)
            }
            _ => {}
        }
    }

    fn on_sync(&mut self, event: request_response::Event<SyncFrame, SyncFrame>) {
        use request_response::{Event, Message};
        match event {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                let Ok(payload) = self.replication.keys.open(Kind::SyncRequest, &request.0) else {
                    // Not a member of this network: no answer (the channel drops).
                    warn!("sync request refused: it does not open with this network's key"; "peer" => %peer);
                    return;
                };
                if self.inbound.len() >= MAX_INBOUND {
                    debug!("sync request refused: too many waiting"; "peer" => %peer);
                    return;
                }
                let id = self.next_inbound;
                self.next_inbound += 1;
                self.inbound.insert(id, channel);
                self.replication.sync.do_send(FromNetwork::Request { peer, id, payload });
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Ok(response.0));
                }
            }
            Event::OutboundFailure { request_id, error, peer, .. } => {
                debug!("sync request failed"; "peer" => %peer, "error" => %error);
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!("sync request from a peer failed"; "peer" => %peer, "error" => %error)
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// Adds the bootstrap peers to the DHT and starts a bootstrap walk; the first upkeep
    /// tick, at once, dials them.
    fn join_bootstrap(&mut self) {
        let peers = self.config.bootstrap.clone();
        for peer in &peers {
            self.swarm.behaviour_mut().kad.add_address(&peer.peer_id, without_peer_id(&peer.addr));
            // The AutoNAT probes need servers that are there from the start.
            self.swarm.behaviour_mut().autonat.add_server(peer.peer_id, Some(without_peer_id(&peer.addr)));
        }
        if !peers.is_empty() {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    /// Periodic upkeep (the first tick comes at once): dial bootstrap peers not connected
    /// (respecting the back-off), find a relay when behind NAT, forget old back-off entries.
    fn maintain(&mut self) {
        let now = Instant::now();
        for peer in self.config.bootstrap.clone() {
            if !self.swarm.is_connected(&peer.peer_id) && self.backoff.may_dial(&peer.peer_id, now) {
                self.dial(peer.peer_id, vec![peer.addr.clone()]);
            }
        }
        self.reserve_relay();
        self.backoff.prune(now);
    }

    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer).addresses(addrs).build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!("dial refused"; "peer" => %peer, "error" => %e);
        }
    }

    /// Behind NAT without a reservation: reserves a slot on one reachable relay.
    fn reserve_relay(&mut self) {
        if !matches!(self.nat, autonat::v1::NatStatus::Private) || !self.reservations.is_empty() {
            return;
        }
        let hop = relay::HOP_PROTOCOL_NAME;
        let candidate = self
            .peers
            .iter()
            .filter(|(_, p)| p.protocols.contains(&hop))
            .find_map(|(id, p)| p.reachable_addr().map(|a| (*id, a)));
        let Some((relay, addr)) = candidate else {
            debug!("behind NAT but no reachable relay known yet");
            return;
        };
        let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                info!("asking a relay for a reservation"; "relay" => %relay, "addr" => %circuit);
                self.reservations.insert(id, Reservation { relay, accepted: false, relayed_addrs: Vec::new() });
            }
            Err(e) => warn!("cannot listen through the relay"; "relay" => %relay, "error" => %e),
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            SwarmEvent::NewListenAddr { listener_id, address } => {
                if let Some(r) = self.reservations.get_mut(&listener_id) {
                    if !r.relayed_addrs.contains(&address) {
                        r.relayed_addrs.push(address);
                    }
                    return;
                }
                info!("listening"; "addr" => %address);
                self.listening.insert(listener_id, true);
                if let Some(&i) = self.listeners.get(&listener_id)
                    && let Ok(mut bound) = self.bound.lock()
                    && let Some(configured) = bound.get_mut(i)
                {
                    *configured = with_port_of(configured, &address);
                }
            }
            SwarmEvent::ExpiredListenAddr { listener_id, address } => {
                if let Some(r) = self.reservations.get_mut(&listener_id) {
                    r.relayed_addrs.retain(|a| *a != address);
                }
            }
            SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                if let Some(r) = self.reservations.remove(&listener_id) {
                    info!("relay reservation ended"; "relay" => %r.relay, "reason" => format!("{reason:?}"));
                } else {
                    warn!("listener closed"; "reason" => format!("{reason:?}"));
                }
            }
            SwarmEvent::ListenerError { error, .. } => warn!("listener error"; "error" => %error),
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                // An inbound relayed connection's remote address is only `/p2p/<peer>`; its
                // local address is the circuit, which names the relay.
                let (addr, dialer) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), true),
                    ConnectedPoint::Listener { local_addr, .. } if is_relayed(local_addr) => {
                        (local_addr.clone(), false)
                    }
                    ConnectedPoint::Listener { send_back_addr, .. } => (send_back_addr.clone(), false),
                };
                let relayed = is_relayed(&addr);
                if num_established.get() == 1 {
                    info!("peer connected"; "peer" => %peer_id, "addr" => %addr,
                          "route" => if relayed { "relayed" } else { "direct" });
                } else {
                    debug!("another connection"; "peer" => %peer_id, "addr" => %addr, "relayed" => relayed);
                }
                self.backoff.succeeded(&peer_id);
                self.peers.entry(peer_id).or_default().conns.insert(connection_id, Conn { addr, relayed, dialer });
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.conns.remove(&connection_id);
                }
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                    self.replication.sync.do_send(FromNetwork::PeerGone(peer_id));
                    info!("peer disconnected"; "peer" => %peer_id,
                          "cause" => cause.map(|c| c.to_string()).unwrap_or_else(|| "closed".into()));
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                let wait = self.backoff.failed(peer, Instant::now());
                debug!("dial failed"; "peer" => %peer, "error" => %error, "retry_after_s" => wait.as_secs());
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                // A peer that sends garbage ends here: logged, never fatal.
                debug!("incoming connection failed"; "from" => %send_back_addr, "error" => %error);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => info!("external address confirmed"; "addr" => %address),
            SwarmEvent::ExternalAddrExpired { address } => info!("external address expired"; "addr" => %address),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, connection_id }) => {
                self.on_identify(peer_id, connection_id, info)
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rtt = Some(rtt);
                }
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Err(e), .. }) => {
                debug!("ping failed"; "peer" => %peer, "error" => %e);
            }
            BehaviourEvent::Kad(event) => self.on_kad(event),
            BehaviourEvent::Gossipsub(event) => self.on_gossip(event),
            BehaviourEvent::Sync(event) => self.on_sync(event),
            BehaviourEvent::Autonat(autonat::v1::Event::StatusChanged { old, new }) => {
                info!("NAT status changed"; "from" => nat_name(&old), "to" => nat_name(&new),
                      "public_addr" => match &new { autonat::v1::NatStatus::Public(a) => a.to_string(), _ => String::new() });
                self.nat = new;
                self.reserve_relay();
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                for r in self.reservations.values_mut().filter(|r| r.relay == relay_peer_id) {
                    r.accepted = true;
                }
                if !renewal {
                    info!("relay reservation accepted"; "relay" => %relay_peer_id);
                }
            }
            BehaviourEvent::Relay(relay::Event::ReservationReqAccepted { src_peer_id, renewed: false }) => {
                info!("relaying for a peer behind NAT"; "peer" => %src_peer_id);
            }
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result }) => match result {
                Ok(_) => info!("hole punch succeeded: direct connection"; "peer" => %remote_peer_id),
                Err(e) => info!("hole punch failed; staying on the relay"; "peer" => %remote_peer_id, "error" => %e),
            },
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                // One dial per peer with all its addresses: the back-off admits one attempt.
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    debug!("found on the LAN"; "peer" => %peer, "addr" => %addr);
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    if !self.swarm.is_connected(&peer) && self.backoff.may_dial(&peer, Instant::now()) {
                        self.dial(peer, addrs);
                    }
                }
            }
            BehaviourEvent::Upnp(event) => match event {
                upnp::Event::NewExternalAddr { external_addr, .. } => {
                    info!("UPnP port mapping made"; "addr" => %external_addr)
                }
                upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                    info!("UPnP port mapping expired"; "addr" => %external_addr)
                }
                upnp::Event::GatewayNotFound => info!("UPnP: no gateway found"),
                upnp::Event::NonRoutableGateway => info!("UPnP: the gateway is not on the public network"),
            },
            _ => {}
        }
    }

    /// Feeds Kademlia the addresses a peer announces (it learns no routable address of a
    /// peer that dialled us otherwise), if the peer speaks our DHT protocol.
    fn on_identify(&mut self, peer_id: PeerId, connection_id: ConnectionId, info: identify::Info) {
        let state = self.peers.entry(peer_id).or_default();
        state.agent = Some(info.agent_version.chars().take(128).collect());
        state.protocols = info.protocols.clone();
        // Loopback addresses are useful only to a peer on the same host.
        let via_loopback = state.conns.get(&connection_id).is_some_and(|c| is_loopback(&c.addr));
        let addrs: Vec<Multiaddr> =
            info.listen_addrs.into_iter().filter(|a| is_shareable(a, via_loopback)).take(32).collect();
        state.listen_addrs = addrs.clone();
        if info.protocols.contains(&SYNC_PROTOCOL) {
            self.replication.sync.do_send(FromNetwork::PeerReady(peer_id));
        }
        if info.protocols.contains(&self.config.kad_protocol) {
            for addr in addrs {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
            }
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id, result: kad::QueryResult::GetClosestPeers(result), step, ..
            } => {
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let Some(find) = self.finds.get(&id) else { return };
                let found = peers.iter().find(|p| p.peer_id == find.target).map(|p| p.addrs.clone());
                if found.is_none() && !step.last {
                    return;
                }
                if let Some(find) = self.finds.remove(&id) {
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                    let answer = match found {
                        Some(addrs) => Ok(FoundPeer {
                            peer_id: find.target.to_string(),
                            addrs: addrs.iter().map(|a| a.to_string()).collect(),
                            elapsed_ms: find.started.elapsed().as_secs_f64() * 1000.0,
                            connected: self.swarm.is_connected(&find.target),
                        }),
                        None => Err(LookupError::NotFound(find.target)),
                    };
                    let _ = find.reply.send(answer);
                }
            }
            kad::Event::RoutingUpdated { peer, is_new_peer: true, addresses, .. } => {
                debug!("DHT: new peer"; "peer" => %peer);
                // Connect to peers the DHT finds, up to half the connection limit (the rest
                // stays free for peers that dial in).
                let established = self.swarm.network_info().num_peers();
                if !self.swarm.is_connected(&peer)
                    && established < (self.config.max_connections / 2) as usize
                    && self.backoff.may_dial(&peer, Instant::now())
                {
                    self.dial(peer, addresses.into_vec());
                }
            }
            kad::Event::ModeChanged { new_mode } => info!("DHT mode changed"; "mode" => new_mode.to_string()),
            _ => {}
        }
    }

    fn routing_table_size(&mut self) -> usize {
        self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum()
    }

    fn report(&mut self) -> NetworkReport {
        // Relayed addresses (from reservations) are listed as such, not as listen addresses.
        let listen_addrs = self.swarm.listeners().filter(|a| !is_relayed(a)).map(|a| a.to_string()).collect();
        let external: Vec<String> = self.swarm.external_addresses().map(|a| a.to_string()).collect();
        let relay_service = self.config.relay.max_reservations > 0 && !external.is_empty();
        let gossip = &self.swarm.behaviour().gossipsub;
        let mut peers: Vec<PeerReport> = self
            .peers
            .iter()
            .filter_map(|(id, p)| {
                let conn = p.preferred()?;
                Some(PeerReport {
                    peer_id: id.to_string(),
                    address: conn.addr.to_string(),
                    route: if conn.relayed { "relayed" } else { "direct" }.into(),
                    connections: p.conns.len(),
                    rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    agent: p.agent.clone(),
                    gossip_score: gossip.peer_score(id),
                })
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        let mut reservations: Vec<RelayReservation> = self
            .reservations
            .values()
            .map(|r| RelayReservation {
                relay_peer_id: r.relay.to_string(),
                accepted: r.accepted,
                relayed_addrs: r.relayed_addrs.iter().map(|a| a.to_string()).collect(),
            })
            .collect();
        reservations.sort_by(|a, b| a.relay_peer_id.cmp(&b.relay_peer_id));
        let kad_mode = self.swarm.behaviour_mut().kad.mode().to_string();
        NetworkReport {
            peer_id: self.swarm.local_peer_id().to_string(),
            listening: self.listening.values().all(|l| *l),
            listen_addrs,
            external_addrs: external,
            nat_status: nat_name(&self.nat).into(),
            public_addr: match &self.nat {
                autonat::v1::NatStatus::Public(a) => Some(a.to_string()),
                _ => None,
            },
            relay_reservations: reservations,
            relay_service,
            routing_table_size: self.routing_table_size(),
            kad_mode,
            kad_protocol: self.config.kad_protocol.to_string(),
            peers,
            // Known to the actor, which fills it in.
            restarts: 0,
        }
    }

    /// Closes every connection and waits (briefly) until the peers have taken it, so they
    /// see a clean close rather than a timeout.
    async fn disconnect_all(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        info!("disconnecting from peers"; "count" => peers.len());
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while self.swarm.network_info().num_peers() > 0 {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => self.on_event(event),
                Err(_) => break,
            }
        }
    }
}

fn nat_name(status: &autonat::v1::NatStatus) -> &'static str {
    match status {
        autonat::v1::NatStatus::Public(_) => "public",
        autonat::v1::NatStatus::Private => "private",
        autonat::v1::NatStatus::Unknown => "unknown",
    }
}
