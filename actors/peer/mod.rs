//! PeerActor: the node's handle on the peer-to-peer network.
//!
//! The libp2p Swarm is owned by one tokio task, the event loop (`event_loop`), which the
//! actor starts and watches: the actor turns its messages into typed `Command`s over an
//! `mpsc` channel and awaits the loop's `oneshot` answers. If the loop ends or panics,
//! the actor stops and its `actix::Supervisor` restarts it: a new Swarm with the same key
//! (so the same peer id), on the same ports, re-joining through the bootstrap peers.
//!
//! Invariants: only the event loop touches the Swarm; the actor never blocks on the loop
//! for longer than `ASK_TIMEOUT`; the node key is read from `<data-dir>/p2p.key`
//! (mode 0600) and never logged.

pub mod behaviour;
pub mod event_loop;
pub mod report;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Swarm};
use slog_scope::{error, info, warn};
use tokio::sync::{mpsc, oneshot};

use self::behaviour::{Behaviour, build_swarm};
pub use self::event_loop::Replication;
use self::event_loop::{Command, EventLoop, LookupError};
pub use self::report::{FoundPeer, NetworkReport, PeerReport, RelayReservation};
use crate::p2p::config::P2pConfig;

/// How long a question to the event loop may take before the caller gets an error. A DHT
/// lookup has its own (longer) limit: the Kademlia query timeout and a margin for the answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(behaviour::KAD_QUERY_TIMEOUT.as_secs() + 5);

/// Back-off between attempts to start the network (doubling from the first to the max).
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Ed25519 secret key bytes in `<data-dir>/p2p.key`.
const KEY_LEN: usize = 32;

/// Why the network could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("the network is restarting; try again")]
    Unavailable,
    #[error("the network did not answer in time")]
    Timeout,
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("cannot start the network: {0}")]
    Start(String),
    #[error("sync request failed: {0}")]
    Sync(String),
}

/// Loads the node's libp2p key from `path`, creating it (mode 0600) on first start.
pub fn load_key(path: &Path) -> anyhow::Result<Keypair> {
    use anyhow::Context as _;
    let mut bytes = crate::secrets::load_or_create(path, KEY_LEN)
        .with_context(|| format!("cannot load the peer key {}", path.display()))?;
    let key = Keypair::ed25519_from_bytes(&mut bytes[..KEY_LEN])
        .with_context(|| format!("{} is not an Ed25519 key; remove it to make a new one", path.display()))?;
    Ok(key)
}

/// Refuses a TCP listen port another process already listens on.
///
/// libp2p's TCP transport sets SO_REUSEPORT on its listener, because hole punching dials
/// out *from* the listen port and those sockets must share it. The same option lets a
/// second node bind a port the first one listens on, and the kernel then splits incoming
/// connections between two different peers. So before libp2p listens, each fixed TCP
/// port is bound once here without SO_REUSEPORT (std sets only SO_REUSEADDR, which
/// still refuses a port in LISTEN but not one with leftovers in TIME_WAIT) and released
/// at once; libp2p's own sockets keep their options, so dials still reuse the port.
/// Checked on the first start only: after a restart of the event loop the port is ours
/// and may still be held by connections of the loop that died. A process that takes
/// the port in the instant between the probe and libp2p's bind is not caught.
fn refuse_taken_tcp_ports(listen: &[Multiaddr]) -> Result<(), PeerError> {
    for addr in listen {
        if let Some(socket) = crate::p2p::addr::tcp_listen_socket(addr) {
            std::net::TcpListener::bind(socket).map_err(|e| {
                PeerError::Start(format!("cannot listen on {addr}: {e} (is another node or program using the port?)"))
            })?;
        }
    }
    Ok(())
}

/// A Swarm listening on the configured addresses.
fn start_swarm(key: &Keypair, config: &P2pConfig, listen: &[Multiaddr]) -> Result<Started, PeerError> {
    let mut swarm = build_swarm(key.clone(), config).map_err(|e| PeerError::Start(e.to_string()))?;
    let mut listeners = Vec::with_capacity(listen.len());
    for addr in listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| PeerError::Start(format!("cannot listen on {addr}: {}", crate::errors::chain(&e))))?;
        listeners.push(id);
    }
    Ok(Started { swarm, listeners })
}

struct Started {
    swarm: Swarm<Behaviour>,
    listeners: Vec<libp2p::core::transport::ListenerId>,
}

/// The actor.
pub struct PeerActor {
    key: Keypair,
    config: P2pConfig,
    /// The listen addresses, with port 0 replaced by the port bound (shared with the loop).
    bound: Arc<Mutex<Vec<Multiaddr>>>,
    /// The Swarm boot code started (so a bad listen address fails the start); later
    /// starts build their own.
    first: Option<Started>,
    commands: Option<mpsc::Sender<Command>>,
    task: Option<tokio::task::AbortHandle>,
    stopping: bool,
    restarts: u32,
    last_error: Option<String>,
    replication: Replication,
}

impl PeerActor {
    /// Builds the Swarm and opens its listeners now, so a bad address or a port in use is
    /// a start error; the event loop starts with the actor.
    pub fn new(key: Keypair, config: P2pConfig, replication: Replication) -> Result<Self, PeerError> {
        refuse_taken_tcp_ports(&config.listen)?;
        let first = start_swarm(&key, &config, &config.listen)?;
        if config.bootstrap.is_empty() {
            info!("no bootstrap peers: this node joins a network when others dial it (or, with --mdns, finds them)");
        }
        Ok(Self {
            key,
            bound: Arc::new(Mutex::new(config.listen.clone())),
            config,
            first: Some(first),
            commands: None,
            task: None,
            stopping: false,
            restarts: 0,
            last_error: None,
            replication,
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    /// Sends a command to the loop and waits for its answer.
    fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command + 'static,
        timeout: Duration,
    ) -> impl Future<Output = Result<T, PeerError>> + 'static {
        let commands = self.commands.clone();
        async move {
            let commands = commands.ok_or(PeerError::Unavailable)?;
            let (tx, rx) = oneshot::channel();
            // Queueing the command counts too: a stalled loop with a full queue must not
            // hold the caller past the limit.
            let asked = async {
                commands.send(make(tx)).await.map_err(|_| PeerError::Unavailable)?;
                rx.await.map_err(|_| PeerError::Unavailable)
            };
            tokio::time::timeout(timeout, asked).await.map_err(|_| PeerError::Timeout)?
        }
    }
}

impl Actor for PeerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.start_loop(ctx, RETRY_FIRST);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.commands = None;
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl PeerActor {
    /// Starts the event loop on a Swarm (the one boot built, else a new one on the same
    /// ports). A failed start is retried with back-off `retry`, doubling up to
    /// `RETRY_MAX`: after the loop died, its sockets may take a moment to close.
    fn start_loop(&mut self, ctx: &mut Context<Self>, retry: Duration) {
        let started = match self.first.take() {
            Some(s) => Ok(s),
            None => {
                let listen = self.bound.lock().map(|b| b.clone()).unwrap_or_else(|_| self.config.listen.clone());
                start_swarm(&self.key, &self.config, &listen)
            }
        };
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot start the network yet; retrying"; "error" => %e, "retry_ms" => retry.as_millis());
                self.last_error = Some(e.to_string());
                ctx.run_later(retry, move |act, ctx| {
                    if !act.stopping {
                        act.start_loop(ctx, (retry * 2).min(RETRY_MAX));
                    }
                });
                return;
            }
        };
        info!("network starting"; "peer_id" => %self.peer_id(), "restarts" => self.restarts);
        let (tx, rx) = mpsc::channel(64);
        let event_loop = EventLoop::new(
            started.swarm,
            rx,
            self.config.clone(),
            started.listeners,
            self.bound.clone(),
            self.replication.clone(),
        );
        let handle = tokio::spawn(event_loop.run());
        self.task = Some(handle.abort_handle());
        self.commands = Some(tx);
        ctx.spawn(handle.into_actor(self).map(|result, act, ctx| {
            if act.stopping {
                return;
            }
            let why = match result {
                Ok(()) => "the network event loop ended".to_owned(),
                Err(e) if e.is_panic() => "the network event loop panicked".to_owned(),
                Err(e) => format!("the network event loop failed: {e}"),
            };
            error!("network stopped unexpectedly"; "reason" => &why);
            act.last_error = Some(why);
            ctx.stop();
        }));
    }
}

impl Supervised for PeerActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.restarts += 1;
        warn!("actor restarting";
              "actor" => "PeerActor",
              "reason" => self.last_error.as_deref().unwrap_or("unknown"),
              "count" => self.restarts);
    }
}

/// The network status.
#[derive(Message)]
#[rtype(result = "Result<NetworkReport, PeerError>")]
pub struct GetNetwork;

impl Handler<GetNetwork> for PeerActor {
    type Result = ResponseFuture<Result<NetworkReport, PeerError>>;
    fn handle(&mut self, _: GetNetwork, _: &mut Self::Context) -> Self::Result {
        let restarts = self.restarts;
        let report = self.ask(Command::Status, ASK_TIMEOUT);
        Box::pin(async move { report.await.map(|report| NetworkReport { restarts, ..report }) })
    }
}

/// Looks a peer up in the DHT.
#[derive(Message)]
#[rtype(result = "Result<FoundPeer, PeerError>")]
pub struct FindPeer(pub PeerId);

impl Handler<FindPeer> for PeerActor {
    type Result = ResponseFuture<Result<FoundPeer, PeerError>>;
    fn handle(&mut self, msg: FindPeer, _: &mut Self::Context) -> Self::Result {
        let answer = self.ask(move |tx| Command::FindPeer(msg.0, tx), LOOKUP_TIMEOUT);
        Box::pin(async move { answer.await?.map_err(PeerError::from) })
    }
}

/// Disconnects from every peer and stops the network for good (node shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect;

impl Handler<Disconnect> for PeerActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Disconnect, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        let done = self.ask(Command::Shutdown, ASK_TIMEOUT);
        Box::pin(async move {
            if let Err(e) = done.await {
                warn!("graceful network shutdown incomplete"; "error" => %e);
            }
        })
    }
}

/// Publishes a sealed batch of changes on the replication topic (best effort: gossip may
/// drop it; reconciliation is the guarantee).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish(pub Vec<u8>);

impl Handler<Publish> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: Publish, _: &mut Self::Context) {
        if let Some(commands) = &self.commands
            && commands.try_send(Command::Publish(msg.0)).is_err()
        {
            warn!("network busy: a gossip batch was not published; reconciliation will carry it");
        }
    }
}

/// Sends a sealed sync request to a peer and waits for its sealed response.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, PeerError>")]
pub struct SyncRequest {
    pub peer: PeerId,
    pub sealed: Vec<u8>,
}

/// How long one sync request may take (the protocol's own timeout is 30 s).
const SYNC_TIMEOUT: Duration = Duration::from_secs(35);

impl Handler<SyncRequest> for PeerActor {
    type Result = ResponseFuture<Result<Vec<u8>, PeerError>>;
    fn handle(&mut self, msg: SyncRequest, _: &mut Self::Context) -> Self::Result {
        let answer = self.ask(move |tx| Command::Request(msg.peer, msg.sealed, tx), SYNC_TIMEOUT);
        Box::pin(async move { answer.await?.map_err(PeerError::Sync) })
    }
}

/// Answers an inbound sync request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SyncRespond {
    pub id: u64,
    pub sealed: Vec<u8>,
}

impl Handler<SyncRespond> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: SyncRespond, _: &mut Self::Context) {
        if let Some(commands) = &self.commands {
            let _ = commands.try_send(Command::Respond(msg.id, msg.sealed));
        }
    }
}
