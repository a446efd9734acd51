//! `Shards` for replication: row states in and out across the shards, and the directory
//! entries of users that arrive from other nodes.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use slog_scope::warn;
use uuid::Uuid;

use super::Shards;
use crate::actors::shard::StoreError;
use crate::actors::shard::{
    ApplyRemote, ClaimEntry, DirEntry, DirKind, GetSyncCounts, RecordClash, ReleaseEntry, RemoteApplied, RemoteState,
    StatesOf, SyncCounts, Versions,
};
use crate::model::{Entity, UserRow};
use crate::replication::rules::RowState;
use crate::validate::username_key;
use crate::vclock::VectorClock;

/// At most this many states go to a shard in one transaction.
const APPLY_BATCH: usize = 500;

impl Shards {
    /// Applies states from peers, each on the shard its row lives on (shards in parallel,
    /// one transaction per batch), then claims the directory entries of users that are
    /// new or renamed here. Stops at the first shard that fails: what it had not applied
    /// comes again with the next reconciliation.
    pub async fn apply_remote(&self, states: Vec<RemoteState>) -> Result<RemoteApplied, StoreError> {
        let mut by_shard: BTreeMap<usize, Vec<RemoteState>> = BTreeMap::new();
        for s in states {
            // A profile or project lives on its owner's shard; so does the state waiting
            // for that owner.
            by_shard.entry(self.shard_of(&s.state.id)).or_default().push(s);
        }
        let runs = by_shard.into_iter().map(|(shard, states)| async move {
            let mut total = RemoteApplied::default();
            let mut states = states;
            while !states.is_empty() {
                let rest = states.split_off(states.len().min(APPLY_BATCH));
                let done = self.ask(shard, ApplyRemote { states }).await?;
                add(&mut total, done);
                states = rest;
            }
            Ok::<_, StoreError>(total)
        });
        let mut total = RemoteApplied::default();
        let mut first_error = None;
        for result in join_all(runs).await {
            match result {
                Ok(r) => add(&mut total, r),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        for (user, before) in std::mem::take(&mut total.users) {
            self.claim_names(&user, before).await;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Moves a replicated user's directory entries to their current username and email.
    /// A name another user already holds here stays theirs: the clash is logged and
    /// recorded on the arriving user's shard (they keep every other way in).
    async fn claim_names(&self, user: &UserRow, before: Option<(String, String)>) {
        let names = [
            (DirKind::Username, username_key(&user.username), before.as_ref().map(|b| username_key(&b.0))),
            (DirKind::Email, self.email_key(&user.email), before.as_ref().map(|b| self.email_key(&b.1))),
        ];
        for (kind, key, old) in names {
            if let Some(old) = old.filter(|o| *o != key) {
                let entry = DirEntry { kind, key: old.clone(), user_id: user.id };
                let dir = self.router.shard_of_directory_key(kind.as_str(), &old);
                if let Err(e) = self.ask(dir, ReleaseEntry { entry }).await {
                    warn!("cannot release a replicated user's old name"; "user" => %user.id, "error" => %e);
                }
            }
            let entry = DirEntry { kind, key: key.clone(), user_id: user.id };
            let dir = self.router.shard_of_directory_key(kind.as_str(), &key);
            let holder = match self.ask(dir, ClaimEntry { entry: entry.clone() }).await {
                Ok(holder) => holder,
                Err(e) => {
                    warn!("cannot claim a replicated user's name"; "user" => %user.id, "error" => %e);
                    continue;
                }
            };
            let clash = (holder != user.id).then_some(holder);
            if let Some(holder) = clash {
                warn!("a user from another node has a name another user holds here; both are kept";
                      "kind" => kind.as_str(), "user" => %user.id, "holder" => %holder);
            }
            if let Err(e) = self.ask_for(&user.id, RecordClash { entry, holder: clash }).await {
                warn!("cannot record a name clash"; "user" => %user.id, "error" => %e);
            }
        }
    }

    /// The current states of rows (those still here), read from their shards.
    pub async fn states_of(&self, rows: Vec<(Entity, Uuid)>) -> Result<Vec<RowState>, StoreError> {
        let mut by_shard: BTreeMap<usize, Vec<(Entity, Uuid)>> = BTreeMap::new();
        for (entity, id) in rows {
            by_shard.entry(self.shard_of(&id)).or_default().push((entity, id));
        }
        let reads = by_shard.into_iter().map(|(shard, rows)| self.ask(shard, StatesOf { rows }));
        let mut out = Vec::new();
        for part in join_all(reads).await {
            out.extend(part?);
        }
        Ok(out)
    }

    /// Every replicated row's version on every shard. Fails if a shard is unavailable: a
    /// reconciliation over part of the rows would offer peers rows they have as missing.
    pub async fn versions(&self) -> Result<Vec<(Entity, Uuid, u64, VectorClock)>, StoreError> {
        let mut out = Vec::new();
        for part in self.each(|_| Versions {}).await {
            out.extend(part?);
        }
        Ok(out)
    }

    /// The replication counts of every shard, added up (unavailable shards left out).
    pub async fn sync_counts(&self) -> SyncCounts {
        let mut total = SyncCounts::default();
        let mut origins: BTreeMap<String, i64> = BTreeMap::new();
        for c in self.each(|_| GetSyncCounts {}).await.into_iter().flatten() {
            total.open_conflicts += c.open_conflicts;
            total.waiting += c.waiting;
            total.name_clashes += c.name_clashes;
            for (origin, n) in c.writes_by_origin {
                *origins.entry(origin).or_default() += n;
            }
        }
        total.writes_by_origin = origins.into_iter().collect();
        total
    }
}

fn add(total: &mut RemoteApplied, r: RemoteApplied) {
    total.applied += r.applied;
    total.stale += r.stale;
    total.merged += r.merged;
    total.waiting += r.waiting;
    total.refused += r.refused;
    total.conflicts_opened += r.conflicts_opened;
    total.users.extend(r.users);
}
