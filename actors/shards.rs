//! `Shards`: the one handle the rest of the node uses to reach the ShardActors.
//!
//! It routes a request to the shard its id lives on, fans reads out across shards where
//! a query spans them, and orchestrates the writes that touch more than one shard (the
//! username/email directory) with two-phase commit: directory entries on other shards
//! are prepared first, the user's own shard commits — that commit, with its
//! `tx_decisions` row, is the decision — and the prepared ones are then finished.
//! `recover_in_doubt` finishes any that a crash left prepared. It never runs SQL itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::join_all;
use slog_scope::{info, warn};
use uuid::Uuid;

use crate::actors::shard::StoreError;
use crate::actors::shard::{
    ChangesSince, CreateUser, Decide, DirEntry, DirKind, FinishPrepared, Forget, GetUser, Health, InDoubt,
    ListProjects, Lookup, PrepareDirectory, ProjectQuery, PruneAborts, ShardActor, ShardHealth, UpdateUser, UserChange,
};
use crate::model::{ChangeEvent, Profile, Project, UserRow};
use crate::placement::Router;
use crate::sealing::SharedKeyring;
use crate::validate::{email_key, username_key};

mod replicate;

/// How long an abort decision is kept. While the coordinator's transaction could still
/// be running, its row is what stops it committing after recovery aborted the
/// participants; every statement and idle gap of that transaction is bounded by the shard
/// timeout (at most an hour), so a day is far beyond any transaction's life. A
/// participant recovered after that finds no decision and is aborted: the same outcome.
const ABORT_RETENTION_SECS: i64 = 24 * 3600;

/// Directory entries to claim and release on one shard.
#[derive(Default)]
struct DirWork {
    claims: Vec<DirEntry>,
    releases: Vec<DirEntry>,
}

/// The shard actors, addressed by placement.
#[derive(Clone)]
pub struct Shards {
    addrs: Arc<[Addr<ShardActor>]>,
    router: Router,
    keys: Arc<SharedKeyring>,
}

impl Shards {
    /// Wraps the shard actors (index = shard number); `keys` makes the emails' blind index.
    pub fn new(addrs: Vec<Addr<ShardActor>>, keys: Arc<SharedKeyring>) -> Self {
        let router = Router::new(addrs.len() as u32);
        Self { addrs: addrs.into(), router, keys }
    }

    /// The directory key of an email: its blind index, never the email itself.
    fn email_key(&self, email: &str) -> String {
        self.keys.get().blind_index(DirKind::Email.as_str(), &email_key(email))
    }

    /// The number of shards.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Always false: a node has at least one shard.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The shard that holds the row with this id.
    pub fn shard_of(&self, id: &Uuid) -> usize {
        self.router.shard_of(id)
    }

    /// Sends a request to shard `shard`; a shard that is restarting counts as unavailable.
    pub async fn ask<M, T>(&self, shard: usize, msg: M) -> Result<T, StoreError>
    where
        M: Message<Result = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
        ShardActor: Handler<M>,
    {
        self.addrs[shard].send(msg).await.map_err(|_| StoreError::Unavailable(shard))?
    }

    /// Sends a request to the shard that holds `id`.
    pub async fn ask_for<M, T>(&self, id: &Uuid, msg: M) -> Result<T, StoreError>
    where
        M: Message<Result = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
        ShardActor: Handler<M>,
    {
        self.ask(self.shard_of(id), msg).await
    }

    /// Every shard's health, in shard order.
    pub async fn health(&self) -> Vec<ShardHealth> {
        let asks = self.addrs.iter().map(|a| a.send(Health));
        join_all(asks)
            .await
            .into_iter()
            .enumerate()
            .map(|(shard, h)| {
                h.unwrap_or(ShardHealth {
                    shard,
                    state: crate::actors::shard::ShardState::Down,
                    since_secs: 0,
                    restarts: 0,
                    last_error: Some("actor not responding".into()),
                })
            })
            .collect()
    }

    /// The user holding a username (case-insensitive), if any.
    pub async fn user_by_username(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let key = username_key(username);
        let dir = self.router.shard_of_directory_key(DirKind::Username.as_str(), &key);
        let Some(id) = self.ask(dir, Lookup { kind: DirKind::Username, key }).await? else {
            return Ok(None);
        };
        match self.ask_for(&id, GetUser { id }).await {
            Ok(user) => Ok(Some(user)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a user with their profile; the username and email become unique
    /// directory entries in the same atomic step.
    pub async fn create_user(&self, user: UserRow, profile: Profile) -> Result<UserRow, StoreError> {
        let home = self.shard_of(&user.id);
        let mut work = BTreeMap::<usize, DirWork>::new();
        for entry in [
            DirEntry { kind: DirKind::Username, key: username_key(&user.username), user_id: user.id },
            DirEntry { kind: DirKind::Email, key: self.email_key(&user.email), user_id: user.id },
        ] {
            self.directory_work(&mut work, entry, true);
        }
        let local = work.remove(&home).unwrap_or_default();
        let txid = (!work.is_empty()).then(Uuid::now_v7);
        let prepared = self.prepare(txid, home, work).await?;
        let result = self.ask(home, CreateUser { txid, user, profile, local_claims: local.claims }).await;
        self.finish(txid, home, prepared, &result).await;
        result
    }

    /// Changes a user; a new username or email moves its directory entry atomically.
    pub async fn update_user(
        &self,
        id: Uuid,
        if_match: Option<String>,
        change: UserChange,
    ) -> Result<UserRow, StoreError> {
        let home = self.shard_of(&id);
        let current = self.ask(home, GetUser { id }).await?;
        let mut work = BTreeMap::<usize, DirWork>::new();
        let moves = [
            (DirKind::Username, change.username.as_deref().map(username_key), username_key(&current.username)),
            (DirKind::Email, change.email.as_deref().map(|e| self.email_key(e)), self.email_key(&current.email)),
        ];
        for (kind, new_key, old_key) in moves {
            match new_key {
                Some(new_key) if new_key != old_key => {
                    self.directory_work(&mut work, DirEntry { kind, key: new_key, user_id: id }, true);
                    self.directory_work(&mut work, DirEntry { kind, key: old_key, user_id: id }, false);
                }
                _ => {}
            }
        }
        let local = work.remove(&home).unwrap_or_default();
        let txid = (!work.is_empty()).then(Uuid::now_v7);
        let prepared = self.prepare(txid, home, work).await?;
        let result = self
            .ask(
                home,
                UpdateUser {
                    id,
                    if_match,
                    expected: (current.username, current.email),
                    change,
                    txid,
                    local_claims: local.claims,
                    local_releases: local.releases,
                },
            )
            .await;
        self.finish(txid, home, prepared, &result).await;
        result
    }

    fn directory_work(&self, work: &mut BTreeMap<usize, DirWork>, entry: DirEntry, claim: bool) {
        let shard = self.router.shard_of_directory_key(entry.kind.as_str(), &entry.key);
        let w = work.entry(shard).or_default();
        if claim { w.claims.push(entry) } else { w.releases.push(entry) }
    }

    /// Phase one on every participant; on failure rolls back the ones already prepared.
    async fn prepare(
        &self,
        txid: Option<Uuid>,
        home: usize,
        work: BTreeMap<usize, DirWork>,
    ) -> Result<Vec<(usize, String)>, StoreError> {
        let Some(txid) = txid else { return Ok(Vec::new()) };
        let mut prepared = Vec::with_capacity(work.len());
        for (shard, w) in work {
            let gid = format!("cs:{txid}:{home}:{shard}");
            let res =
                self.ask(shard, PrepareDirectory { gid: gid.clone(), claims: w.claims, releases: w.releases }).await;
            if let Err(e) = res {
                for (s, g) in prepared {
                    self.finish_one(s, g, false).await;
                }
                return Err(e);
            }
            prepared.push((shard, gid));
        }
        Ok(prepared)
    }

    /// Phase two. A coordinator error that may hide a commit (unavailable, database
    /// error) is settled by asking the coordinator's shard for the decision.
    async fn finish<T>(
        &self,
        txid: Option<Uuid>,
        home: usize,
        prepared: Vec<(usize, String)>,
        result: &Result<T, StoreError>,
    ) {
        let Some(txid) = txid else { return };
        let commit = match result {
            Ok(_) => true,
            Err(e) if e.may_have_committed() => match self.ask(home, Decide { txid }).await {
                Ok(commit) => commit,
                Err(e) => {
                    warn!("cross-shard transaction left in doubt; recovery will finish it";
                          "txid" => %txid, "error" => %e);
                    return;
                }
            },
            Err(_) => false,
        };
        let mut all_done = true;
        for (shard, gid) in prepared {
            all_done &= self.finish_one(shard, gid, commit).await;
        }
        if commit && all_done {
            let _ = self.ask(home, Forget { txid }).await;
        }
    }

    async fn finish_one(&self, shard: usize, gid: String, commit: bool) -> bool {
        match self.ask(shard, FinishPrepared { gid: gid.clone(), commit }).await {
            Ok(()) => true,
            Err(e) => {
                warn!("prepared transaction left in doubt; recovery will finish it";
                      "gid" => gid, "shard" => shard, "error" => %e);
                false
            }
        }
    }

    /// Finishes prepared transactions older than `min_age_secs` that a crash or an
    /// outage left behind, as their coordinator decided (an undecided one is aborted).
    /// Returns how many were finished. Then prunes `tx_decisions`: a recovered commit is
    /// forgotten once no shard holds a transaction of it prepared, and abort decisions
    /// once older than `ABORT_RETENTION_SECS`.
    pub async fn recover_in_doubt(&self, min_age_secs: i64) -> usize {
        let mut finished = 0;
        let mut committed = Vec::new();
        for shard in 0..self.len() {
            let Ok(gids) = self.ask(shard, InDoubt { min_age_secs }).await else { continue };
            for gid in gids {
                let Some((txid, home)) = parse_gid(&gid).filter(|(_, home)| *home < self.len()) else {
                    warn!("ignoring a prepared transaction with a foreign id"; "gid" => gid, "shard" => shard);
                    continue;
                };
                let Ok(commit) = self.ask(home, Decide { txid }).await else { continue };
                if self.finish_one(shard, gid.clone(), commit).await {
                    info!("recovered a prepared transaction"; "gid" => gid, "committed" => commit);
                    finished += 1;
                    if commit {
                        committed.push((txid, home));
                    }
                }
            }
        }
        self.forget_settled(committed).await;
        for shard in 0..self.len() {
            let _ = self.ask(shard, PruneAborts { min_age_secs: ABORT_RETENTION_SECS }).await;
        }
        finished
    }

    /// Forgets the recovered commits no shard still holds a prepared transaction of. A
    /// commit decision must outlive every participant's prepared transaction (without it
    /// recovery would abort that participant), and recovery cannot know them all: it
    /// forgets only when every shard answers and none lists the transaction.
    async fn forget_settled(&self, mut committed: Vec<(Uuid, usize)>) {
        committed.sort_unstable();
        committed.dedup();
        if committed.is_empty() {
            return;
        }
        let mut prepared = Vec::new();
        for shard in 0..self.len() {
            let Ok(gids) = self.ask(shard, InDoubt { min_age_secs: 0 }).await else { return };
            prepared.extend(gids.iter().filter_map(|g| parse_gid(g)).map(|(txid, _)| txid));
        }
        for (txid, home) in committed {
            if !prepared.contains(&txid) {
                let _ = self.ask(home, Forget { txid }).await;
            }
        }
    }

    /// A page of live projects, newest first, across every shard unless one creator
    /// is asked for. Fails if a shard it needs is unavailable: a page is never silently
    /// missing rows.
    pub async fn list_projects(&self, query: ProjectQuery) -> Result<Vec<Project>, StoreError> {
        if let Some(creator) = query.creator {
            return self.ask_for(&creator, ListProjects { query }).await;
        }
        let limit = query.limit;
        let pages = join_all((0..self.len()).map(|s| self.ask(s, ListProjects { query: query.clone() }))).await;
        let mut all = Vec::new();
        for page in pages {
            all.extend(page?);
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.id));
        all.truncate(limit);
        Ok(all)
    }

    /// Deletes superseded change-log entries older than `retention` on every shard, in
    /// batches; returns how many went. A shard that fails is skipped until next time.
    pub async fn prune_changes(&self, retention: std::time::Duration) -> u64 {
        const BATCH: i64 = 10_000;
        let retention_secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let mut total = 0;
        for shard in 0..self.len() {
            loop {
                match self.ask(shard, crate::actors::shard::PruneChanges { retention_secs, limit: BATCH }).await {
                    Ok(n) => {
                        total += n;
                        if (n as i64) < BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!("change log not pruned"; "shard" => shard, "error" => %e);
                        break;
                    }
                }
            }
        }
        total
    }

    /// Committed changes with `after < seq <= upto` from every shard, in sequence order,
    /// at most `limit`.
    pub async fn changes_since(&self, after: i64, upto: i64, limit: i64) -> Result<Vec<ChangeEvent>, StoreError> {
        let parts = join_all((0..self.len()).map(|s| self.ask(s, ChangesSince { after, upto, limit }))).await;
        let mut all = Vec::new();
        for part in parts {
            all.extend(part?);
        }
        all.sort_by_key(|e| e.seq);
        all.truncate(limit.max(0) as usize);
        Ok(all)
    }
}

// ----- recommendations -----------------------------------------------------------------

impl Shards {
    /// Sends `make(shard)` to every shard at once; the replies in shard order.
    pub async fn each<M, T>(&self, make: impl Fn(usize) -> M) -> Vec<Result<T, StoreError>>
    where
        M: Message<Result = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
        ShardActor: Handler<M>,
    {
        join_all((0..self.len()).map(|s| self.ask(s, make(s)))).await
    }

    /// A user's served recommendations in one mode (at most `limit`), from their shard.
    pub async fn recommendations_for(
        &self,
        user_id: Uuid,
        mode: crate::similarity::Mode,
        limit: usize,
    ) -> Result<Option<(crate::similarity::RunRecord, Vec<crate::similarity::RecoRow>)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.ask_for(&user_id, crate::actors::shard::RecoForUser { user_id, mode, limit }).await
    }
}

/// `cs:<txid>:<coordinator shard>:<participant shard>` → (txid, coordinator).
fn parse_gid(gid: &str) -> Option<(Uuid, usize)> {
    let mut parts = gid.split(':');
    (parts.next()? == "cs").then_some(())?;
    let txid = Uuid::parse_str(parts.next()?).ok()?;
    let home = parts.next()?.parse().ok()?;
    Some((txid, home))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_round_trip() {
        let txid = Uuid::now_v7();
        assert_eq!(parse_gid(&format!("cs:{txid}:3:1")), Some((txid, 3)));
        assert_eq!(parse_gid("cs:not-a-uuid:1:2"), None);
        assert_eq!(parse_gid("other:1"), None);
    }
}
