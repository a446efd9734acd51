//! Row states in SQL: reading a replicated row (its columns, stamps and open conflicts)
//! as a `RowState`, writing one back, and applying states that came from peers.
//!
//! Every write of a replicated row — local or remote — goes through `store` after the
//! pure rules (`crate::replication::rules`) decided the new state, inside the caller's
//! transaction, so the row, its conflicts and its change-log entry commit together.

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::types::Json;
use uuid::Uuid;

use super::{Db, NewChange, profile_from, project_from, user_from};
use crate::actors::shard::StoreError;
use crate::model::{ConflictNote, ConflictValue, ConflictView, Entity, Op, UserRow};
use crate::replication::rows;
use crate::replication::rules::{self, Applied, Conflict, Outcome, Refused, RowState, Sibling, Stamp};
use crate::sealing::email_context;
use crate::vclock::VectorClock;

/// A row state from a peer, with the origin's sequence number of the change when it came
/// straight from its origin (0 when unknown, e.g. by reconciliation).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RemoteState {
    pub state: RowState,
    #[serde(default)]
    pub origin_seq: i64,
}

/// Which conflicts to list.
#[derive(Debug, Clone)]
pub struct ConflictQuery {
    pub owner: Uuid,
    pub entity: Option<Entity>,
    pub row_id: Option<Uuid>,
    pub after: Option<ConflictCursor>,
    pub limit: i64,
}

/// Where a page of conflicts ends: the last item's sort key.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConflictCursor {
    pub detected_at: chrono::DateTime<chrono::Utc>,
    pub row_id: Uuid,
    pub field: String,
    pub loser_node: String,
    pub loser_counter: i64,
}

/// What applying a batch of remote states did.
#[derive(Debug, Clone, Default)]
pub struct RemoteApplied {
    /// States that changed a row (new, newer, or merged).
    pub applied: usize,
    /// States this node held already (or older ones).
    pub stale: usize,
    /// Of the applied, those concurrent with ours (merged field by field).
    pub merged: usize,
    /// States kept until the user they belong to arrives.
    pub waiting: usize,
    /// States refused as malformed (logged; nothing written for them).
    pub refused: usize,
    /// Conflicts found.
    pub conflicts_opened: usize,
    /// Users whose username or email changed here (or are new): their directory entries
    /// must be claimed. With the previous (username, email), if there was one.
    pub users: Vec<(UserRow, Option<(String, String)>)>,
}

/// What one `apply_remote` call has read and decided so far.
#[derive(Default)]
struct Batch {
    /// Rows as stored before the batch (`None`: not here).
    original: HashMap<(Entity, Uuid), Option<RowState>>,
    /// Rows as the batch has left them so far.
    current: HashMap<(Entity, Uuid), Option<RowState>>,
    /// Rows the batch changed, in the order first changed.
    touched: Vec<(Entity, Uuid)>,
    /// Users known to be here (stored, or arrived in this batch).
    users: std::collections::HashSet<Uuid>,
    changes: Vec<NewChange>,
}

/// The columns every replicated table has, as arrays for a multi-row statement.
#[derive(Default)]
struct Columns {
    ids: Vec<Uuid>,
    created: Vec<chrono::DateTime<chrono::Utc>>,
    updated: Vec<chrono::DateTime<chrono::Utc>>,
    clocks: Vec<Json<VectorClock>>,
    stamps: Vec<Json<BTreeMap<String, Stamp>>>,
    hlcs: Vec<i64>,
}

impl Columns {
    fn push(&mut self, s: &RowState, created: chrono::DateTime<chrono::Utc>, updated: chrono::DateTime<chrono::Utc>) {
        self.ids.push(s.id);
        self.created.push(created);
        self.updated.push(updated);
        self.clocks.push(Json(s.clock.clone()));
        self.stamps.push(Json(rows::stamps_of(s)));
        self.hlcs.push(s.last_hlc() as i64);
    }
}

/// At most this many states wait for their user on one shard; beyond it a state is
/// dropped (reconciliation brings it again once its user is here).
const MAX_WAITING: i64 = 100_000;

impl From<Refused> for StoreError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::NotFound(what) => StoreError::NotFound(what),
            Refused::Forbidden(what) => StoreError::Forbidden(what),
            Refused::Exists(what) => StoreError::Conflict(format!("the {what} already exists")),
            Refused::PreconditionFailed => StoreError::PreconditionFailed,
            Refused::Malformed(why) => StoreError::Corrupt(why),
        }
    }
}

/// Names a refused write after the entity it was for (the rules only know "row").
pub fn refused_for(entity: Entity, r: Refused) -> StoreError {
    let what = match entity {
        Entity::User => "user",
        Entity::Profile => "profile",
        Entity::Project => "project",
    };
    match r {
        Refused::NotFound(_) => StoreError::NotFound(what),
        Refused::Forbidden(_) => StoreError::Forbidden(what),
        other => other.into(),
    }
}

/// How `load_many` locks the rows it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lock {
    /// For a write: nobody else changes them until this transaction ends.
    Update,
    /// For a read: nobody changes them while the row and its conflicts are read.
    Share,
}

fn table(entity: Entity) -> &'static str {
    match entity {
        Entity::User => "users",
        Entity::Profile => "profiles",
        Entity::Project => "projects",
    }
}

impl Db {
    /// The HLC time for a write to a row whose newest value has time `seen`: after
    /// everything this node has seen, and after the row itself even if its writer's
    /// clock ran ahead of ours (so a write always supersedes the values it saw).
    pub(super) fn write_time(&self, seen: u64) -> u64 {
        self.env.hlc.new_timestamp().get_time().as_u64().max(seen.saturating_add(1))
    }

    /// Reads a replicated row, locked for this transaction, as a state.
    pub(super) async fn load(
        &self,
        tx: &Transaction<'_>,
        entity: Entity,
        id: Uuid,
    ) -> Result<Option<RowState>, StoreError> {
        Ok(self.load_many(tx, entity, &[id], Lock::Update).await?.remove(&id))
    }

    /// Reads replicated rows of one entity as states, in three statements whatever their
    /// number: the rows (locked as `lock` says, so each row and its conflicts are read
    /// whole) and the losing values of their open conflicts. Rows not here are absent.
    pub(super) async fn load_many(
        &self,
        tx: &Transaction<'_>,
        entity: Entity,
        ids: &[Uuid],
        lock: Lock,
    ) -> Result<HashMap<Uuid, RowState>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let keys = self.env.keys.get();
        let sql = match (entity, lock) {
            (Entity::User, Lock::Update) => {
                concat!("SELECT ", user_columns!(), ", stamps FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            }
            (Entity::User, Lock::Share) => {
                concat!("SELECT ", user_columns!(), ", stamps FROM users WHERE id = ANY($1) ORDER BY id FOR SHARE")
            }
            (Entity::Profile, Lock::Update) => {
                concat!(
                    "SELECT ",
                    profile_columns!(),
                    ", stamps FROM profiles WHERE id = ANY($1) ORDER BY id FOR UPDATE"
                )
            }
            (Entity::Profile, Lock::Share) => {
                concat!(
                    "SELECT ",
                    profile_columns!(),
                    ", stamps FROM profiles WHERE id = ANY($1) ORDER BY id FOR SHARE"
                )
            }
            (Entity::Project, Lock::Update) => concat!(
                "SELECT ",
                project_columns!(),
                ", stamps, deleted_at FROM projects WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            ),
            (Entity::Project, Lock::Share) => concat!(
                "SELECT ",
                project_columns!(),
                ", stamps, deleted_at FROM projects WHERE id = ANY($1) ORDER BY id FOR SHARE"
            ),
        };
        let stmt = tx.prepare_cached(sql).await.map_err(|e| self.fail(e))?;
        let found = tx.query(&stmt, &[&ids]).await.map_err(|e| self.fail(e))?;
        let mut stored = Vec::with_capacity(found.len());
        for row in &found {
            let stamps = |i: usize| row.get::<_, Json<BTreeMap<String, Stamp>>>(i).0;
            stored.push(match entity {
                Entity::User => {
                    let u = user_from(row, &keys)?;
                    let values = rows::user_fields(&u);
                    rows::Stored {
                        entity,
                        id: u.id,
                        owner: u.id,
                        clock: u.vclock,
                        values,
                        stamps: stamps(10),
                        losers: vec![],
                        updated_at: u.updated_at,
                    }
                }
                Entity::Profile => {
                    let p = profile_from(row);
                    let values = rows::profile_fields(&p);
                    rows::Stored {
                        entity,
                        id: p.id,
                        owner: p.user_id,
                        clock: p.vclock,
                        values,
                        stamps: stamps(9),
                        losers: vec![],
                        updated_at: p.updated_at,
                    }
                }
                Entity::Project => {
                    let p = project_from(row);
                    let mut values = rows::project_fields(&p);
                    let deleted: Option<chrono::DateTime<chrono::Utc>> = row.get(9);
                    values.insert(rules::DELETED.into(), Value::Bool(deleted.is_some()));
                    rows::Stored {
                        entity,
                        id: p.id,
                        owner: p.creator_id,
                        clock: p.vclock,
                        values,
                        stamps: stamps(8),
                        losers: vec![],
                        updated_at: p.updated_at,
                    }
                }
            });
        }
        let mut losers = self.open_losers(tx, ids).await?;
        Ok(stored
            .into_iter()
            .map(|mut s| {
                s.losers = losers.remove(&s.id).unwrap_or_default();
                (s.id, rows::state_from_stored(s))
            })
            .collect())
    }

    /// The losing values of the open conflicts of rows, by row.
    async fn open_losers(
        &self,
        tx: &Transaction<'_>,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<(String, Sibling)>>, StoreError> {
        let stmt = tx
            .prepare_cached(
                "SELECT row_id, field, loser_node, loser_counter, loser_hlc, loser_value FROM conflicts
                 WHERE row_id = ANY($1) AND resolved_at IS NULL",
            )
            .await
            .map_err(|e| self.fail(e))?;
        let found = tx.query(&stmt, &[&ids]).await.map_err(|e| self.fail(e))?;
        let mut out: HashMap<Uuid, Vec<(String, Sibling)>> = HashMap::new();
        for r in &found {
            let stamp = Stamp {
                dot: rules::Dot { node: r.get(2), counter: r.get::<_, i64>(3) as u64 },
                hlc: r.get::<_, i64>(4) as u64,
            };
            out.entry(r.get(0)).or_default().push((r.get(1), Sibling { stamp, value: r.get(5) }));
        }
        Ok(out)
    }

    /// Writes states decided by the rules (inserts or updates), with their conflicts: one
    /// statement per entity whatever the number of rows (`unnest` of column arrays), so a
    /// large batch from a peer costs a few statements, not a few per row. Each user's email
    /// is sealed afresh under the current data key. At most one state per row.
    pub(super) async fn store(&self, tx: &Transaction<'_>, applied: &[Applied]) -> Result<(), StoreError> {
        let of = |entity| applied.iter().map(|a| &a.state).filter(move |s| s.entity == entity);
        let users = of(Entity::User).collect::<Vec<_>>();
        let profiles = of(Entity::Profile).collect::<Vec<_>>();
        let projects = of(Entity::Project).collect::<Vec<_>>();
        futures_util::try_join!(
            self.store_users(tx, &users),
            self.store_profiles(tx, &profiles),
            self.store_projects(tx, &projects)
        )?;
        for a in applied {
            self.store_conflicts(tx, a).await?;
        }
        Ok(())
    }

    async fn store_users(&self, tx: &Transaction<'_>, states: &[&RowState]) -> Result<(), StoreError> {
        if states.is_empty() {
            return Ok(());
        }
        let keys = self.env.keys.get();
        let mut c = Columns::default();
        let (mut names, mut email_keys, mut emails, mut hashes, mut profiles, mut changed) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in states {
            let u = rows::user(s)?;
            let email = keys.seal(u.email.as_bytes(), &email_context(&u.id));
            c.push(s, u.created_at, u.updated_at);
            names.push(u.username);
            email_keys.push(email.key_id);
            emails.push(email.bytes);
            hashes.push(u.password_hash);
            profiles.push(u.profile_id);
            changed.push(u.password_changed_at);
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO users (id, username, email_key, email_sealed, password_hash, profile_id, created_at,
                                    updated_at, password_changed_at, vclock, stamps, hlc)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::bytea[], $5::text[], $6::uuid[],
                                      $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::jsonb[],
                                      $11::jsonb[], $12::int8[])
                 ON CONFLICT (id) DO UPDATE SET username = EXCLUDED.username, email_key = EXCLUDED.email_key,
                     email_sealed = EXCLUDED.email_sealed, password_hash = EXCLUDED.password_hash,
                     updated_at = EXCLUDED.updated_at, password_changed_at = EXCLUDED.password_changed_at,
                     vclock = EXCLUDED.vclock, stamps = EXCLUDED.stamps, hlc = EXCLUDED.hlc",
            )
            .await
            .map_err(|e| self.fail(e))?;
        tx.execute(
            &stmt,
            &[
                &c.ids,
                &names,
                &email_keys,
                &emails,
                &hashes,
                &profiles,
                &c.created,
                &c.updated,
                &changed,
                &c.clocks,
                &c.stamps,
                &c.hlcs,
            ],
        )
        .await
        .map_err(|e| self.fail(e))?;
        Ok(())
    }

    async fn store_profiles(&self, tx: &Transaction<'_>, states: &[&RowState]) -> Result<(), StoreError> {
        if states.is_empty() {
            return Ok(());
        }
        let mut c = Columns::default();
        let (mut users, mut names, mut bios, mut skills, mut interests) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in states {
            let p = rows::profile(s)?;
            c.push(s, p.created_at, p.updated_at);
            users.push(p.user_id);
            names.push(p.name);
            bios.push(p.bio);
            skills.push(Json(p.skills));
            interests.push(Json(p.interests));
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO profiles (id, user_id, name, bio, skills, interests, created_at, updated_at, vclock,
                                       stamps, hlc)
                 SELECT id, user_id, name, bio, ARRAY(SELECT jsonb_array_elements_text(skills)),
                        ARRAY(SELECT jsonb_array_elements_text(interests)), created_at, updated_at, vclock, stamps, hlc
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
                             $7::timestamptz[], $8::timestamptz[], $9::jsonb[], $10::jsonb[], $11::int8[])
                      AS t (id, user_id, name, bio, skills, interests, created_at, updated_at, vclock, stamps, hlc)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, bio = EXCLUDED.bio, skills = EXCLUDED.skills,
                     interests = EXCLUDED.interests, updated_at = EXCLUDED.updated_at, vclock = EXCLUDED.vclock,
                     stamps = EXCLUDED.stamps, hlc = EXCLUDED.hlc",
            )
            .await
            .map_err(|e| self.fail(e))?;
        tx.execute(
            &stmt,
            &[
                &c.ids, &users, &names, &bios, &skills, &interests, &c.created, &c.updated, &c.clocks, &c.stamps,
                &c.hlcs,
            ],
        )
        .await
        .map_err(|e| self.fail(e))?;
        Ok(())
    }

    async fn store_projects(&self, tx: &Transaction<'_>, states: &[&RowState]) -> Result<(), StoreError> {
        if states.is_empty() {
            return Ok(());
        }
        let mut c = Columns::default();
        let (mut creators, mut names, mut descriptions, mut tags, mut deleted) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in states {
            let p = rows::project(s)?;
            c.push(s, p.created_at, p.updated_at);
            creators.push(p.creator_id);
            names.push(p.name);
            descriptions.push(p.description);
            tags.push(Json(p.tags));
            deleted
                .push(s.is_deleted().then(|| s.stamp(rules::DELETED).map(|st| rules::hlc_datetime(st.hlc))).flatten());
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO projects (id, creator_id, name, description, tags, created_at, updated_at, vclock, stamps,
                                       hlc, deleted_at)
                 SELECT id, creator_id, name, description, ARRAY(SELECT jsonb_array_elements_text(tags)), created_at,
                        updated_at, vclock, stamps, hlc, deleted_at
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[],
                             $7::timestamptz[], $8::jsonb[], $9::jsonb[], $10::int8[], $11::timestamptz[])
                      AS t (id, creator_id, name, description, tags, created_at, updated_at, vclock, stamps, hlc,
                            deleted_at)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, description = EXCLUDED.description,
                     tags = EXCLUDED.tags, updated_at = EXCLUDED.updated_at, vclock = EXCLUDED.vclock,
                     stamps = EXCLUDED.stamps, hlc = EXCLUDED.hlc, deleted_at = EXCLUDED.deleted_at",
            )
            .await
            .map_err(|e| self.fail(e))?;
        tx.execute(
            &stmt,
            &[
                &c.ids,
                &creators,
                &names,
                &descriptions,
                &tags,
                &c.created,
                &c.updated,
                &c.clocks,
                &c.stamps,
                &c.hlcs,
                &deleted,
            ],
        )
        .await
        .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Records the state's open conflicts (new ones, and the winner of older ones, which
    /// may have changed) and marks superseded ones resolved.
    async fn store_conflicts(&self, tx: &Transaction<'_>, applied: &Applied) -> Result<(), StoreError> {
        let s = &applied.state;
        let open = s.conflicts();
        for c in &open {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO conflicts (entity, row_id, owner_id, field, loser_node, loser_counter, loser_hlc,
                                            loser_value, winner_node, winner_counter, winner_hlc, winner_value)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (row_id, field, loser_node, loser_counter) DO UPDATE
                         SET winner_node = $9, winner_counter = $10, winner_hlc = $11, winner_value = $12,
                             resolved_at = NULL",
                )
                .await
                .map_err(|e| self.fail(e))?;
            tx.execute(
                &stmt,
                &[
                    &s.entity.as_str(),
                    &s.id,
                    &s.owner,
                    &c.field,
                    &c.loser.stamp.dot.node,
                    &(c.loser.stamp.dot.counter as i64),
                    &(c.loser.stamp.hlc as i64),
                    &c.loser.value,
                    &c.winner.stamp.dot.node,
                    &(c.winner.stamp.dot.counter as i64),
                    &(c.winner.stamp.hlc as i64),
                    &c.winner.value,
                ],
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        for c in &applied.resolved {
            tx.execute(
                "UPDATE conflicts SET resolved_at = now()
                 WHERE row_id = $1 AND field = $2 AND loser_node = $3 AND loser_counter = $4 AND resolved_at IS NULL",
                &[&s.id, &c.field, &c.loser.stamp.dot.node, &(c.loser.stamp.dot.counter as i64)],
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        for c in &applied.opened {
            log_conflict(s, c);
        }
        Ok(())
    }

    /// Applies states from peers in one transaction: each merged with the stored row by
    /// the rules, written with its conflicts and a change-log entry under this node's
    /// sequence. States whose user is not here yet wait in `pending_states`; a user that
    /// arrives brings in what waited for it. Malformed states are refused one by one.
    ///
    /// Reads are batched (one statement per entity for the rows, one for their conflicts,
    /// one for the users the batch depends on), merges run in memory, and the writes are
    /// sent together (pipelined on the connection), so a batch costs a few round trips,
    /// not a few per state.
    pub async fn apply_remote(&self, states: Vec<RemoteState>) -> Result<RemoteApplied, StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let mut report = RemoteApplied::default();
        let mut batch = Batch::default();

        let mut queue: std::collections::VecDeque<RemoteState> = states.into();
        while !queue.is_empty() {
            // One round: every state queued now (those a new user brings in come next round).
            let round: Vec<RemoteState> = queue.drain(..).collect();
            self.prefetch(&tx, &round, &mut batch).await?;
            for RemoteState { state, origin_seq } in round {
                let valid = state
                    .validate()
                    .and_then(|()| rows::check_complete(&state).map_err(|e| Refused::Malformed(e.to_string())));
                if let Err(e) = valid {
                    slog_scope::warn!("row state from a peer refused"; "entity" => state.entity.as_str(),
                                      "id" => %state.id, "error" => %e);
                    report.refused += 1;
                    continue;
                }
                let key = (state.entity, state.id);
                let stored = batch.current.get(&key).cloned().flatten();
                if stored.is_none() && state.entity != Entity::User && !batch.users.contains(&state.owner) {
                    self.wait_for_user(&tx, &state).await?;
                    report.waiting += 1;
                    continue;
                }
                let applied = match rules::merge(stored.as_ref(), &state) {
                    Ok(a) => a,
                    Err(e) => {
                        slog_scope::warn!("row state from a peer refused"; "entity" => state.entity.as_str(),
                                          "id" => %state.id, "error" => %e);
                        report.refused += 1;
                        continue;
                    }
                };
                let _ = self.env.hlc.update_with_timestamp(&uhlc::Timestamp::new(
                    uhlc::NTP64(state.last_hlc()),
                    *self.env.hlc.get_id(),
                ));
                if applied.outcome == Outcome::Stale {
                    report.stale += 1;
                    continue;
                }
                if applied.outcome == Outcome::Merged {
                    report.merged += 1;
                }
                report.applied += 1;
                report.conflicts_opened += applied.opened.len();
                if state.entity == Entity::User && stored.is_none() {
                    batch.users.insert(state.id);
                    queue.extend(self.take_waiting(&tx, state.id).await?);
                }
                let op = match (&stored, applied.state.is_deleted()) {
                    (None, false) => Op::Create,
                    (Some(old), true) if !old.is_deleted() => Op::Delete,
                    (None, true) => Op::Delete,
                    _ => Op::Update,
                };
                let origin = applied.state.newest().map(|s| s.dot.node.clone()).unwrap_or_default();
                let mut change = NewChange::of(op, &applied.state)?;
                change.origin = Some((origin, origin_seq));
                change.conflicts = applied.opened.iter().map(note).collect();
                batch.changes.push(change);
                batch.current.insert(key, Some(applied.state));
                if !batch.touched.contains(&key) {
                    batch.touched.push(key);
                }
            }
        }
        // The final state of every row the batch changed, against what was stored. Written
        // in (entity, id) order, as the rows were locked: two batches that touch the same
        // rows (a gossip batch and a session's push, say) take their locks in one order and
        // cannot deadlock.
        batch.touched.sort();
        let mut finals = Vec::with_capacity(batch.touched.len());
        for key in &batch.touched {
            let Some(Some(state)) = batch.current.get(key) else { continue };
            let original = batch.original.get(key).cloned().flatten();
            if key.0 == Entity::User {
                let user = rows::user(state)?;
                let before = original.as_ref().map(rows::user).transpose()?;
                let before = before.map(|b| (b.username, b.email));
                if before.as_ref() != Some(&(user.username.clone(), user.email.clone())) {
                    report.users.push((user, before));
                }
            }
            finals.push(rules::superseding(original.as_ref(), state.clone()));
        }
        self.store(&tx, &finals).await?;
        // Test builds: `FAILPOINTS=apply-remote-commit=1*sleep(60000)` holds the first batch
        // here, rows written and uncommitted, so a test can kill the node mid-batch.
        fail::fail_point!("apply-remote-commit");
        let pending = self.log_changes(&tx, std::mem::take(&mut batch.changes)).await?;
        tx.commit().await.map_err(|e| self.fail(e))?;
        pending.committed();
        Ok(report)
    }

    /// Reads, in a few statements, what a round of states needs: the stored rows it
    /// touches and whether the users it depends on are here.
    async fn prefetch(&self, tx: &Transaction<'_>, round: &[RemoteState], batch: &mut Batch) -> Result<(), StoreError> {
        for entity in [Entity::User, Entity::Profile, Entity::Project] {
            let ids: Vec<Uuid> = round
                .iter()
                .filter(|r| r.state.entity == entity && !batch.current.contains_key(&(entity, r.state.id)))
                .map(|r| r.state.id)
                .collect();
            let mut found = self.load_many(tx, entity, &ids, Lock::Update).await?;
            for id in ids {
                let state = found.remove(&id);
                if entity == Entity::User && state.is_some() {
                    batch.users.insert(id);
                }
                batch.original.insert((entity, id), state.clone());
                batch.current.insert((entity, id), state);
            }
        }
        let owners: Vec<Uuid> = round
            .iter()
            .filter(|r| r.state.entity != Entity::User && !batch.users.contains(&r.state.owner))
            .map(|r| r.state.owner)
            .collect();
        if !owners.is_empty() {
            let found =
                tx.query("SELECT id FROM users WHERE id = ANY($1)", &[&owners]).await.map_err(|e| self.fail(e))?;
            batch.users.extend(found.iter().map(|r| r.get::<_, Uuid>(0)));
        }
        Ok(())
    }

    /// Keeps a state until its user arrives (merged with what already waits for the row).
    async fn wait_for_user(&self, tx: &Transaction<'_>, state: &RowState) -> Result<(), StoreError> {
        let waiting = tx
            .query_opt(
                "SELECT state FROM pending_states WHERE entity = $1 AND row_id = $2 FOR UPDATE",
                &[&state.entity.as_str(), &state.id],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let earlier = waiting.and_then(|r| serde_json::from_value::<RowState>(r.get(0)).ok());
        let merged = match rules::merge(earlier.as_ref(), state) {
            Ok(a) => a.state,
            Err(_) => state.clone(),
        };
        if earlier.is_none() {
            let count: i64 =
                tx.query_one("SELECT count(*) FROM pending_states", &[]).await.map_err(|e| self.fail(e))?.get(0);
            if count >= MAX_WAITING {
                slog_scope::warn!("too many row states wait for their user; dropping one (reconciliation brings it again)";
                                  "entity" => state.entity.as_str(), "id" => %state.id);
                return Ok(());
            }
        }
        let json = serde_json::to_value(&merged)?;
        tx.execute(
            "INSERT INTO pending_states (entity, row_id, owner_id, state) VALUES ($1, $2, $3, $4)
             ON CONFLICT (entity, row_id) DO UPDATE SET state = $4",
            &[&state.entity.as_str(), &state.id, &state.owner, &json],
        )
        .await
        .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Removes and returns the states that waited for this user.
    async fn take_waiting(&self, tx: &Transaction<'_>, user: Uuid) -> Result<Vec<RemoteState>, StoreError> {
        let found = tx
            .query("DELETE FROM pending_states WHERE owner_id = $1 RETURNING state", &[&user])
            .await
            .map_err(|e| self.fail(e))?;
        Ok(found
            .iter()
            .filter_map(|r| serde_json::from_value::<RowState>(r.get(0)).ok())
            .map(|state| RemoteState { state, origin_seq: 0 })
            .collect())
    }

    /// Reads the current states of the given rows (for a peer that lacks them), each row
    /// with its conflicts read whole (shared locks for the read). Rows not here (any more)
    /// are left out.
    pub async fn states_of(&self, rows: Vec<(Entity, Uuid)>) -> Result<Vec<RowState>, StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let mut out = Vec::with_capacity(rows.len());
        for entity in [Entity::User, Entity::Profile, Entity::Project] {
            let ids: Vec<Uuid> = rows.iter().filter(|(e, _)| *e == entity).map(|(_, id)| *id).collect();
            out.extend(self.load_many(&tx, entity, &ids, Lock::Share).await?.into_values());
        }
        tx.commit().await.map_err(|e| self.fail(e))?;
        Ok(out)
    }

    /// A page of the conflicts on `owner`'s rows, oldest first, optionally of one entity
    /// or row, after a cursor (detected_at in microseconds, row id, field, loser node,
    /// loser counter).
    pub async fn list_conflicts(&self, query: ConflictQuery) -> Result<Vec<ConflictView>, StoreError> {
        let client = self.client().await?;
        let after = query.after.clone();
        let found = client
            .query(
                "SELECT entity, row_id, field, loser_node, loser_counter, loser_hlc, loser_value,
                        winner_node, winner_counter, winner_hlc, winner_value, detected_at, resolved_at
                 FROM conflicts
                 WHERE owner_id = $1
                   AND ($2::text IS NULL OR entity = $2)
                   AND ($3::uuid IS NULL OR row_id = $3)
                   AND ($4::timestamptz IS NULL
                        OR (detected_at, row_id, field, loser_node, loser_counter) > ($4, $5, $6, $7, $8))
                 ORDER BY detected_at, row_id, field, loser_node, loser_counter
                 LIMIT $9",
                &[
                    &query.owner,
                    &query.entity.map(Entity::as_str),
                    &query.row_id,
                    &after.as_ref().map(|a| a.detected_at),
                    &after.as_ref().map(|a| a.row_id),
                    &after.as_ref().map(|a| a.field.clone()),
                    &after.as_ref().map(|a| a.loser_node.clone()),
                    &after.as_ref().map(|a| a.loser_counter),
                    &query.limit,
                ],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let value = |r: &tokio_postgres::Row, at: usize| ConflictValue {
            origin: r.get(at),
            counter: r.get::<_, i64>(at + 1) as u64,
            at: rules::hlc_datetime(r.get::<_, i64>(at + 2) as u64),
            value: r.get(at + 3),
        };
        found
            .iter()
            .map(|r| {
                let entity: String = r.get(0);
                let resolved_at: Option<chrono::DateTime<chrono::Utc>> = r.get(12);
                Ok(ConflictView {
                    entity: Entity::parse(&entity)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown entity {entity:?} in conflicts")))?,
                    row_id: r.get(1),
                    field: r.get(2),
                    loser: value(r, 3),
                    winner: value(r, 7),
                    detected_at: r.get(11),
                    resolved: resolved_at.is_some(),
                    resolved_at,
                })
            })
            .collect()
    }

    /// Every replicated row of this shard as (entity, id, newest HLC time, clock): what
    /// reconciliation compares with a peer.
    pub async fn versions(&self) -> Result<Vec<(Entity, Uuid, u64, VectorClock)>, StoreError> {
        let client = self.client().await?;
        let mut out = Vec::new();
        for entity in [Entity::User, Entity::Profile, Entity::Project] {
            let sql = format!("SELECT id, hlc, vclock FROM {}", table(entity));
            let found = client.query(&sql, &[]).await.map_err(|e| self.fail(e))?;
            out.extend(
                found.iter().map(|r| {
                    (entity, r.get::<_, Uuid>(0), r.get::<_, i64>(1) as u64, r.get::<_, Json<VectorClock>>(2).0)
                }),
            );
        }
        Ok(out)
    }
}

/// A conflict as clients see it.
pub fn note(c: &Conflict) -> ConflictNote {
    ConflictNote { field: c.field.clone(), winner: value_of(&c.winner), loser: value_of(&c.loser) }
}

fn value_of(s: &Sibling) -> ConflictValue {
    ConflictValue {
        value: s.value.clone(),
        origin: s.stamp.dot.node.clone(),
        counter: s.stamp.dot.counter,
        at: rules::hlc_datetime(s.stamp.hlc),
    }
}

fn log_conflict(s: &RowState, c: &Conflict) {
    slog_scope::info!("conflict: concurrent edits of one field";
        "entity" => s.entity.as_str(), "id" => %s.id, "field" => &c.field,
        "winner_node" => &c.winner.stamp.dot.node, "loser_node" => &c.loser.stamp.dot.node);
}
