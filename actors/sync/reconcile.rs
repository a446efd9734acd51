//! Reconciliation: two nodes find which row versions each lacks with range-based set
//! reconciliation (negentropy) over (newest HLC time, version id) items, then send each
//! other the current states of those rows. Cost grows with the difference, not the data:
//! equal ranges are settled by one fingerprint.
//!
//! The initiator runs a whole session (`run`); the responder answers round by round from
//! a snapshot of its versions kept for the session (`Served`). An interrupted session is
//! simply run again later: what was already sent no longer differs, so a new session
//! resumes where the last one stopped, at the cost of its first rounds.

use std::collections::HashMap;
use std::time::Instant;

use libp2p::PeerId;
use negentropy::{Id as NegId, Negentropy, NegentropyStorageVector};
use uuid::Uuid;

use super::protocol::{Id, Request, Response};
use crate::actors::shard::RemoteState;
use crate::actors::shards::Shards;
use crate::model::Entity;
use crate::replication::rules::version_digest;
use crate::vclock::VectorClock;

/// The largest negentropy message (bytes): a round trip stays small, a big difference
/// takes more rounds.
pub const FRAME_LIMIT: u64 = 60_000;
/// Rows asked for or pushed per request.
pub const ROWS_PER_REQUEST: usize = 500;

/// Rows named by kind and id.
pub type Rows = Vec<(Entity, Uuid)>;

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the peer is busy")]
    Busy,
    #[error("the peer failed: {0}")]
    Peer(String),
    #[error("the peer answered out of turn")]
    Unexpected,
    #[error("reconciliation: {0}")]
    Negentropy(String),
    #[error("storage: {0}")]
    Store(#[from] crate::actors::shard::StoreError),
    #[error("network: {0}")]
    Network(String),
}

/// This node's row versions at one moment, as negentropy items and a map back to rows.
pub struct Snapshot {
    pub storage: NegentropyStorageVector,
    pub rows: HashMap<[u8; 32], (Entity, Uuid)>,
}

impl Snapshot {
    /// Builds the snapshot from every shard's versions. Hashing and sorting every row's
    /// version is CPU work proportional to the data: it runs on the blocking pool, never
    /// on the thread that serves the node's actors.
    pub async fn take(shards: &Shards) -> Result<Self, SessionError> {
        let versions = shards.versions().await?;
        tokio::task::spawn_blocking(move || Self::from_versions(versions))
            .await
            .map_err(|e| SessionError::Negentropy(format!("snapshot task failed: {e}")))?
    }

    fn from_versions(versions: Vec<(Entity, Uuid, u64, VectorClock)>) -> Result<Self, SessionError> {
        let mut storage = NegentropyStorageVector::with_capacity(versions.len());
        let mut rows = HashMap::with_capacity(versions.len());
        for (entity, id, hlc, clock) in versions {
            let digest = version_digest(entity, &id, &clock);
            storage.insert(hlc, NegId::from_byte_array(digest)).map_err(neg)?;
            rows.insert(digest, (entity, id));
        }
        storage.seal().map_err(neg)?;
        Ok(Self { storage, rows })
    }
}

fn neg(e: negentropy::Error) -> SessionError {
    SessionError::Negentropy(e.to_string())
}

/// What a session moved, and its cost on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionStats {
    pub rounds: usize,
    pub received: usize,
    /// Of the received, the states that changed a row here.
    pub applied: usize,
    pub conflicts: usize,
    pub sent: usize,
    pub bytes: usize,
}

/// Sends one request and returns the response; `bytes` adds the sealed sizes both ways.
pub trait Transport {
    fn call(&self, request: Request) -> impl Future<Output = Result<(Response, usize), SessionError>> + Send;
}

/// Runs a session as initiator: reconcile, pull what we lack, push what the peer lacks.
pub async fn run(transport: &impl Transport, shards: &Shards, session: u64) -> Result<SessionStats, SessionError> {
    let snapshot = Snapshot::take(shards).await?;
    let mut stats = SessionStats::default();
    let mut ne = Negentropy::owned(snapshot.storage, FRAME_LIMIT).map_err(neg)?;
    let mut message = ne.initiate().map_err(neg)?;
    let (mut have, mut need) = (Vec::new(), Vec::new());
    loop {
        stats.rounds += 1;
        let (response, bytes) = transport.call(Request::Reconcile { session, message }).await?;
        stats.bytes += bytes;
        let reply = match response {
            Response::Reconcile { message } => message,
            Response::Busy => return Err(SessionError::Busy),
            Response::Failed { reason } => return Err(SessionError::Peer(reason)),
            _ => return Err(SessionError::Unexpected),
        };
        match ne.reconcile_with_ids(&reply, &mut have, &mut need).map_err(neg)? {
            Some(next) => message = next,
            None => break,
        }
    }
    // Fetch and apply overlap: the next batch is on the wire while this one is applied.
    let mut fetches = need
        .chunks(ROWS_PER_REQUEST)
        .map(|ids| Request::Fetch { session, ids: ids.iter().map(|id| Id(*id.as_bytes())).collect() });
    let mut ready = match fetches.next() {
        Some(first) => Some(transport.call(first).await?),
        None => None,
    };
    while let Some((response, bytes)) = ready.take() {
        stats.bytes += bytes;
        let states = match response {
            Response::States { states } => states,
            Response::Failed { reason } => return Err(SessionError::Peer(reason)),
            _ => return Err(SessionError::Unexpected),
        };
        stats.received += states.len();
        let apply = shards.apply_remote(states);
        let applied = match fetches.next() {
            Some(next) => {
                let (applied, next) = tokio::join!(apply, transport.call(next));
                ready = Some(next?);
                applied?
            }
            None => apply.await?,
        };
        stats.applied += applied.applied;
        stats.conflicts += applied.conflicts_opened;
    }
    for ids in have.chunks(ROWS_PER_REQUEST) {
        let rows = ids.iter().filter_map(|id| snapshot.rows.get(id.as_bytes()).copied()).collect();
        let states: Vec<RemoteState> =
            shards.states_of(rows).await?.into_iter().map(|state| RemoteState { state, origin_seq: 0 }).collect();
        stats.sent += states.len();
        let (response, bytes) = transport.call(Request::Push { states }).await?;
        stats.bytes += bytes;
        match response {
            Response::Applied => {}
            Response::Failed { reason } => return Err(SessionError::Peer(reason)),
            _ => return Err(SessionError::Unexpected),
        }
    }
    let (_, bytes) = transport.call(Request::Done { session }).await.unwrap_or((Response::Applied, 0));
    stats.bytes += bytes;
    Ok(stats)
}

/// A session this node answers: the snapshot taken at its first round.
pub struct Served {
    pub snapshot: Snapshot,
    pub last_used: Instant,
}

impl Served {
    /// Answers one reconciliation round.
    pub fn reconcile(&mut self, message: &[u8]) -> Response {
        self.last_used = Instant::now();
        let answer = Negentropy::borrowed(&self.snapshot.storage, FRAME_LIMIT).and_then(|mut ne| ne.reconcile(message));
        match answer {
            Ok(message) => Response::Reconcile { message },
            Err(e) => Response::Failed { reason: format!("reconciliation: {e}") },
        }
    }

    /// The rows named by version ids (unknown ids are left out).
    pub fn rows(&mut self, ids: &[Id]) -> Rows {
        self.last_used = Instant::now();
        ids.iter().filter_map(|id| self.snapshot.rows.get(&id.0).copied()).collect()
    }
}

/// Sessions served, keyed by (peer, session number).
pub type ServedSessions = HashMap<(PeerId, u64), Served>;

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(n: u8, changed: &[u8]) -> Vec<(Entity, Uuid, u64, VectorClock)> {
        (0..n)
            .map(|i| {
                let mut clock = VectorClock::new().incremented("a");
                if changed.contains(&i) {
                    clock.increment("b");
                }
                (Entity::Project, Uuid::from_bytes([i; 16]), i as u64 * 10, clock)
            })
            .collect()
    }

    /// Runs negentropy between two snapshots in memory: what each side lacks.
    fn diff(a: Snapshot, mut b: Served) -> (Rows, Rows) {
        let a_rows = a.rows.clone();
        let mut ne = Negentropy::owned(a.storage, FRAME_LIMIT).unwrap();
        let mut msg = ne.initiate().unwrap();
        let (mut have, mut need) = (Vec::new(), Vec::new());
        loop {
            let Response::Reconcile { message } = b.reconcile(&msg) else { panic!("no answer") };
            match ne.reconcile_with_ids(&message, &mut have, &mut need).unwrap() {
                Some(next) => msg = next,
                None => break,
            }
        }
        let have = have.iter().map(|id| a_rows[id.as_bytes()]).collect();
        let need = b.rows(&need.iter().map(|id| Id(*id.as_bytes())).collect::<Vec<_>>());
        (have, need)
    }

    #[test]
    fn reconciliation_finds_exactly_the_rows_that_differ() {
        let a = Snapshot::from_versions(versions(200, &[3, 150])).unwrap();
        let b = Snapshot::from_versions(versions(200, &[150, 199])).unwrap();
        let (have, need) = diff(a, Served { snapshot: b, last_used: Instant::now() });
        let ids = |v: Rows| {
            let mut ids: Vec<u8> = v.into_iter().map(|(_, id)| id.as_bytes()[0]).collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(have), vec![3, 199]);
        assert_eq!(ids(need), vec![3, 199]);
    }

    #[test]
    fn equal_sets_have_no_difference() {
        let a = Snapshot::from_versions(versions(50, &[])).unwrap();
        let b = Snapshot::from_versions(versions(50, &[])).unwrap();
        let (have, need) = diff(a, Served { snapshot: b, last_used: Instant::now() });
        assert!(have.is_empty() && need.is_empty());
    }
}
