//! The SQL of one shard: every statement the node runs against PostgreSQL is here.
//!
//! A `Db` is a cheap handle (pool + shard context) that a `ShardActor` hands to each
//! request. Every write is one transaction holding the row change and its change-log
//! entry; the sequence numbers it allocates are reported to the EventHub exactly once
//! (committed or void) by `PendingChanges`. Nothing here may hold a connection across
//! an await on anything but PostgreSQL.

use std::sync::Arc;

use actix::Addr;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Client, Pool, Transaction};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use uuid::Uuid;

use super::{ConnectionLost, ShardActor, StoreError};
use crate::changes::{LocalChange, Published, Report};
use crate::model::{ChangeEvent, Entity, Op, Profile, ProfileUpdate, Project, ProjectUpdate, UserRow};
use crate::replication::rows;
use crate::replication::rules::{self, RowState, Write, WriteCtx};
use crate::sealing::{KeyCheck, Keyring, Sealed, SharedKeyring, email_context};
use crate::sequencer::Sequencer;
use crate::vclock::VectorClock;

/// What every shard shares: who this node is, the sequence, and where events go.
pub struct ShardEnv {
    pub node_id: String,
    pub sequencer: Arc<Sequencer>,
    pub hub: actix::Recipient<Report>,
    /// The data keys that seal sensitive columns.
    pub keys: Arc<SharedKeyring>,
    /// The node's hybrid logical clock: the time of every write.
    pub hlc: Arc<uhlc::HLC>,
    /// Where committed local changes go to be published to the network.
    pub outbox: actix::Recipient<Published>,
}

/// A directory entry kind: what must be unique across the whole node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    Username,
    Email,
}

impl DirKind {
    /// The name stored in the `directory` table.
    pub fn as_str(self) -> &'static str {
        match self {
            DirKind::Username => "username",
            DirKind::Email => "email",
        }
    }

    fn taken(self) -> String {
        match self {
            DirKind::Username => "username is already taken".into(),
            DirKind::Email => "email is already registered".into(),
        }
    }
}

/// One directory entry: the normalised key of a unique name and its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub kind: DirKind,
    pub key: String,
    pub user_id: Uuid,
}

/// A page request over projects (newest first).
#[derive(Debug, Clone)]
pub struct ProjectQuery {
    pub creator: Option<Uuid>,
    /// Only ids older than this one (the cursor).
    pub before: Option<Uuid>,
    pub limit: usize,
}

/// Sequence numbers allocated inside a transaction: reported committed after COMMIT,
/// or void if the transaction ends any other way (including an early return or drop).
struct PendingChanges {
    hub: actix::Recipient<Report>,
    events: Vec<ChangeEvent>,
    /// Local changes to publish once committed (remote ones are not published again).
    local: Vec<LocalChange>,
    outbox: actix::Recipient<Published>,
}

impl PendingChanges {
    fn committed(mut self) {
        for event in self.events.drain(..) {
            self.hub.do_send(Report::Committed(event));
        }
        if !self.local.is_empty() {
            self.outbox.do_send(Published(std::mem::take(&mut self.local)));
        }
    }
}

impl Drop for PendingChanges {
    fn drop(&mut self) {
        for event in self.events.drain(..) {
            self.hub.do_send(Report::Void(event.seq..event.seq + 1));
        }
    }
}

/// A change about to be logged.
struct NewChange {
    entity: Entity,
    op: Op,
    id: Uuid,
    owner_id: Uuid,
    vclock: VectorClock,
    data: serde_json::Value,
    /// For a change from another node: its origin and the origin's sequence number
    /// (0 when unknown). `None`: made here (published after commit).
    origin: Option<(String, i64)>,
    state: RowState,
    /// Conflicts this change brought to light.
    conflicts: Vec<crate::model::ConflictNote>,
}

impl NewChange {
    /// The change-log entry of a row's new state: its public view (never a hash or an
    /// email), or for a deleted project a tombstone naming what went.
    fn of(op: Op, state: &RowState) -> Result<Self, StoreError> {
        let data = match state.entity {
            Entity::User => to_json(&rows::user(state)?.view(None)),
            Entity::Profile => to_json(&rows::profile(state)?),
            Entity::Project if state.is_deleted() => {
                let p = rows::project(state)?;
                serde_json::json!({ "id": p.id, "creator_id": p.creator_id, "deleted_at": p.updated_at })
            }
            Entity::Project => to_json(&rows::project(state)?),
        };
        Ok(Self {
            entity: state.entity,
            op,
            id: state.id,
            owner_id: state.owner,
            vclock: state.clock.clone(),
            data,
            origin: None,
            state: state.clone(),
            conflicts: Vec::new(),
        })
    }
}

// Column lists as macros, so `concat!` builds every statement at compile time (no SQL
// text assembled per request). The row readers below depend on this order.
macro_rules! user_columns {
    () => {
        "id, username, email_key, email_sealed, password_hash, profile_id, created_at, updated_at, \
         password_changed_at, vclock"
    };
}
macro_rules! profile_columns {
    () => {
        "id, user_id, name, bio, skills, interests, created_at, updated_at, vclock"
    };
}
macro_rules! project_columns {
    () => {
        "id, creator_id, name, description, tags, created_at, updated_at, vclock"
    };
}

// After the column macros, which it uses.
mod state;
pub use state::{ConflictCursor, ConflictQuery, RemoteApplied, RemoteState};

/// Reads a user row, opening the sealed email.
fn user_from(row: &Row, keys: &Keyring) -> Result<UserRow, StoreError> {
    let id: Uuid = row.get(0);
    let sealed = Sealed { key_id: row.get(2), bytes: row.get(3) };
    let email = keys.open_string(&sealed, &email_context(&id)).map_err(StoreError::Sealing)?;
    Ok(UserRow {
        id,
        username: row.get(1),
        email,
        password_hash: row.get(4),
        profile_id: row.get(5),
        created_at: row.get(6),
        updated_at: row.get(7),
        password_changed_at: row.get(8),
        vclock: row.get::<_, Json<VectorClock>>(9).0,
    })
}

fn profile_from(row: &Row) -> Profile {
    Profile {
        id: row.get(0),
        user_id: row.get(1),
        name: row.get(2),
        bio: row.get(3),
        skills: row.get(4),
        interests: row.get(5),
        created_at: row.get(6),
        updated_at: row.get(7),
        vclock: row.get::<_, Json<VectorClock>>(8).0,
    }
}

fn project_from(row: &Row) -> Project {
    Project {
        id: row.get(0),
        creator_id: row.get(1),
        name: row.get(2),
        description: row.get(3),
        tags: row.get(4),
        created_at: row.get(5),
        updated_at: row.get(6),
        vclock: row.get::<_, Json<VectorClock>>(7).0,
    }
}

/// Adds a field of a partial update when the request sets it.
fn set<T: serde::Serialize>(
    fields: &mut std::collections::BTreeMap<String, serde_json::Value>,
    name: &str,
    value: Option<T>,
) {
    if let Some(v) = value {
        fields.insert(name.to_owned(), to_json(&v));
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A handle on one shard's database.
#[derive(Clone)]
pub struct Db {
    pub(super) pool: Pool,
    pub(super) shard: usize,
    pub(super) env: Arc<ShardEnv>,
    pub(super) actor: Addr<ShardActor>,
}

impl Db {
    /// Maps a PostgreSQL error; connection failures also tell the actor, which checks
    /// the database and restarts if it is gone.
    fn fail(&self, e: tokio_postgres::Error) -> StoreError {
        match e.code() {
            Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE => {
                StoreError::Conflict("the record is locked by another change; retry".into())
            }
            Some(code)
                if *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::INVALID_CATALOG_NAME
                    || code.code().starts_with("08") =>
            {
                self.actor.do_send(ConnectionLost(e.to_string()));
                StoreError::Unavailable(self.shard)
            }
            Some(_) => StoreError::Database(Arc::new(e)),
            None => {
                slog_scope::warn!("shard query failed; checking the connection"; "shard" => self.shard,
                                  "error" => crate::errors::chain(&e));
                self.actor.do_send(ConnectionLost(e.to_string()));
                StoreError::Unavailable(self.shard)
            }
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        self.pool.get().await.map_err(|e| {
            // Every connection busy for the whole wait is load: the database is fine.
            if !matches!(e, deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) {
                slog_scope::warn!("no shard connection; checking the database"; "shard" => self.shard, "error" => %e);
                self.actor.do_send(ConnectionLost(e.to_string()));
            }
            StoreError::Unavailable(self.shard)
        })
    }

    /// Starts a write transaction (connections carry `lock_timeout`, see `ShardActor::new`).
    async fn begin<'a>(&self, client: &'a mut Client) -> Result<Transaction<'a>, StoreError> {
        client.transaction().await.map_err(|e| self.fail(e))
    }

    /// Logs the changes and commits: the last step of every write. The changes are
    /// reported committed only after COMMIT succeeded (otherwise `pending` voids them).
    async fn log_and_commit(&self, tx: Transaction<'_>, changes: Vec<NewChange>) -> Result<(), StoreError> {
        let pending = self.log_changes(&tx, changes).await?;
        tx.commit().await.map_err(|e| self.fail(e))?;
        pending.committed();
        Ok(())
    }

    /// Allocates sequence numbers and writes the change-log entries, last thing before
    /// COMMIT so the hub waits on them as briefly as possible.
    async fn log_changes(&self, tx: &Transaction<'_>, changes: Vec<NewChange>) -> Result<PendingChanges, StoreError> {
        let mut pending = PendingChanges {
            hub: self.env.hub.clone(),
            events: Vec::with_capacity(changes.len()),
            local: Vec::new(),
            outbox: self.env.outbox.clone(),
        };
        if changes.is_empty() {
            return Ok(pending);
        }
        for c in changes {
            let seq = self.allocate(&pending)?;
            let (origin, origin_seq) = match c.origin {
                Some(remote) => remote,
                None => {
                    pending.local.push(LocalChange { seq, state: c.state });
                    (self.env.node_id.clone(), seq)
                }
            };
            pending.events.push(ChangeEvent {
                seq,
                origin,
                origin_seq,
                entity: c.entity,
                op: c.op,
                id: c.id,
                owner_id: c.owner_id,
                vclock: c.vclock,
                data: c.data,
                committed_at: crate::model::now(),
                conflicts: c.conflicts,
            });
        }
        // One statement for the batch, whatever its size.
        let events = &pending.events;
        let conflicts: Vec<_> =
            events.iter().map(|e| (!e.conflicts.is_empty()).then_some(Json(&e.conflicts))).collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO changes (seq, origin, origin_seq, entity, op, row_id, owner_id, vclock, data, committed_at,
                                      conflicts)
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::uuid[],
                                      $7::uuid[], $8::jsonb[], $9::jsonb[], $10::timestamptz[], $11::jsonb[])",
            )
            .await
            .map_err(|e| self.fail(e))?;
        tx.execute(
            &stmt,
            &[
                &events.iter().map(|e| e.seq).collect::<Vec<_>>(),
                &events.iter().map(|e| e.origin.as_str()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.origin_seq).collect::<Vec<_>>(),
                &events.iter().map(|e| e.entity.as_str()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.op.as_str()).collect::<Vec<_>>(),
                &events.iter().map(|e| e.id).collect::<Vec<_>>(),
                &events.iter().map(|e| e.owner_id).collect::<Vec<_>>(),
                &events.iter().map(|e| Json(&e.vclock)).collect::<Vec<_>>(),
                &events.iter().map(|e| &e.data).collect::<Vec<_>>(),
                &events.iter().map(|e| e.committed_at).collect::<Vec<_>>(),
                &conflicts,
            ],
        )
        .await
        .map_err(|e| self.fail(e))?;
        Ok(pending)
    }

    /// The next sequence number. One that was handed out but could not be reserved on
    /// disk is reported void at once, so the hub never waits for it.
    fn allocate(&self, pending: &PendingChanges) -> Result<i64, StoreError> {
        self.env.sequencer.allocate().map_err(|(seq, e)| {
            pending.hub.do_send(Report::Void(seq..seq + 1));
            StoreError::Sequence(Arc::new(e))
        })
    }

    /// Runs the write rules on a row inside `tx`: reads and locks its stored state,
    /// applies `write`, stores the result. Returns the new state and its log entry.
    async fn write(
        &self,
        tx: &Transaction<'_>,
        entity: Entity,
        id: Uuid,
        write: Write,
        caller: Option<Uuid>,
        if_match: Option<&str>,
    ) -> Result<(RowState, NewChange), StoreError> {
        let stored = match &write {
            Write::Create { .. } => None,
            _ => self.load(tx, entity, id).await?,
        };
        let op = match &write {
            Write::Create { .. } => Op::Create,
            Write::Update { .. } => Op::Update,
            Write::Delete => Op::Delete,
        };
        let hlc = self.write_time(stored.as_ref().map_or(0, RowState::last_hlc));
        let ctx = WriteCtx { node: &self.env.node_id, hlc, caller, if_match };
        let applied = rules::apply_local(stored.as_ref(), write, &ctx).map_err(|r| state::refused_for(entity, r))?;
        self.store(tx, std::slice::from_ref(&applied)).await?;
        let change = NewChange::of(op, &applied.state)?;
        Ok((applied.state, change))
    }

    async fn insert_claims(&self, tx: &Transaction<'_>, claims: &[DirEntry]) -> Result<(), StoreError> {
        for claim in claims {
            let inserted = tx
                .execute(
                    "INSERT INTO directory (kind, key, user_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&claim.kind.as_str(), &claim.key, &claim.user_id],
                )
                .await
                .map_err(|e| self.fail(e))?;
            if inserted == 0 {
                return Err(StoreError::Conflict(claim.kind.taken()));
            }
        }
        Ok(())
    }

    async fn delete_claims(&self, tx: &Transaction<'_>, releases: &[DirEntry]) -> Result<(), StoreError> {
        for r in releases {
            tx.execute(
                "DELETE FROM directory WHERE kind = $1 AND key = $2 AND user_id = $3",
                &[&r.kind.as_str(), &r.key, &r.user_id],
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    async fn record_commit(&self, tx: &Transaction<'_>, txid: Option<Uuid>) -> Result<(), StoreError> {
        if let Some(txid) = txid {
            let n = tx
                .execute(
                    "INSERT INTO tx_decisions (txid, outcome) VALUES ($1, 'commit') ON CONFLICT DO NOTHING",
                    &[&txid],
                )
                .await
                .map_err(|e| self.fail(e))?;
            if n == 0 {
                // Recovery already decided to abort this transaction.
                return Err(StoreError::Unavailable(self.shard));
            }
        }
        Ok(())
    }

    /// `SELECT 1`: is the database there?
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(|e| self.fail(e))?;
        Ok(())
    }

    // ----- users -------------------------------------------------------------------

    pub async fn get_user(&self, id: Uuid) -> Result<UserRow, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1"))
            .await
            .map_err(|e| self.fail(e))?;
        let row = client.query_opt(&stmt, &[&id]).await.map_err(|e| self.fail(e))?;
        user_from(&row.ok_or(StoreError::NotFound("user"))?, &self.env.keys.get())
    }

    pub async fn lookup(&self, kind: DirKind, key: String) -> Result<Option<Uuid>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT user_id FROM directory WHERE kind = $1 AND key = $2", &[&kind.as_str(), &key])
            .await
            .map_err(|e| self.fail(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Creates a user and their empty profile; `local_claims` are the directory entries
    /// that live on this shard; `txid` names the cross-shard transaction this commits.
    pub async fn create_user(
        &self,
        txid: Option<Uuid>,
        user: UserRow,
        profile: Profile,
        local_claims: Vec<DirEntry>,
    ) -> Result<UserRow, StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        self.record_commit(&tx, txid).await?;
        self.insert_claims(&tx, &local_claims).await?;
        let create =
            Write::Create { entity: Entity::User, id: user.id, owner: user.id, fields: rows::user_fields(&user) };
        let (state, user_change) = self.write(&tx, Entity::User, user.id, create, None, None).await?;
        let create = Write::Create {
            entity: Entity::Profile,
            id: profile.id,
            owner: user.id,
            fields: rows::profile_fields(&profile),
        };
        let (_, profile_change) = self.write(&tx, Entity::Profile, profile.id, create, None, None).await?;
        self.log_and_commit(tx, vec![user_change, profile_change]).await?;
        rows::user(&state).map_err(StoreError::from)
    }

    /// Changes a user's username, email and/or password hash. `expected` is the
    /// (username, email) the caller computed its directory changes from: if the row no
    /// longer has them, a concurrent change won and this one is refused.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_user(
        &self,
        id: Uuid,
        if_match: Option<String>,
        expected: (String, String),
        change: UserChange,
        txid: Option<Uuid>,
        local_claims: Vec<DirEntry>,
        local_releases: Vec<DirEntry>,
    ) -> Result<UserRow, StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let stored = self.load(&tx, Entity::User, id).await?.ok_or(StoreError::NotFound("user"))?;
        let current = rows::user(&stored).map_err(StoreError::from)?;
        if (current.username.as_str(), current.email.as_str()) != (expected.0.as_str(), expected.1.as_str()) {
            return Err(StoreError::Conflict("the user was changed concurrently; retry".into()));
        }
        self.record_commit(&tx, txid).await?;
        self.delete_claims(&tx, &local_releases).await?;
        self.insert_claims(&tx, &local_claims).await?;
        let now = crate::model::now();
        let mut fields = std::collections::BTreeMap::new();
        if let Some(username) = change.username {
            fields.insert("username".to_owned(), serde_json::json!(username));
        }
        if let Some(email) = change.email {
            fields.insert("email".to_owned(), serde_json::json!(email));
        }
        if let Some(hash) = change.password_hash {
            fields.insert("password_hash".to_owned(), serde_json::json!(hash));
            fields.insert("password_changed_at".to_owned(), serde_json::json!(now));
        }
        fields.insert(rules::UPDATED_AT.to_owned(), serde_json::json!(now));
        let (state, change) =
            self.write(&tx, Entity::User, id, Write::Update { fields }, None, if_match.as_deref()).await?;
        self.log_and_commit(tx, vec![change]).await?;
        rows::user(&state).map_err(StoreError::from)
    }

    // ----- two-phase commit (directory entries on other shards) --------------------

    /// Phase one on a participant: claims and releases directory entries, then
    /// `PREPARE TRANSACTION gid`, which survives crashes until finished.
    pub async fn prepare_directory(
        &self,
        gid: String,
        claims: Vec<DirEntry>,
        releases: Vec<DirEntry>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        self.delete_claims(&tx, &releases).await?;
        self.insert_claims(&tx, &claims).await?;
        tx.batch_execute(&format!("PREPARE TRANSACTION '{}'", gid_literal(&gid)?)).await.map_err(|e| self.fail(e))?;
        // The session is out of the transaction now; COMMIT only ends the wrapper.
        tx.commit().await.map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Phase two on a participant: commit or roll back a prepared transaction.
    /// Finishing one that no longer exists is not an error (it was already finished).
    pub async fn finish_prepared(&self, gid: String, commit: bool) -> Result<(), StoreError> {
        let client = self.client().await?;
        let verb = if commit { "COMMIT PREPARED" } else { "ROLLBACK PREPARED" };
        match client.batch_execute(&format!("{verb} '{}'", gid_literal(&gid)?)).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Prepared transactions of this node on this shard older than `min_age_secs`.
    pub async fn in_doubt(&self, min_age_secs: i64) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT gid FROM pg_prepared_xacts
                 WHERE database = current_database() AND gid LIKE 'cs:%'
                   AND prepared < now() - make_interval(secs => $1)",
                &[&(min_age_secs as f64)],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// On a coordinator: the outcome of `txid`. If none was recorded, records an abort
    /// first, so a coordinator still running can no longer commit.
    pub async fn decide(&self, txid: Uuid) -> Result<bool, StoreError> {
        let client = self.client().await?;
        client
            .execute("INSERT INTO tx_decisions (txid, outcome) VALUES ($1, 'abort') ON CONFLICT DO NOTHING", &[&txid])
            .await
            .map_err(|e| self.fail(e))?;
        let row = client
            .query_one("SELECT outcome FROM tx_decisions WHERE txid = $1", &[&txid])
            .await
            .map_err(|e| self.fail(e))?;
        Ok(row.get::<_, String>(0) == "commit")
    }

    /// Drops a decision once every participant has finished.
    pub async fn forget(&self, txid: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.execute("DELETE FROM tx_decisions WHERE txid = $1", &[&txid]).await.map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Drops abort decisions older than `min_age_secs` (see `Shards::recover_in_doubt`).
    pub async fn prune_aborts(&self, min_age_secs: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM tx_decisions WHERE outcome = 'abort' AND decided_at < now() - make_interval(secs => $1)",
                &[&(min_age_secs as f64)],
            )
            .await
            .map_err(|e| self.fail(e))
    }

    // ----- profiles ----------------------------------------------------------------

    pub async fn get_profile(&self, id: Uuid) -> Result<Profile, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(concat!("SELECT ", profile_columns!(), " FROM profiles WHERE id = $1"))
            .await
            .map_err(|e| self.fail(e))?;
        let row = client.query_opt(&stmt, &[&id]).await.map_err(|e| self.fail(e))?;
        row.as_ref().map(profile_from).ok_or(StoreError::NotFound("profile"))
    }

    /// Applies a validated update; omitted fields are kept.
    pub async fn update_profile(
        &self,
        id: Uuid,
        caller: Uuid,
        if_match: Option<String>,
        update: ProfileUpdate,
    ) -> Result<Profile, StoreError> {
        let ProfileUpdate { name, bio, skills, interests } = update;
        let mut fields = std::collections::BTreeMap::new();
        set(&mut fields, "name", name);
        set(&mut fields, "bio", bio);
        set(&mut fields, "skills", skills);
        set(&mut fields, "interests", interests);
        fields.insert(rules::UPDATED_AT.to_owned(), serde_json::json!(crate::model::now()));
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let write = Write::Update { fields };
        let (state, change) = self.write(&tx, Entity::Profile, id, write, Some(caller), if_match.as_deref()).await?;
        self.log_and_commit(tx, vec![change]).await?;
        rows::profile(&state).map_err(StoreError::from)
    }

    // ----- projects ----------------------------------------------------------------

    pub async fn create_project(&self, project: Project) -> Result<Project, StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        // The creator must be here: a project never outlives the rule that its creator exists.
        let creator = tx
            .query_opt("SELECT 1 FROM users WHERE id = $1 FOR KEY SHARE", &[&project.creator_id])
            .await
            .map_err(|e| self.fail(e))?;
        if creator.is_none() {
            return Err(StoreError::NotFound("user"));
        }
        let create = Write::Create {
            entity: Entity::Project,
            id: project.id,
            owner: project.creator_id,
            fields: rows::project_fields(&project),
        };
        let (state, change) =
            self.write(&tx, Entity::Project, project.id, create, Some(project.creator_id), None).await?;
        self.log_and_commit(tx, vec![change]).await?;
        rows::project(&state).map_err(StoreError::from)
    }

    pub async fn get_project(&self, id: Uuid) -> Result<Project, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(concat!(
                "SELECT ",
                project_columns!(),
                " FROM projects WHERE id = $1 AND deleted_at IS NULL"
            ))
            .await
            .map_err(|e| self.fail(e))?;
        let row = client.query_opt(&stmt, &[&id]).await.map_err(|e| self.fail(e))?;
        row.as_ref().map(project_from).ok_or(StoreError::NotFound("project"))
    }

    /// Applies a validated update; omitted fields are kept. Creator only.
    pub async fn update_project(
        &self,
        id: Uuid,
        caller: Uuid,
        if_match: Option<String>,
        update: ProjectUpdate,
    ) -> Result<Project, StoreError> {
        let ProjectUpdate { name, description, tags } = update;
        let mut fields = std::collections::BTreeMap::new();
        set(&mut fields, "name", name);
        set(&mut fields, "description", description);
        set(&mut fields, "tags", tags);
        fields.insert(rules::UPDATED_AT.to_owned(), serde_json::json!(crate::model::now()));
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let write = Write::Update { fields };
        let (state, change) = self.write(&tx, Entity::Project, id, write, Some(caller), if_match.as_deref()).await?;
        self.log_and_commit(tx, vec![change]).await?;
        rows::project(&state).map_err(StoreError::from)
    }

    /// Deletes a project, leaving a tombstone with a bumped clock. Creator only.
    pub async fn delete_project(&self, id: Uuid, caller: Uuid, if_match: Option<String>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let (_, change) =
            self.write(&tx, Entity::Project, id, Write::Delete, Some(caller), if_match.as_deref()).await?;
        self.log_and_commit(tx, vec![change]).await
    }

    /// Live projects, newest first, optionally of one creator and older than a cursor.
    pub async fn list_projects(&self, query: ProjectQuery) -> Result<Vec<Project>, StoreError> {
        let client = self.client().await?;
        let limit = query.limit as i64;
        let rows = client
            .query(
                concat!(
                    "SELECT ",
                    project_columns!(),
                    " FROM projects
                     WHERE deleted_at IS NULL
                       AND ($1::uuid IS NULL OR creator_id = $1)
                       AND ($2::uuid IS NULL OR id < $2)
                     ORDER BY id DESC LIMIT $3"
                ),
                &[&query.creator, &query.before, &limit],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(project_from).collect())
    }

    // ----- change log --------------------------------------------------------------

    /// Change-log entries with `after < seq <= upto`, in order, at most `limit`.
    pub async fn changes_since(&self, after: i64, upto: i64, limit: i64) -> Result<Vec<ChangeEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, origin, origin_seq, entity, op, row_id, owner_id, vclock, data, committed_at, conflicts
                 FROM changes WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                &[&after, &upto, &limit],
            )
            .await
            .map_err(|e| self.fail(e))?;
        rows.iter()
            .map(|r| {
                let entity: String = r.get(3);
                let op: String = r.get(4);
                Ok(ChangeEvent {
                    seq: r.get(0),
                    origin: r.get(1),
                    origin_seq: r.get(2),
                    entity: Entity::parse(&entity)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown entity {entity:?} in change log")))?,
                    op: Op::parse(&op)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown op {op:?} in change log")))?,
                    id: r.get(5),
                    owner_id: r.get(6),
                    vclock: r.get::<_, Json<VectorClock>>(7).0,
                    data: r.get(8),
                    committed_at: r.get(9),
                    conflicts: r
                        .get::<_, Option<Json<Vec<crate::model::ConflictNote>>>>(10)
                        .map(|j| j.0)
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Deletes up to `limit` change-log entries older than `retention_secs` whose row has a
    /// later entry (superseded: the row's current version is logged after them); returns
    /// how many. Catch-up never reads the log (it reconciles row states), so this only
    /// shortens how far back a WebSocket resume gets every intermediate version.
    pub async fn prune_changes(&self, retention_secs: i64, limit: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM changes WHERE seq IN (
                     SELECT c.seq FROM changes c
                     WHERE c.committed_at < now() - make_interval(secs => $1)
                       AND EXISTS (SELECT 1 FROM changes d WHERE d.row_id = c.row_id AND d.seq > c.seq)
                     LIMIT $2)",
                &[&(retention_secs as f64), &limit],
            )
            .await
            .map_err(|e| self.fail(e))
    }

    // ----- data keys -----------------------------------------------------------------

    /// Records check values of keys about to seal data here (idempotent).
    pub async fn register_keys(&self, checks: Vec<KeyCheck>) -> Result<(), StoreError> {
        let client = self.client().await?;
        register_checks(&client, &checks).await.map_err(|e| self.fail(e))
    }

    /// Rows sealed under each data key: (key id, rows).
    pub async fn key_usage(&self) -> Result<Vec<(i32, i64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT email_key, count(*) FROM users GROUP BY email_key ORDER BY email_key", &[])
            .await
            .map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Re-seals up to `limit` emails sealed under an older key with the current one, in
    /// one transaction; returns how many. Rows a writer holds are skipped (its update
    /// seals under the current key anyway).
    pub async fn reseal_batch(&self, limit: i64) -> Result<u64, StoreError> {
        let keys = self.env.keys.get();
        let current = keys.current();
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let rows = tx
            .query(
                "SELECT id, email_key, email_sealed FROM users WHERE email_key <> $1
                 ORDER BY email_key, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&current, &limit],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let update = tx
            .prepare("UPDATE users SET email_key = $2, email_sealed = $3 WHERE id = $1")
            .await
            .map_err(|e| self.fail(e))?;
        for row in &rows {
            let id: Uuid = row.get(0);
            let context = email_context(&id);
            let old = Sealed { key_id: row.get(1), bytes: row.get(2) };
            let plain = keys.open(&old, &context).map_err(StoreError::Sealing)?;
            let new = keys.seal(&plain, &context);
            tx.execute(&update, &[&id, &new.key_id, &new.bytes]).await.map_err(|e| self.fail(e))?;
        }
        tx.commit().await.map_err(|e| self.fail(e))?;
        Ok(rows.len() as u64)
    }

    /// Users whose password changed after `since`, and when.
    pub async fn password_changes(&self, since: DateTime<Utc>) -> Result<Vec<(Uuid, DateTime<Utc>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, password_changed_at FROM users
                 WHERE password_changed_at > created_at AND password_changed_at > $1",
                &[&since],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    // ----- token revocations -------------------------------------------------------

    pub async fn revoke_token(&self, jti: Uuid, user_id: Uuid, expires_at: DateTime<Utc>) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&jti, &user_id, &expires_at],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Deletes revocations of tokens that have expired (they are refused anyway); returns how many.
    pub async fn prune_revocations(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM revoked_tokens WHERE expires_at < now() - interval '1 minute'", &[])
            .await
            .map_err(|e| self.fail(e))
    }

    /// Revocations still in force; prunes the expired ones.
    pub async fn revocations(&self) -> Result<Vec<(Uuid, DateTime<Utc>)>, StoreError> {
        self.prune_revocations().await?;
        let client = self.client().await?;
        let rows = client.query("SELECT jti, expires_at FROM revoked_tokens", &[]).await.map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

/// A served run from columns 0-4 (generation, computed_at, users, duration_ms, k).
fn run_record(r: &Row) -> RunRecord {
    RunRecord { generation: r.get(0), computed_at: r.get(1), users: r.get(2), duration_ms: r.get(3), k: r.get(4) }
}

/// Checks that `keys` holds every key this shard has data or index entries under, then
/// records the keyring's own check values. Run on every connect, before serving.
pub async fn check_keys(client: &Client, keys: &Keyring) -> Result<(), String> {
    let rows = client
        .query("SELECT key_id, check_value FROM key_checks ORDER BY key_id", &[])
        .await
        .map_err(|e| e.to_string())?;
    for row in rows {
        let stored = KeyCheck { key_id: row.get(0), value: row.get(1) };
        if !keys.verifies(&stored) {
            let what = if stored.key_id == crate::sealing::INDEX_KEY_ID {
                "the blind-index key".to_owned()
            } else {
                format!("data key {}", stored.key_id)
            };
            return Err(format!(
                "{KEY_CHECK_FAILED}: this shard holds data under {what}, which the key file does not hold \
                 (it is missing, or belongs to another node); restore the key file from backup \
                 (see docs/SECURITY.md, \"Losing the key file\")"
            ));
        }
    }
    register_checks(client, &keys.checks()).await.map_err(|e| e.to_string())
}

/// The start of the error `check_keys` fails with: a node cannot serve without its keys.
pub const KEY_CHECK_FAILED: &str = "key check failed";

async fn register_checks(client: &Client, checks: &[KeyCheck]) -> Result<(), tokio_postgres::Error> {
    for check in checks {
        client
            .execute(
                "INSERT INTO key_checks (key_id, check_value) VALUES ($1, $2) ON CONFLICT (key_id) DO NOTHING",
                &[&check.key_id, &check.value],
            )
            .await?;
    }
    Ok(())
}

/// The fields of a user to change (already validated; the password already hashed).
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    pub username: Option<String>,
    pub email: Option<String>,
    pub password_hash: Option<String>,
}

/// A transaction id is built by this node from a UUID and shard numbers; refuse anything
/// else before it is spliced into SQL (PREPARE TRANSACTION takes no parameters).
fn gid_literal(gid: &str) -> Result<&str, StoreError> {
    if gid.len() < 200 && gid.chars().all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '-') {
        Ok(gid)
    } else {
        Err(StoreError::Corrupt("malformed transaction id".into()))
    }
}

// ----- recommendations (RecommendActor's batch; see schema/0003_recommendations.sql) ----

use crate::similarity::{RecoInput, RecoRow, RunRecord};

impl Db {
    /// Every user of this shard with the features the similarity model reads.
    pub async fn reco_features(&self) -> Result<Vec<RecoInput>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT u.id, u.username, p.skills, p.interests FROM users u JOIN profiles p ON p.user_id = u.id",
                &[],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(rows
            .iter()
            .map(|r| RecoInput { user_id: r.get(0), username: r.get(1), skills: r.get(2), interests: r.get(3) })
            .collect())
    }

    /// Deletes rows of generations this shard does not serve (left by a failed run).
    pub async fn reco_discard_stale(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM recommendations
                 WHERE generation <> coalesce((SELECT generation FROM recommendation_state), -1)",
                &[],
            )
            .await
            .map_err(|e| self.fail(e))
    }

    /// Writes one batch of a generation's rows in one statement, so all or none (not yet served).
    pub async fn reco_write(&self, generation: i64, rows: Vec<RecoRow>) -> Result<(), StoreError> {
        let client = self.client().await?;
        let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in rows {
            cols.0.push(r.user_id);
            cols.1.push(r.mode.as_str());
            cols.2.push(r.rank);
            cols.3.push(r.neighbour_id);
            cols.4.push(r.username);
            cols.5.push(r.score);
            cols.6.push(to_json(&r.shared));
        }
        client
            .execute(
                "INSERT INTO recommendations (generation, user_id, mode, rank, neighbour_id, username, score, shared)
                 SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::smallint[], $5::uuid[], $6::text[],
                                          $7::float8[], $8::jsonb[])",
                &[&generation, &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Makes `run` the generation this shard serves, then drops the older rows.
    pub async fn reco_activate(&self, run: RunRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO recommendation_state (id, generation, computed_at, users, duration_ms, k)
                 VALUES (true, $1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET generation = $1, computed_at = $2, users = $3, duration_ms = $4, k = $5",
                &[&run.generation, &run.computed_at, &run.users, &run.duration_ms, &run.k],
            )
            .await
            .map_err(|e| self.fail(e))?;
        // Served from now on is `run`: the flip succeeded whatever the clean-up does, and
        // what it leaves the next run's read step removes.
        if let Err(e) = self.reco_discard_stale().await {
            slog_scope::warn!("older recommendations not deleted yet; the next run removes them";
                "shard" => self.shard, "error" => %e);
        }
        Ok(())
    }

    /// The run this shard serves, if any.
    pub async fn reco_state(&self) -> Result<Option<RunRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT generation, computed_at, users, duration_ms, k FROM recommendation_state", &[])
            .await
            .map_err(|e| self.fail(e))?;
        Ok(row.as_ref().map(run_record))
    }

    /// A user's served recommendations in one mode, best first, at most `limit`, with the
    /// run they come from (one statement, so both come from one snapshot).
    pub async fn reco_for_user(
        &self,
        user_id: Uuid,
        mode: crate::similarity::Mode,
        limit: i64,
    ) -> Result<Option<(RunRecord, Vec<RecoRow>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT s.generation, s.computed_at, s.users, s.duration_ms, s.k,
                        r.rank, r.neighbour_id, r.username, r.score, r.shared
                 FROM recommendation_state s
                 LEFT JOIN LATERAL (
                     SELECT rank, neighbour_id, username, score, shared FROM recommendations
                     WHERE generation = s.generation AND user_id = $1 AND mode = $2
                     ORDER BY rank LIMIT $3
                 ) r ON true
                 ORDER BY r.rank",
                &[&user_id, &mode.as_str(), &limit],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let Some(first) = rows.first() else { return Ok(None) };
        let run = run_record(first);
        let mut found = Vec::with_capacity(rows.len());
        for r in rows.iter().filter(|r| r.get::<_, Option<i16>>(5).is_some()) {
            found.push(RecoRow {
                user_id,
                mode,
                rank: r.get(5),
                neighbour_id: r.get(6),
                username: r.get(7),
                score: r.get(8),
                shared: serde_json::from_value(r.get(9)).map_err(StoreError::from)?,
            });
        }
        Ok(Some((run, found)))
    }
}

// ----- replication: the directory for users from other nodes --------------------------

impl Db {
    /// Claims a directory entry for a user from another node, if it is free; returns the
    /// user holding it afterwards (the claimant, or whoever held it already).
    pub async fn claim_entry(&self, entry: DirEntry) -> Result<Uuid, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH ins AS (
                     INSERT INTO directory (kind, key, user_id) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING RETURNING user_id)
                 SELECT user_id FROM ins UNION ALL
                 SELECT user_id FROM directory WHERE kind = $1 AND key = $2 LIMIT 1",
                &[&entry.kind.as_str(), &entry.key, &entry.user_id],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(row.get(0))
    }

    /// Releases a directory entry if `entry.user_id` still holds it.
    pub async fn release_entry(&self, entry: DirEntry) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM directory WHERE kind = $1 AND key = $2 AND user_id = $3",
                &[&entry.kind.as_str(), &entry.key, &entry.user_id],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Records (or, with `holder` `None`, clears) a user's name clash on this shard.
    pub async fn record_clash(&self, entry: DirEntry, holder: Option<Uuid>) -> Result<(), StoreError> {
        let client = self.client().await?;
        let kind = entry.kind.as_str();
        let done = match holder {
            Some(holder) => {
                client
                    .execute(
                        "INSERT INTO name_clashes (kind, key, user_id, holder_id) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (kind, key, user_id) DO UPDATE SET holder_id = $4",
                        &[&kind, &entry.key, &entry.user_id, &holder],
                    )
                    .await
            }
            None => {
                client
                    .execute("DELETE FROM name_clashes WHERE kind = $1 AND user_id = $2", &[&kind, &entry.user_id])
                    .await
            }
        };
        done.map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Counts for the sync status: open conflicts, states waiting for their user, name
    /// clashes, and per origin node the writes this shard holds.
    pub async fn sync_counts(&self) -> Result<SyncCounts, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM conflicts WHERE resolved_at IS NULL),
                        (SELECT count(*) FROM pending_states),
                        (SELECT count(*) FROM name_clashes)",
                &[],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let origins = client
            .query(
                "SELECT key, sum(value::bigint)::bigint FROM (
                     SELECT vclock FROM users UNION ALL SELECT vclock FROM profiles UNION ALL SELECT vclock FROM projects
                 ) r, jsonb_each_text(r.vclock) GROUP BY key",
                &[],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(SyncCounts {
            open_conflicts: row.get(0),
            waiting: row.get(1),
            name_clashes: row.get(2),
            writes_by_origin: origins.iter().map(|r| (r.get(0), r.get(1))).collect(),
        })
    }
}

/// A shard's replication counts (see `Db::sync_counts`).
#[derive(Debug, Clone, Default)]
pub struct SyncCounts {
    pub open_conflicts: i64,
    pub waiting: i64,
    pub name_clashes: i64,
    pub writes_by_origin: Vec<(String, i64)>,
}
