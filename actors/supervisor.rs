//! NodeSupervisor: the root of the actor tree.
//!
//! It is handed the already-started children (boot order lives in `crate::boot`), keeps
//! the facts `cosmicsync status` and `/network/status` report, sweeps prepared
//! transactions left in doubt, and runs the graceful shutdown: HTTP first (draining
//! requests), then the network (peers are disconnected cleanly), then the System. It must never do request work itself.

use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use slog_scope::{debug, info};
use utoipa::ToSchema;

use crate::actors::event_hub::{EventHub, HubStats, HubStatus};
use crate::actors::http::{HttpActor, StopServer};
use crate::actors::peer::{Disconnect, GetNetwork, NetworkReport, PeerActor};
use crate::actors::recommend::{GetRecommendStatus, RecommendActor, RecommendStatus};
use crate::actors::shard::ShardHealth;
use crate::actors::shards::Shards;

/// How often prepared transactions are checked for ones left in doubt, and how old one
/// must be before it counts as in doubt.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(10);
const IN_DOUBT_AFTER_SECS: i64 = 30;

/// What a node says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusReport {
    pub node_id: String,
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub api_url: String,
    /// `embedded` (the node runs its own PostgreSQL) or `external` (shard URLs).
    pub storage: String,
    /// True when every shard is up.
    pub ready: bool,
    pub shards: Vec<ShardHealth>,
    /// WebSocket sessions and the last change sequence number delivered to them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<HubStatus>,
    /// The recommendation batch: settings, a run in progress, the last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommendations: Option<RecommendStatus>,
    /// The peer-to-peer network (absent while it restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkReport>,
}

/// Static facts about the node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node_id: String,
    pub api_url: String,
    pub storage: String,
}

/// The root actor.
pub struct NodeSupervisor {
    facts: NodeFacts,
    started: Instant,
    shards: Shards,
    hub: Addr<EventHub>,
    http: Option<Addr<HttpActor>>,
    recommender: Addr<RecommendActor>,
    peer: Addr<PeerActor>,
    stopping: bool,
    /// How long superseded change-log entries are kept (`None`: for ever).
    change_log_retention: Option<Duration>,
}

impl NodeSupervisor {
    /// A supervisor over already-started children.
    pub fn new(
        facts: NodeFacts,
        shards: Shards,
        hub: Addr<EventHub>,
        recommender: Addr<RecommendActor>,
        peer: Addr<PeerActor>,
        change_log_retention: Option<Duration>,
    ) -> Self {
        Self {
            facts,
            started: Instant::now(),
            shards,
            hub,
            http: None,
            recommender,
            peer,
            stopping: false,
            change_log_retention,
        }
    }
}

impl Actor for NodeSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(RECOVERY_INTERVAL, |act, ctx| {
            let shards = act.shards.clone();
            ctx.spawn(
                async move {
                    shards.recover_in_doubt(IN_DOUBT_AFTER_SECS).await;
                }
                .into_actor(act),
            );
        });
        if let Some(retention) = self.change_log_retention {
            // Pruning every retention period (at most every 10 minutes) keeps the log within
            // about twice the retention.
            ctx.run_interval(retention.min(PRUNE_INTERVAL), move |act, ctx| {
                let shards = act.shards.clone();
                ctx.spawn(
                    async move {
                        let pruned = shards.prune_changes(retention).await;
                        if pruned > 0 {
                            debug!("pruned superseded change-log entries"; "entries" => pruned);
                        }
                    }
                    .into_actor(act),
                );
            });
        }
    }
}

/// The longest wait between two prunings of the change log.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Hands the supervisor the HTTP actor (started last, once the rest is up).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachHttp(pub Addr<HttpActor>);

impl Handler<AttachHttp> for NodeSupervisor {
    type Result = ();
    fn handle(&mut self, msg: AttachHttp, _: &mut Self::Context) {
        self.http = Some(msg.0);
    }
}

/// Asks for the node's status.
#[derive(Message)]
#[rtype(result = "StatusReport")]
pub struct GetStatus;

impl Handler<GetStatus> for NodeSupervisor {
    type Result = ResponseFuture<StatusReport>;
    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> Self::Result {
        let shards = self.shards.clone();
        let facts = self.facts.clone();
        let uptime_secs = self.started.elapsed().as_secs();
        let hub = self.hub.clone();
        let recommender = self.recommender.clone();
        let peer = self.peer.clone();
        Box::pin(async move {
            // Asked together: a busy actor delays only its own part of the answer.
            let (health, events, network, recommendations) = futures_util::join!(
                shards.health(),
                hub.send(HubStats),
                peer.send(GetNetwork),
                recommender.send(GetRecommendStatus)
            );
            let health: Vec<ShardHealth> = health;
            let (events, network, recommendations) =
                (events.ok(), network.ok().and_then(Result::ok), recommendations.ok());
            let ready = health.iter().all(|h| h.state == crate::actors::shard::ShardState::Up);
            StatusReport {
                node_id: facts.node_id,
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                uptime_secs,
                api_url: facts.api_url,
                storage: facts.storage,
                ready,
                shards: health,
                events,
                recommendations,
                network,
            }
        })
    }
}

/// Stops the node gracefully: HTTP drains, then the System stops (boot code then stops
/// the embedded PostgreSQL and removes node.json).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for NodeSupervisor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        if std::mem::replace(&mut self.stopping, true) {
            return;
        }
        info!("node stopping");
        let http = self.http.clone();
        let peer = self.peer.clone();
        ctx.spawn(
            async move {
                if let Some(http) = http {
                    let _ = http.send(StopServer).await;
                }
                // Peers see a clean close rather than a connection that times out.
                let _ = peer.send(Disconnect).await;
                System::current().stop();
            }
            .into_actor(self),
        );
    }
}

/// Whether a stop was asked for (boot stops waiting for readiness when it was).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsStopping;

impl Handler<IsStopping> for NodeSupervisor {
    type Result = bool;
    fn handle(&mut self, _: IsStopping, _: &mut Self::Context) -> bool {
        self.stopping
    }
}
