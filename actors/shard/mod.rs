//! ShardActor: owns one PostgreSQL shard — its pool, its migrations, every SQL statement
//! for its rows (in `db`).
//!
//! Lifecycle: on start it connects (after a back-off when restarting), applies the
//! migrations and checks health every second. When the database goes away it stops
//! itself; its `Supervisor` restarts it, `restarting` logs the restart (actor, reason,
//! count), and it reconnects with exponential back-off. Meanwhile every request gets
//! `StoreError::Unavailable` (HTTP 503) at once; other shards are not affected.
//! Requests run as detached tasks, so a restart never cuts a transaction in half.
//! It must never panic on anything the database or a client sends.
//!
//! No stall: a request waits at most the shard timeout (`--shard-timeout`) for its
//! answer, then fails with `StoreError::Unavailable` and asks for a health check. A
//! server that stops answering without closing the connection (black-holed) cannot hold
//! a connection beyond that either: connections carry TCP keepalives and a TCP user
//! timeout of the same length (the kernel closes a connection whose packets go
//! unacknowledged that long), and the server's `statement_timeout` and
//! `idle_in_transaction_session_timeout` bound a statement and an abandoned
//! transaction. So a detached request that outlived its caller also ends, rolls back and
//! reports its sequence numbers void, in bounded time.

mod db;
mod error;
pub mod migrate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use slog_scope::{error, info, warn};
use utoipa::ToSchema;
use uuid::Uuid;

use db::Db;
pub use db::{
    ConflictCursor, ConflictQuery, DirEntry, DirKind, KEY_CHECK_FAILED, ProjectQuery, RemoteApplied, RemoteState,
    ShardEnv, SyncCounts, UserChange,
};
pub use error::StoreError;

use crate::changes::Report;
use crate::model::{ChangeEvent, Profile, ProfileUpdate, Project, ProjectUpdate, UserRow};
use crate::sealing::KeyCheck;

const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where a shard stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    /// Connecting (first start or after a restart).
    Connecting,
    /// Serving.
    Up,
    /// The database is unreachable; retrying with back-off.
    Down,
}

/// A shard's health as reported to `/readyz`, `/network/status` and `cosmicsync status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ShardHealth {
    pub shard: usize,
    pub state: ShardState,
    /// Seconds in the current state.
    pub since_secs: u64,
    /// How many times the actor has been restarted.
    pub restarts: u32,
    /// Why it last failed, if it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The actor.
pub struct ShardActor {
    index: usize,
    pg: tokio_postgres::Config,
    /// Used only when `pg` asks for TLS (TCP hosts; see `shard_tls`).
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    pool_size: usize,
    /// Bound on one request (see the module docs).
    timeout: Duration,
    env: Arc<ShardEnv>,
    pool: Option<Pool>,
    state: ShardState,
    since: Instant,
    restarts: u32,
    consecutive_failures: u32,
    last_error: Option<String>,
    checking: bool,
}

impl ShardActor {
    /// A shard actor for shard `index` of database `pg`, reached through `tls`, with
    /// `pool_size` connections and requests bounded by `timeout`.
    pub fn new(
        index: usize,
        mut pg: tokio_postgres::Config,
        tls: tokio_postgres_rustls::MakeRustlsConnect,
        pool_size: usize,
        timeout: Duration,
        env: Arc<ShardEnv>,
    ) -> Self {
        pg.connect_timeout(HEALTH_TIMEOUT.min(timeout));
        pg.application_name("cosmicsync");
        // A black-holed server: keepalive probes start after a third of the timeout idle,
        // and the kernel closes the connection once anything sent (data or probe) has
        // gone unacknowledged for the whole timeout. TCP only; a Unix socket ignores them.
        pg.keepalives(true);
        pg.keepalives_idle((timeout / 3).max(Duration::from_secs(1)));
        pg.keepalives_interval(Duration::from_secs(1));
        pg.tcp_user_timeout(timeout);
        // A write gives up on a row lock after a few seconds instead of queueing behind a
        // stuck transaction forever; no statement, and no transaction its client left
        // idle, outlives the shard timeout. Set per connection: no extra round trip.
        let ms = timeout.as_millis();
        let limits =
            format!("-c lock_timeout=5s -c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}");
        let options = pg.get_options().map(|o| format!("{o} {limits}")).unwrap_or(limits);
        pg.options(options);
        Self {
            index,
            pg,
            tls,
            pool_size,
            timeout,
            env,
            pool: None,
            state: ShardState::Connecting,
            since: Instant::now(),
            restarts: 0,
            consecutive_failures: 0,
            last_error: None,
            checking: false,
        }
    }

    fn set_state(&mut self, state: ShardState) {
        if self.state != state {
            self.state = state;
            self.since = Instant::now();
        }
    }

    fn db(&self, ctx: &Context<Self>) -> Result<Db, StoreError> {
        match (&self.pool, self.state) {
            (Some(pool), ShardState::Up) => {
                Ok(Db { pool: pool.clone(), shard: self.index, env: self.env.clone(), actor: ctx.address() })
            }
            _ => Err(StoreError::Unavailable(self.index)),
        }
    }

    fn backoff(&self) -> Duration {
        if self.consecutive_failures == 0 {
            return Duration::ZERO;
        }
        let exp = self.consecutive_failures.min(10) - 1;
        (BACKOFF_MIN * 2u32.pow(exp)).min(BACKOFF_MAX)
    }

    /// Fails the actor: it stops, and its supervisor restarts it.
    fn fail(&mut self, ctx: &mut Context<Self>, reason: String) {
        self.last_error = Some(reason);
        self.consecutive_failures += 1;
        ctx.stop();
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let pg = self.pg.clone();
        let tls = self.tls.clone();
        let size = self.pool_size;
        let index = self.index;
        let timeout = self.timeout;
        let sequencer = self.env.sequencer.clone();
        let keys = self.env.keys.get();
        let attempt = async move {
            let manager = Manager::from_config(pg, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
            let pool = Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                // Waiting for a free connection is load, not failure: a request may wait
                // as long as it may take at all.
                .wait_timeout(Some(timeout))
                .create_timeout(Some(HEALTH_TIMEOUT))
                .recycle_timeout(Some(HEALTH_TIMEOUT))
                .build()
                .map_err(|e| e.to_string())?;
            let mut client = pool.get().await.map_err(|e| crate::shard_tls::describe_connect_error(&e))?;
            // A migration may rewrite a large table: no statement timeout for it (the TCP
            // user timeout still ends it if the server stops answering).
            client.batch_execute("SET statement_timeout = 0").await.map_err(|e| e.to_string())?;
            let applied = migrate::apply(&mut client).await.map_err(|e| format!("migrations failed: {e}"))?;
            client.batch_execute("RESET statement_timeout").await.map_err(|e| e.to_string())?;
            if applied > 0 {
                info!("schema migrated"; "shard" => index, "migrations" => applied);
            }
            db::check_keys(&client, &keys).await?;
            let row = client.query_one("SELECT max(seq) FROM changes", &[]).await.map_err(|e| e.to_string())?;
            let skipped = row.get::<_, Option<i64>>(0).map(|max| sequencer.raise_floor(max));
            let prepared: String =
                client.query_one("SHOW max_prepared_transactions", &[]).await.map_err(|e| e.to_string())?.get(0);
            if prepared == "0" {
                warn!("max_prepared_transactions is 0: changes of usernames or emails that span shards will fail";
                      "shard" => index);
            }
            drop(client);
            Ok::<_, String>((pool, skipped))
        };
        ctx.spawn(attempt.into_actor(self).map(|result, act, ctx| match result {
            Ok((pool, skipped)) => {
                if let Some(range) = skipped.filter(|r| !r.is_empty()) {
                    act.env.hub.do_send(Report::Void(range));
                }
                act.pool = Some(pool);
                act.consecutive_failures = 0;
                act.set_state(ShardState::Up);
                info!("shard up"; "shard" => act.index, "restarts" => act.restarts);
                ctx.run_interval(HEALTH_INTERVAL, |act, ctx| act.check_health(ctx));
            }
            Err(reason) => {
                error!("shard cannot connect"; "shard" => act.index, "error" => &reason);
                act.fail(ctx, reason);
            }
        }));
    }

    fn check_health(&mut self, ctx: &mut Context<Self>) {
        if self.checking {
            return;
        }
        let Ok(db) = self.db(ctx) else { return };
        self.checking = true;
        let probe = async move { tokio::time::timeout(HEALTH_TIMEOUT, db.ping()).await };
        ctx.spawn(probe.into_actor(self).map(|result, act, ctx| {
            act.checking = false;
            let reason = match result {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "health check timed out".to_owned(),
            };
            error!("shard down"; "shard" => act.index, "error" => &reason);
            act.fail(ctx, reason);
        }));
    }
}

impl Actor for ShardActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.pool = None;
        self.checking = false;
        self.set_state(if self.consecutive_failures == 0 { ShardState::Connecting } else { ShardState::Down });
        ctx.run_later(self.backoff(), |act, ctx| act.connect(ctx));
    }
}

impl Supervised for ShardActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts += 1;
        if let Some(pool) = self.pool.take() {
            pool.close();
        }
        warn!("actor restarting";
              "actor" => format!("ShardActor[{}]", self.index),
              "reason" => self.last_error.as_deref().unwrap_or("unknown"),
              "count" => self.restarts,
              "backoff_ms" => self.backoff().as_millis() as u64);
    }
}

/// A query failed in a way that suggests the connection is gone: check now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionLost(pub String);

impl Handler<ConnectionLost> for ShardActor {
    type Result = ();
    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Self::Context) {
        if self.state == ShardState::Up {
            self.last_error = Some(msg.0);
            self.check_health(ctx);
        }
    }
}

/// How is this shard?
#[derive(Message)]
#[rtype(result = "ShardHealth")]
pub struct Health;

impl Handler<Health> for ShardActor {
    type Result = MessageResult<Health>;
    fn handle(&mut self, _: Health, _: &mut Self::Context) -> Self::Result {
        MessageResult(ShardHealth {
            shard: self.index,
            state: self.state,
            since_secs: self.since.elapsed().as_secs(),
            restarts: self.restarts,
            last_error: self.last_error.clone(),
        })
    }
}

/// Runs a request on its own task: once started it completes (and reports its sequence
/// numbers) even if the actor restarts or the HTTP client goes away.
async fn detached<T: Send + 'static>(
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::spawn(fut).await.map_err(|e| StoreError::Task(Arc::new(e)))?
}

/// Runs `fut` detached and waits at most `timeout` for it: past that the caller gets
/// `Unavailable` and the shard checks its health at once. The request itself runs on
/// until its connection gives out (bounded too, see the module docs).
async fn bounded<T: Send + 'static>(
    index: usize,
    timeout: Duration,
    actor: Addr<ShardActor>,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, detached(fut)).await {
        Ok(result) => result,
        Err(_) => {
            warn!("shard request timed out"; "shard" => index, "timeout_ms" => timeout.as_millis() as u64);
            actor.do_send(ConnectionLost(format!("a request got no answer in {} ms", timeout.as_millis())));
            Err(StoreError::Unavailable(index))
        }
    }
}

/// Declares request messages that map one-to-one onto `Db` methods: the fields are the
/// method's arguments in order, the reply is `Result<$ret, StoreError>`.
macro_rules! shard_requests {
    ($( $(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? } -> $ret:ty = $method:ident; )*) => {
        $(
            $(#[$doc])*
            pub struct $name { $(pub $field: $ty),* }

            impl Message for $name {
                type Result = Result<$ret, StoreError>;
            }

            impl Handler<$name> for ShardActor {
                type Result = ResponseFuture<Result<$ret, StoreError>>;

                fn handle(&mut self, msg: $name, ctx: &mut Self::Context) -> Self::Result {
                    let (db, timeout, index, actor) = (self.db(ctx), self.timeout, self.index, ctx.address());
                    Box::pin(async move {
                        let db = db?;
                        let $name { $($field),* } = msg;
                        bounded(index, timeout, actor, async move { db.$method($($field),*).await }).await
                    })
                }
            }
        )*
    };
}

shard_requests! {
    /// Reads a user row (with hash and email: for the node's own use only).
    GetUser { id: Uuid } -> UserRow = get_user;
    /// Finds the user holding a directory key.
    Lookup { kind: DirKind, key: String } -> Option<Uuid> = lookup;
    /// Creates a user and their empty profile (the commit point of a cross-shard create).
    CreateUser { txid: Option<Uuid>, user: UserRow, profile: Profile, local_claims: Vec<DirEntry> } -> UserRow = create_user;
    /// Changes a user (the commit point of a cross-shard change).
    UpdateUser {
        id: Uuid,
        if_match: Option<String>,
        expected: (String, String),
        change: UserChange,
        txid: Option<Uuid>,
        local_claims: Vec<DirEntry>,
        local_releases: Vec<DirEntry>,
    } -> UserRow = update_user;
    /// Phase one of a cross-shard change on a participant.
    PrepareDirectory { gid: String, claims: Vec<DirEntry>, releases: Vec<DirEntry> } -> () = prepare_directory;
    /// Phase two on a participant.
    FinishPrepared { gid: String, commit: bool } -> () = finish_prepared;
    /// Prepared transactions left in doubt (older than the given age in seconds).
    InDoubt { min_age_secs: i64 } -> Vec<String> = in_doubt;
    /// The outcome of a cross-shard transaction this shard coordinated.
    Decide { txid: Uuid } -> bool = decide;
    /// Forgets a decision every participant has applied.
    Forget { txid: Uuid } -> () = forget;
    /// Forgets abort decisions older than an age in seconds.
    PruneAborts { min_age_secs: i64 } -> u64 = prune_aborts;
    /// Reads a profile.
    GetProfile { id: Uuid } -> Profile = get_profile;
    /// Updates a profile (owner only).
    UpdateProfile { id: Uuid, caller: Uuid, if_match: Option<String>, update: ProfileUpdate } -> Profile = update_profile;
    /// Creates a project.
    CreateProject { project: Project } -> Project = create_project;
    /// Reads a live project.
    GetProject { id: Uuid } -> Project = get_project;
    /// Updates a project (creator only).
    UpdateProject { id: Uuid, caller: Uuid, if_match: Option<String>, update: ProjectUpdate } -> Project = update_project;
    /// Deletes a project (creator only), leaving a tombstone.
    DeleteProject { id: Uuid, caller: Uuid, if_match: Option<String> } -> () = delete_project;
    /// A page of live projects.
    ListProjects { query: ProjectQuery } -> Vec<Project> = list_projects;
    /// Change-log entries in `(after, upto]`.
    ChangesSince { after: i64, upto: i64, limit: i64 } -> Vec<ChangeEvent> = changes_since;
    /// Deletes superseded change-log entries older than a retention (a batch at most).
    PruneChanges { retention_secs: i64, limit: i64 } -> u64 = prune_changes;
    /// Persists a token revocation.
    RevokeToken { jti: Uuid, user_id: Uuid, expires_at: DateTime<Utc> } -> () = revoke_token;
    /// Revocations still in force.
    Revocations {} -> Vec<(Uuid, DateTime<Utc>)> = revocations;
    /// Deletes revocations of expired tokens.
    PruneRevocations {} -> u64 = prune_revocations;
    /// Users whose password changed after a time.
    PasswordChanges { since: DateTime<Utc> } -> Vec<(Uuid, DateTime<Utc>)> = password_changes;
    /// Records check values of keys about to seal data on this shard.
    RegisterKeys { checks: Vec<KeyCheck> } -> () = register_keys;
    /// Rows sealed under each data key.
    KeyUsage {} -> Vec<(i32, i64)> = key_usage;
    /// Re-seals a batch of rows under the current data key.
    ResealBatch { limit: i64 } -> u64 = reseal_batch;
}

// Recommendations (RecommendActor's batch and the recommendations endpoint).
shard_requests! {
    /// Every user of the shard with their skills and interests.
    RecoFeatures {} -> Vec<crate::similarity::RecoInput> = reco_features;
    /// Deletes rows of generations the shard does not serve.
    RecoDiscardStale {} -> u64 = reco_discard_stale;
    /// Writes one batch of a generation's rows (one transaction).
    RecoWrite { generation: i64, rows: Vec<crate::similarity::RecoRow> } -> () = reco_write;
    /// Serves a generation from now on.
    RecoActivate { run: crate::similarity::RunRecord } -> () = reco_activate;
    /// The run the shard serves, if any.
    RecoState {} -> Option<crate::similarity::RunRecord> = reco_state;
    /// A user's served recommendations in one mode.
    RecoForUser { user_id: Uuid, mode: crate::similarity::Mode, limit: i64 }
        -> Option<(crate::similarity::RunRecord, Vec<crate::similarity::RecoRow>)> = reco_for_user;
}

// Replication (SyncActor, through `Shards`).
shard_requests! {
    /// Applies row states from peers in one transaction.
    ApplyRemote { states: Vec<RemoteState> } -> RemoteApplied = apply_remote;
    /// The current states of rows, for a peer that lacks them.
    StatesOf { rows: Vec<(crate::model::Entity, Uuid)> } -> Vec<crate::replication::rules::RowState> = states_of;
    /// Every replicated row's version (entity, id, newest HLC time, clock).
    Versions {} -> Vec<(crate::model::Entity, Uuid, u64, crate::vclock::VectorClock)> = versions;
    /// Claims a directory entry for a user from another node; the holder afterwards.
    ClaimEntry { entry: DirEntry } -> Uuid = claim_entry;
    /// Releases a directory entry its user still holds.
    ReleaseEntry { entry: DirEntry } -> () = release_entry;
    /// Records or clears a name clash.
    RecordClash { entry: DirEntry, holder: Option<Uuid> } -> () = record_clash;
    /// Replication counts for status.
    GetSyncCounts {} -> SyncCounts = sync_counts;
    /// A page of conflicts on one owner's rows.
    ListConflicts { query: ConflictQuery } -> Vec<crate::model::ConflictView> = list_conflicts;
}
