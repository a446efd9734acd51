//! SyncActor: replication state and its two paths between nodes.
//!
//! - **Gossip** (fast path): committed local changes come from the shards (`Published`),
//!   wait a few milliseconds to be batched, are sealed and published on the network's
//!   topic by PeerActor. Batches from peers (opened by the network layer before they were
//!   accepted) are applied through `Shards::apply_remote`. Gossip is best effort.
//! - **Reconciliation** (the guarantee): when a peer that speaks the sync protocol
//!   connects, and periodically (jittered) with a few peers, a session finds what each
//!   side lacks (`reconcile`) and sends it, whatever node made it (store and forward).
//!
//! It owns what the node knows of each peer's replication (last session, changes sent
//! and received) and the sessions it serves. It never touches the Swarm (PeerActor does)
//! or runs SQL (the shards do), and never awaits a peer inside a handler: sessions and
//! requests run as spawned futures.

pub mod protocol;
pub mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use slog_scope::{debug, info, warn};
use utoipa::ToSchema;

use self::protocol::{GossipBatch, Request, Response};
use self::reconcile::{ROWS_PER_REQUEST, Served, ServedSessions, SessionError, SessionStats, Snapshot, Transport};
use crate::actors::peer::{PeerActor, Publish, SyncRequest, SyncRespond};
use crate::actors::shard::{RemoteApplied, RemoteState, StoreError};
use crate::actors::shards::Shards;
pub use crate::changes::{LocalChange, Published};
use crate::replication::netkey::{Kind, NetworkKeys};

/// How long committed changes wait to be published together.
const BATCH_DELAY: Duration = Duration::from_millis(5);
/// A gossip batch is split before its JSON passes this size (the topic's limit is larger:
/// room for the seal and gossipsub's framing).
const BATCH_BYTES: usize = crate::actors::peer::behaviour::GOSSIP_MAX_BYTES * 3 / 4;
/// A served session unused this long is dropped.
const SESSION_IDLE: Duration = Duration::from_secs(60);
/// Batches from peers applied at once: the rest wait, so gossip cannot take every shard
/// connection from the node's own clients.
const APPLYING: usize = 2;
/// Gossip batches waiting to be applied; beyond this they are dropped (reconciliation
/// brings their changes), which bounds the memory a flood of gossip can take.
const MAX_WAITING_BATCHES: usize = 256;

/// From the network's event loop: what peers sent (already opened with the network key).
#[derive(Message)]
#[rtype(result = "()")]
pub enum FromNetwork {
    /// A gossip batch.
    Gossip { from: PeerId, payload: Vec<u8> },
    /// A sync request to answer with `SyncRespond { id, .. }`.
    Request { peer: PeerId, id: u64, payload: Vec<u8> },
    /// A connected peer speaks the sync protocol.
    PeerReady(PeerId),
    /// The last connection to a peer closed.
    PeerGone(PeerId),
}

/// Settings (from the node's config).
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Mean time between periodic reconciliations (each is jittered ±50 %).
    pub interval: Duration,
    /// Peers reconciled with per periodic round.
    pub fanout: usize,
    /// Sessions this node answers at once; more get `Busy`.
    pub max_served: usize,
    /// Sessions this node runs at once.
    pub max_running: usize,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self { interval: Duration::from_secs(30), fanout: 2, max_served: 4, max_running: 2 }
    }
}

/// What the node knows of one peer's replication.
#[derive(Debug, Default)]
struct PeerSync {
    connected: bool,
    reconciling: bool,
    last_session: Option<DateTime<Utc>>,
    last_error: Option<String>,
    sent: u64,
    received: u64,
    bytes: u64,
    last: Option<SessionReport>,
    /// The last session this node ran with the peer that moved rows.
    last_transfer: Option<SessionReport>,
    /// Sessions that failed in a row (reset by one that succeeds).
    failures: u32,
}

/// What the last reconciliation session this node ran with a peer moved and cost.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct SessionReport {
    /// Negentropy round trips.
    pub rounds: usize,
    /// Row states fetched from the peer, and pushed to it.
    pub received: usize,
    pub sent: usize,
    /// Sealed bytes of every request and response of the session, both ways.
    pub bytes: usize,
    pub millis: u64,
}

/// The actor.
pub struct SyncActor {
    node_id: String,
    keys: NetworkKeys,
    shards: Shards,
    peer: Addr<PeerActor>,
    settings: SyncSettings,
    outbox: Vec<RemoteState>,
    flush_scheduled: bool,
    peers: HashMap<PeerId, PeerSync>,
    served: Arc<Mutex<ServedSessions>>,
    next_session: u64,
    running: usize,
    totals: Totals,
    /// Permits to apply batches from peers (`APPLYING`), and how many batches wait.
    applying: Arc<tokio::sync::Semaphore>,
    waiting_batches: usize,
    /// The last batch published (test builds replay it through the `gossip-tamper` fail point).
    #[cfg(feature = "failpoints")]
    last_published: Option<Vec<u8>>,
}

/// Node-wide replication counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct Totals {
    /// Gossip batches published, and the changes in them.
    pub batches_published: u64,
    pub changes_published: u64,
    /// Gossip batches received from peers, and the changes in them that changed a row here.
    pub batches_received: u64,
    /// Batches dropped because too many waited to be applied (reconciliation brings them).
    pub batches_dropped: u64,
    pub changes_applied: u64,
    /// Reconciliation sessions run by this node that finished, and that failed.
    pub sessions_done: u64,
    pub sessions_failed: u64,
    /// Conflicts found while applying changes from peers.
    pub conflicts_found: u64,
}

impl SyncActor {
    pub fn new(
        node_id: String,
        keys: NetworkKeys,
        shards: Shards,
        peer: Addr<PeerActor>,
        settings: SyncSettings,
    ) -> Self {
        Self {
            node_id,
            keys,
            shards,
            peer,
            settings,
            outbox: Vec::new(),
            flush_scheduled: false,
            peers: HashMap::new(),
            served: Arc::new(Mutex::new(HashMap::new())),
            next_session: rand::random::<u32>() as u64,
            running: 0,
            totals: Totals::default(),
            applying: Arc::new(tokio::sync::Semaphore::new(APPLYING)),
            waiting_batches: 0,
            #[cfg(feature = "failpoints")]
            last_published: None,
        }
    }

    /// Publishes the waiting changes, in batches under the size limit.
    fn flush(&mut self) {
        self.flush_scheduled = false;
        // Test builds: `FAILPOINTS=gossip-reverse=return` publishes a batch's changes in
        // reverse commit order (a profile before its user), as reordering gossip would.
        #[cfg(feature = "failpoints")]
        if fail::eval("gossip-reverse", |_| ()).is_some() {
            self.outbox.reverse();
        }
        let mut batch: Vec<RemoteState> = Vec::new();
        let mut size = 0;
        for change in std::mem::take(&mut self.outbox) {
            let bytes = serde_json::to_vec(&change).map(|v| v.len()).unwrap_or(0);
            if !batch.is_empty() && size + bytes > BATCH_BYTES {
                self.publish(std::mem::take(&mut batch));
                size = 0;
            }
            if bytes > BATCH_BYTES {
                // Too large for one gossip message: reconciliation carries it.
                debug!("change too large to gossip; left to reconciliation"; "id" => %change.state.id, "bytes" => bytes);
                continue;
            }
            size += bytes;
            batch.push(change);
        }
        if !batch.is_empty() {
            self.publish(batch);
        }
    }

    fn publish(&mut self, states: Vec<RemoteState>) {
        self.totals.batches_published += 1;
        self.totals.changes_published += states.len() as u64;
        let batch = GossipBatch { node: self.node_id.clone(), states };
        let sealed = protocol::seal(&self.keys, Kind::Gossip, &batch);
        for message in self.tamper(sealed) {
            self.peer.do_send(Publish(message));
        }
    }

    /// Test builds: `FAILPOINTS=gossip-tamper=return` makes this node publish, for each
    /// batch, what a broken or hostile peer might: random bytes, the batch truncated, the
    /// batch sealed with another network's key, the previous batch again (a replay), and
    /// only then the batch itself. Otherwise (and always in release builds) the batch.
    fn tamper(&mut self, sealed: Vec<u8>) -> Vec<Vec<u8>> {
        #[cfg(feature = "failpoints")]
        if fail::eval("gossip-tamper", |_| ()).is_some() {
            let stranger = NetworkKeys::derive(&rand::random());
            let opened = self.keys.open(Kind::Gossip, &sealed).unwrap_or_default();
            let mut out = vec![
                (0..512).map(|_| rand::random::<u8>()).collect(),
                sealed[..sealed.len() / 2].to_vec(),
                stranger.seal(Kind::Gossip, &opened),
            ];
            out.extend(self.last_published.replace(sealed.clone()));
            out.push(sealed);
            return out;
        }
        vec![sealed]
    }

    fn on_gossip(&mut self, from: PeerId, payload: Vec<u8>, ctx: &mut Context<Self>) {
        let batch: GossipBatch = match protocol::read(&payload) {
            Ok(b) => b,
            Err(e) => {
                warn!("gossip batch from a member not understood"; "peer" => %from, "error" => %e);
                return;
            }
        };
        self.totals.batches_received += 1;
        if self.waiting_batches >= MAX_WAITING_BATCHES {
            self.totals.batches_dropped += 1;
            debug!("gossip batch dropped: too many wait to be applied; reconciliation brings it"; "peer" => %from);
            return;
        }
        self.waiting_batches += 1;
        let (shards, applying) = (self.shards.clone(), self.applying.clone());
        let fut = async move {
            let _permit = applying.acquire_owned().await;
            shards.apply_remote(batch.states).await
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, _| {
            act.waiting_batches -= 1;
            act.gossip_applied(from, result);
        }));
    }

    fn gossip_applied(&mut self, from: PeerId, result: Result<RemoteApplied, StoreError>) {
        match result {
            Ok(done) => {
                self.totals.changes_applied += done.applied as u64;
                self.totals.conflicts_found += done.conflicts_opened as u64;
                self.peers.entry(from).or_default().received += done.applied as u64;
            }
            // The next reconciliation brings what was not applied.
            Err(e) => warn!("gossip batch not applied"; "peer" => %from, "error" => %e),
        }
    }

    /// Answers a sync request on a spawned future.
    fn on_request(&mut self, peer: PeerId, id: u64, payload: Vec<u8>, ctx: &mut Context<Self>) {
        let request: Request = match protocol::read(&payload) {
            Ok(r) => r,
            Err(e) => {
                warn!("sync request from a member not understood"; "peer" => %peer, "error" => %e);
                let failed = Response::Failed { reason: "malformed request".into() };
                self.respond(id, &failed);
                return;
            }
        };
        if let Request::Push { states } = &request {
            self.peers.entry(peer).or_default().received += states.len() as u64;
        }
        let (shards, served, max_served) = (self.shards.clone(), self.served.clone(), self.settings.max_served);
        let applying = self.applying.clone();
        let fut = async move {
            // Pushed states take a permit like gossip batches.
            let _permit = match &request {
                Request::Push { .. } => Some(applying.acquire_owned().await),
                _ => None,
            };
            answer(request, peer, &shards, &served, max_served).await
        };
        ctx.spawn(fut.into_actor(self).map(move |(response, sent), act, _| {
            act.peers.entry(peer).or_default().sent += sent as u64;
            act.respond(id, &response);
        }));
    }

    fn respond(&self, id: u64, response: &Response) {
        let sealed = protocol::seal(&self.keys, Kind::SyncResponse, response);
        self.peer.do_send(SyncRespond { id, sealed });
    }

    /// Starts a session with `peer` unless one runs or too many do.
    fn reconcile_with(&mut self, peer: PeerId, ctx: &mut Context<Self>) {
        let state = self.peers.entry(peer).or_default();
        if state.reconciling || !state.connected || self.running >= self.settings.max_running {
            return;
        }
        state.reconciling = true;
        self.running += 1;
        self.next_session += 1;
        let session = self.next_session;
        let transport = PeerTransport { peer, addr: self.peer.clone(), keys: self.keys.clone() };
        let shards = self.shards.clone();
        let started = Instant::now();
        let fut = async move { reconcile::run(&transport, &shards, session).await };
        ctx.spawn(fut.into_actor(self).map(move |result: Result<SessionStats, SessionError>, act, ctx| {
            act.running -= 1;
            let state = act.peers.entry(peer).or_default();
            state.reconciling = false;
            state.last_session = Some(Utc::now());
            match result {
                Ok(stats) => {
                    state.failures = 0;
                    act.totals.sessions_done += 1;
                    act.totals.changes_applied += stats.applied as u64;
                    act.totals.conflicts_found += stats.conflicts as u64;
                    state.last_error = None;
                    state.received += stats.received as u64;
                    state.sent += stats.sent as u64;
                    state.bytes += stats.bytes as u64;
                    let moved = stats.received + stats.sent > 0;
                    let ms = started.elapsed().as_millis() as u64;
                    let report = SessionReport {
                        rounds: stats.rounds,
                        received: stats.received,
                        sent: stats.sent,
                        bytes: stats.bytes,
                        millis: ms,
                    };
                    state.last = Some(report);
                    if moved {
                        state.last_transfer = Some(report);
                    }
                    if moved {
                        info!("reconciled with a peer"; "peer" => %peer, "received" => stats.received,
                              "applied" => stats.applied, "sent" => stats.sent, "rounds" => stats.rounds,
                              "bytes" => stats.bytes, "ms" => ms);
                    } else {
                        debug!("reconciled with a peer: nothing differs"; "peer" => %peer, "rounds" => stats.rounds,
                               "bytes" => stats.bytes, "ms" => ms);
                    }
                }
                Err(SessionError::Busy) => {
                    debug!("peer busy; reconciling later"; "peer" => %peer);
                    act.retry(peer, ctx);
                }
                Err(e) => {
                    act.totals.sessions_failed += 1;
                    warn!("reconciliation failed; retrying"; "peer" => %peer, "error" => %e);
                    if let Some(state) = act.peers.get_mut(&peer) {
                        state.last_error = Some(e.to_string());
                    }
                    act.retry(peer, ctx);
                }
            }
        }));
    }

    /// Tries a failed or refused session again after a back-off (1 s, doubling, at most a
    /// minute): a node whose shards are still starting, or a busy peer, must not wait for
    /// the next periodic round.
    fn retry(&mut self, peer: PeerId, ctx: &mut Context<Self>) {
        let Some(state) = self.peers.get_mut(&peer) else { return };
        state.failures = state.failures.saturating_add(1);
        let wait = Duration::from_secs(1 << state.failures.min(6)).min(Duration::from_secs(60));
        ctx.run_later(wait, move |act, ctx| act.reconcile_with(peer, ctx));
    }

    /// A periodic round: a few connected peers, picked at random; then the next round.
    fn periodic(&mut self, ctx: &mut Context<Self>) {
        use rand::seq::IteratorRandom;
        let connected = self.peers.iter().filter(|(_, p)| p.connected && !p.reconciling).map(|(id, _)| *id);
        let chosen = connected.choose_multiple(&mut rand::rng(), self.settings.fanout);
        for peer in chosen {
            self.reconcile_with(peer, ctx);
        }
        if let Ok(mut served) = self.served.lock() {
            served.retain(|_, s| s.last_used.elapsed() < SESSION_IDLE);
        }
        self.schedule(ctx);
    }

    fn schedule(&self, ctx: &mut Context<Self>) {
        let base = self.settings.interval.as_secs_f64();
        let wait = Duration::from_secs_f64(base * (0.5 + rand::random::<f64>()));
        ctx.run_later(wait, |act, ctx| act.periodic(ctx));
    }
}

/// Computes the answer to a request; also returns how many states it sends.
async fn answer(
    request: Request,
    peer: PeerId,
    shards: &Shards,
    served: &Mutex<ServedSessions>,
    max_served: usize,
) -> (Response, usize) {
    let failed = |e: &dyn std::fmt::Display| Response::Failed { reason: e.to_string() };
    match request {
        Request::Reconcile { session, message } => {
            let known = served.lock().map(|s| s.contains_key(&(peer, session))).unwrap_or(false);
            if !known {
                if served.lock().map(|s| s.len() >= max_served).unwrap_or(true) {
                    return (Response::Busy, 0);
                }
                let snapshot = match Snapshot::take(shards).await {
                    Ok(s) => s,
                    Err(e) => return (failed(&e), 0),
                };
                if let Ok(mut s) = served.lock() {
                    s.insert((peer, session), Served { snapshot, last_used: Instant::now() });
                }
            }
            let mut sessions = match served.lock() {
                Ok(s) => s,
                Err(_) => return (Response::Failed { reason: "session state unavailable".into() }, 0),
            };
            match sessions.get_mut(&(peer, session)) {
                Some(s) => (s.reconcile(&message), 0),
                None => (Response::Failed { reason: "unknown session".into() }, 0),
            }
        }
        Request::Fetch { session, ids } => {
            if ids.len() > ROWS_PER_REQUEST * 2 {
                return (Response::Failed { reason: "too many rows asked for at once".into() }, 0);
            }
            let rows = served.lock().ok().and_then(|mut s| s.get_mut(&(peer, session)).map(|s| s.rows(&ids)));
            let Some(rows) = rows else { return (Response::Failed { reason: "unknown session".into() }, 0) };
            match shards.states_of(rows).await {
                Ok(states) => {
                    let n = states.len();
                    let states = states.into_iter().map(|state| RemoteState { state, origin_seq: 0 }).collect();
                    (Response::States { states }, n)
                }
                Err(e) => (failed(&e), 0),
            }
        }
        Request::Push { states } => match shards.apply_remote(states).await {
            Ok(_) => (Response::Applied, 0),
            Err(e) => (failed(&e), 0),
        },
        Request::Done { session } => {
            if let Ok(mut s) = served.lock() {
                s.remove(&(peer, session));
            }
            (Response::Applied, 0)
        }
    }
}

/// Sync requests to one peer through PeerActor, sealed both ways.
struct PeerTransport {
    peer: PeerId,
    addr: Addr<PeerActor>,
    keys: NetworkKeys,
}

impl Transport for PeerTransport {
    fn call(&self, request: Request) -> impl Future<Output = Result<(Response, usize), SessionError>> + Send {
        let sealed = protocol::seal(&self.keys, Kind::SyncRequest, &request);
        let (addr, peer, keys) = (self.addr.clone(), self.peer, self.keys.clone());
        async move {
            let sent = sealed.len();
            let reply = addr
                .send(SyncRequest { peer, sealed })
                .await
                .map_err(|e| SessionError::Network(e.to_string()))?
                .map_err(|e| SessionError::Network(e.to_string()))?;
            let response = protocol::open(&keys, Kind::SyncResponse, &reply)
                .map_err(|e| SessionError::Network(format!("response refused: {e}")))?;
            Ok((response, sent + reply.len()))
        }
    }
}

impl Actor for SyncActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        info!("replication ready"; "network" => self.keys.fingerprint());
        self.schedule(ctx);
    }
}

impl Handler<Published> for SyncActor {
    type Result = ();
    fn handle(&mut self, msg: Published, ctx: &mut Self::Context) {
        self.outbox.extend(msg.0.into_iter().map(|c| RemoteState { state: c.state, origin_seq: c.seq }));
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.run_later(BATCH_DELAY, |act, _| act.flush());
        }
    }
}

impl Handler<FromNetwork> for SyncActor {
    type Result = ();
    fn handle(&mut self, msg: FromNetwork, ctx: &mut Self::Context) {
        match msg {
            FromNetwork::Gossip { from, payload } => self.on_gossip(from, payload, ctx),
            FromNetwork::Request { peer, id, payload } => self.on_request(peer, id, payload, ctx),
            FromNetwork::PeerReady(peer) => {
                let state = self.peers.entry(peer).or_default();
                let new = !state.connected;
                state.connected = true;
                if new {
                    self.reconcile_with(peer, ctx);
                }
            }
            FromNetwork::PeerGone(peer) => {
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.connected = false;
                }
            }
        }
    }
}

/// One peer in the sync status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerSyncReport {
    pub peer_id: String,
    pub connected: bool,
    /// When the last reconciliation this node ran with the peer ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reconciliation: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Row states sent to and received from the peer (gossip and reconciliation).
    pub changes_sent: u64,
    pub changes_received: u64,
    /// Bytes of reconciliation sessions this node ran with the peer.
    pub session_bytes: u64,
    /// The last session this node ran with the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_session: Option<SessionReport>,
    /// The last session this node ran with the peer that moved rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transfer: Option<SessionReport>,
}

/// Writes of one origin node that this node holds (summed over every row's clock).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OriginReport {
    pub origin: String,
    pub writes: i64,
}

/// The replication status (`GET /api/v1/sync/status`, `cosmicsync sync status`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SyncStatus {
    pub node_id: String,
    /// The network's public fingerprint: equal on every member of one network.
    pub network: String,
    pub peers: Vec<PeerSyncReport>,
    pub origins: Vec<OriginReport>,
    /// Row states waiting for the user they belong to.
    pub waiting_for_dependency: i64,
    pub open_conflicts: i64,
    /// Users from other nodes whose username or email another user holds here.
    pub name_clashes: i64,
    pub totals: Totals,
}

/// Asks for the replication status.
#[derive(Message)]
#[rtype(result = "SyncStatus")]
pub struct GetSyncStatus;

impl Handler<GetSyncStatus> for SyncActor {
    type Result = ResponseFuture<SyncStatus>;
    fn handle(&mut self, _: GetSyncStatus, _: &mut Self::Context) -> Self::Result {
        let mut peers: Vec<PeerSyncReport> = self
            .peers
            .iter()
            .map(|(id, p)| PeerSyncReport {
                peer_id: id.to_string(),
                connected: p.connected,
                last_reconciliation: p.last_session,
                last_error: p.last_error.clone(),
                changes_sent: p.sent,
                changes_received: p.received,
                session_bytes: p.bytes,
                last_session: p.last,
                last_transfer: p.last_transfer,
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        let (node_id, network, totals, shards) =
            (self.node_id.clone(), self.keys.fingerprint().to_owned(), self.totals, self.shards.clone());
        Box::pin(async move {
            let counts = shards.sync_counts().await;
            SyncStatus {
                node_id,
                network,
                peers,
                origins: counts
                    .writes_by_origin
                    .into_iter()
                    .map(|(origin, writes)| OriginReport { origin, writes })
                    .collect(),
                waiting_for_dependency: counts.waiting,
                open_conflicts: counts.open_conflicts,
                name_clashes: counts.name_clashes,
                totals,
            }
        })
    }
}
