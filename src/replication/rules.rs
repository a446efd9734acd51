//! The write rules: one pure function for local writes and one for remote row states,
//! used by the shard inside its transaction for both, so the rules exist once.
//!
//! A replicated row is a `RowState`: its vector clock (the writes it has seen) and, for
//! every field, the *siblings* — the values no write has superseded yet, each with its
//! `Stamp` (the write's dot `(node, counter)` and its hybrid-logical-clock time).
//!
//! - A local write sets its own dot to one more than the row's counter of this node, so a
//!   dot names exactly one write, and replaces the siblings of every field it writes by
//!   its value: the writer saw them all, so it supersedes them.
//! - Merging two states of a row (`merge`) is a join: the clock is the pointwise maximum;
//!   a sibling survives if the other side holds it too or has not seen its write yet (the
//!   other side's clock does not cover its dot). Siblings from two writes neither of which
//!   saw the other survive together: that is a *conflict* on that field. The visible value
//!   is the sibling with the highest stamp (HLC time, then node id), the same everywhere.
//! - Fields written concurrently but *different* both keep their change (field-level
//!   merge): each field has its own siblings.
//! - `Lww` fields (the password hash, the email, timestamps, the delete marker) keep one
//!   value, the highest stamp, and record no conflict: a losing password hash or email is
//!   never kept anywhere.
//! - A delete writes the `deleted` marker; a row whose marker is set is gone whatever
//!   concurrent updates carry: delete wins (the owner asked for the row to go; an edit made
//!   without knowing must not bring it back, and no later write can undo it).
//!
//! The join is commutative, associative and idempotent, so nodes that have seen the same
//! writes hold the same state in whatever order and how often they saw them (property
//! tests below). Since dots of one node on one row are consecutive, the clock alone names
//! the set of writes a state holds: equal clocks mean equal states (`digest`).
//!
//! Pure: no actor, no SQL, no I/O, no clock reads (the HLC time comes in `WriteCtx`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::model::Entity;
use crate::vclock::{VectorClock, if_match_allows};

/// One write of a row: the node that made it and that node's counter for the row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub node: String,
    pub counter: u64,
}

/// When and by which write a value was set. Orders by HLC time, then node id: the rule
/// that picks the visible value among concurrent ones, the same on every node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub dot: Dot,
    /// Hybrid-logical-clock time (NTP64 format) of the write.
    pub hlc: u64,
}

impl Stamp {
    fn rank(&self) -> (u64, &str, u64) {
        (self.hlc, self.dot.node.as_str(), self.dot.counter)
    }
}

impl PartialOrd for Stamp {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Stamp {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// A value of a field and the write that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sibling {
    pub stamp: Stamp,
    pub value: Value,
}

/// How a field merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Set at creation, never written again (ids, owner, creation time).
    Fixed,
    /// Highest stamp wins; the loser is dropped without a conflict record.
    Lww,
    /// Concurrent values are kept as siblings and reported as a conflict.
    Tracked,
}

/// The name of the delete marker field (`Lww`, value `true`).
pub const DELETED: &str = "deleted";
/// The field every write sets to its wall-clock time (`Lww`).
pub const UPDATED_AT: &str = "updated_at";

/// The fields of each replicated entity and how they merge. Anything else is refused.
pub fn field_kind(entity: Entity, field: &str) -> Option<FieldKind> {
    use FieldKind::*;
    let kind = match (entity, field) {
        (_, "created_at") => Fixed,
        (_, UPDATED_AT) => Lww,
        (Entity::User, "profile_id") => Fixed,
        (Entity::User, "username") => Tracked,
        (Entity::User, "email" | "password_hash" | "password_changed_at") => Lww,
        (Entity::Profile, "user_id") => Fixed,
        (Entity::Profile, "name" | "bio" | "skills" | "interests") => Tracked,
        (Entity::Project, "creator_id") => Fixed,
        (Entity::Project, "name" | "description" | "tags") => Tracked,
        (Entity::Project, DELETED) => Lww,
        _ => return None,
    };
    Some(kind)
}

/// Every field of an entity (what a complete state holds).
pub fn fields_of(entity: Entity) -> &'static [&'static str] {
    match entity {
        Entity::User => {
            &["username", "email", "password_hash", "password_changed_at", "profile_id", "created_at", UPDATED_AT]
        }
        Entity::Profile => &["user_id", "name", "bio", "skills", "interests", "created_at", UPDATED_AT],
        Entity::Project => &["creator_id", "name", "description", "tags", "created_at", UPDATED_AT, DELETED],
    }
}

/// A replicated row: its clock and, per field, the values not superseded yet (highest
/// stamp first: the first is the visible value).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowState {
    pub entity: Entity,
    pub id: Uuid,
    /// The user who owns the row (the user themself for a user row).
    pub owner: Uuid,
    pub clock: VectorClock,
    pub fields: BTreeMap<String, Vec<Sibling>>,
}

impl RowState {
    /// The visible value of a field.
    pub fn value(&self, field: &str) -> Option<&Value> {
        self.fields.get(field).and_then(|s| s.first()).map(|s| &s.value)
    }

    /// The stamp of a field's visible value.
    pub fn stamp(&self, field: &str) -> Option<&Stamp> {
        self.fields.get(field).and_then(|s| s.first()).map(|s| &s.stamp)
    }

    /// True once the row was deleted (delete wins over concurrent updates).
    pub fn is_deleted(&self) -> bool {
        self.value(DELETED).is_some_and(|v| v == &Value::Bool(true))
    }

    /// The highest HLC time of any write the state holds: when the row last changed.
    pub fn last_hlc(&self) -> u64 {
        self.fields.values().flatten().map(|s| s.stamp.hlc).max().unwrap_or(0)
    }

    /// The newest write the state holds.
    pub fn newest(&self) -> Option<&Stamp> {
        self.fields.values().flatten().map(|s| &s.stamp).max()
    }

    /// Every field's concurrent values: one entry per losing sibling.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut out = Vec::new();
        for (field, siblings) in &self.fields {
            if let [winner, losers @ ..] = siblings.as_slice() {
                for loser in losers {
                    out.push(Conflict { field: field.clone(), winner: winner.clone(), loser: loser.clone() });
                }
            }
        }
        out
    }

    /// A 32-byte name of this version, equal on two nodes exactly when their states are:
    /// the clock determines the set of writes held (dots are consecutive per node).
    pub fn digest(&self) -> [u8; 32] {
        version_digest(self.entity, &self.id, &self.clock)
    }

    /// Checks that a state from outside is well-formed: known fields, each with at least
    /// one sibling, every sibling's write covered by the clock, at most one for `Fixed`
    /// and `Lww` fields. A state that fails is refused whole.
    pub fn validate(&self) -> Result<(), Refused> {
        let bad = |why: String| Err(Refused::Malformed(why));
        for (field, siblings) in &self.fields {
            let Some(kind) = field_kind(self.entity, field) else {
                return bad(format!("unknown field {field:?} for a {}", self.entity.as_str()));
            };
            if siblings.is_empty() || (kind != FieldKind::Tracked && siblings.len() > 1) {
                return bad(format!("field {field:?} has {} values", siblings.len()));
            }
            if siblings.len() > MAX_SIBLINGS {
                return bad(format!("field {field:?} has too many concurrent values"));
            }
            for s in siblings {
                if !covers(&self.clock, &s.stamp.dot) || s.stamp.dot.counter == 0 {
                    return bad(format!("field {field:?} holds a write its clock has not seen"));
                }
            }
        }
        if self.fields.is_empty() {
            return bad("no fields".into());
        }
        Ok(())
    }
}

/// At most this many concurrent values per field are accepted from a peer.
pub const MAX_SIBLINGS: usize = 64;

/// The digest of a row version from its identity and clock (see `RowState::digest`).
pub fn version_digest(entity: Entity, id: &Uuid, clock: &VectorClock) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(entity.as_str().as_bytes());
    h.update(id.as_bytes());
    for (node, counter) in clock.entries() {
        h.update(node.as_bytes());
        h.update([0]);
        h.update(counter.to_le_bytes());
    }
    h.finalize().into()
}

/// One losing value of a field, beside the value that wins it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub field: String,
    pub winner: Sibling,
    pub loser: Sibling,
}

fn covers(clock: &VectorClock, dot: &Dot) -> bool {
    clock.get(&dot.node) >= dot.counter
}

/// Why a write was refused (nothing is written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0} already exists")]
    Exists(&'static str),
    #[error("only the owner may change this {0}")]
    Forbidden(&'static str),
    #[error("the resource has changed since it was read (If-Match does not match)")]
    PreconditionFailed,
    #[error("malformed row state: {0}")]
    Malformed(String),
}

/// Who writes, when, under which node id.
#[derive(Debug, Clone)]
pub struct WriteCtx<'a> {
    pub node: &'a str,
    /// The HLC time of this write (after every write this node has seen).
    pub hlc: u64,
    /// The authenticated caller; `None` for a write the node makes on no one's behalf
    /// (registration, where the new user is the owner).
    pub caller: Option<Uuid>,
    pub if_match: Option<&'a str>,
}

/// A local write.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new row with every field (`fields_of` its entity).
    Create { entity: Entity, id: Uuid, owner: Uuid, fields: BTreeMap<String, Value> },
    /// Sets the given fields (a partial update: omitted fields are kept).
    Update { fields: BTreeMap<String, Value> },
    /// Deletes the row (sets the delete marker).
    Delete,
}

/// What a write or merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The row changed (a local write, or a remote state that descends from ours).
    Applied,
    /// The remote state is one we hold already or an older one: nothing changes.
    Stale,
    /// The remote state was concurrent with ours: merged field by field.
    Merged,
}

/// The result of a write or merge: the new state and what happened.
#[derive(Debug, Clone)]
pub struct Applied {
    pub state: RowState,
    pub outcome: Outcome,
    /// Conflicts the new state holds that the stored one did not.
    pub opened: Vec<Conflict>,
    /// Conflicts the stored state held that the new one no longer does (superseded).
    pub resolved: Vec<Conflict>,
}

fn entity_name(entity: Entity) -> &'static str {
    entity.as_str()
}

/// A local write against the stored state (`None`: the row does not exist here).
pub fn apply_local(stored: Option<&RowState>, write: Write, ctx: &WriteCtx<'_>) -> Result<Applied, Refused> {
    let (mut state, changes) = match write {
        Write::Create { entity, id, owner, mut fields } => {
            if stored.is_some() {
                return Err(Refused::Exists(entity_name(entity)));
            }
            if ctx.caller.is_some_and(|c| c != owner) {
                return Err(Refused::Forbidden(entity_name(entity)));
            }
            if entity == Entity::Project {
                fields.entry(DELETED.to_owned()).or_insert(Value::Bool(false));
            }
            (RowState { entity, id, owner, clock: VectorClock::new(), fields: BTreeMap::new() }, fields)
        }
        Write::Update { fields } => (writable(stored, ctx)?, fields),
        Write::Delete => (writable(stored, ctx)?, BTreeMap::from([(DELETED.to_owned(), Value::Bool(true))])),
    };
    for field in changes.keys() {
        if field_kind(state.entity, field).is_none() {
            return Err(Refused::Malformed(format!("unknown field {field:?}")));
        }
    }
    state.clock.increment(ctx.node);
    let stamp = Stamp { dot: Dot { node: ctx.node.to_owned(), counter: state.clock.get(ctx.node) }, hlc: ctx.hlc };
    let mut changes = changes;
    changes.entry(UPDATED_AT.to_owned()).or_insert_with(|| Value::String(hlc_rfc3339(ctx.hlc)));
    for (field, value) in changes {
        state.fields.insert(field, vec![Sibling { stamp: stamp.clone(), value }]);
    }
    let before = stored.map(RowState::conflicts).unwrap_or_default();
    let resolved = before.into_iter().filter(|c| !holds(&state, c)).collect();
    Ok(Applied { state, outcome: Outcome::Applied, opened: Vec::new(), resolved })
}

/// The stored state a caller may write: it exists, is not deleted, is theirs, and
/// matches `If-Match`.
fn writable(stored: Option<&RowState>, ctx: &WriteCtx<'_>) -> Result<RowState, Refused> {
    let state = stored.filter(|s| !s.is_deleted()).ok_or(Refused::NotFound("row"))?;
    let what = entity_name(state.entity);
    let state = state.clone();
    if ctx.caller.is_some_and(|c| c != state.owner) {
        return Err(Refused::Forbidden(what));
    }
    if let Some(header) = ctx.if_match
        && !if_match_allows(header, &state.clock.etag())
    {
        return Err(Refused::PreconditionFailed);
    }
    Ok(state)
}

/// True when `state` still holds the conflict's losing value.
fn holds(state: &RowState, c: &Conflict) -> bool {
    state.fields.get(&c.field).is_some_and(|s| s.iter().skip(1).any(|x| x.stamp == c.loser.stamp))
}

/// Merges a state received from a peer into the stored one (`None`: new row here).
pub fn merge(stored: Option<&RowState>, incoming: &RowState) -> Result<Applied, Refused> {
    incoming.validate()?;
    let Some(stored) = stored else {
        let opened = incoming.conflicts();
        return Ok(Applied {
            state: normalised(incoming.clone()),
            outcome: Outcome::Applied,
            opened,
            resolved: vec![],
        });
    };
    if (stored.entity, stored.id, stored.owner) != (incoming.entity, incoming.id, incoming.owner) {
        return Err(Refused::Malformed("row identity differs from the stored row".into()));
    }
    use crate::vclock::Causality::*;
    let outcome = match incoming.clock.compare(&stored.clock) {
        Equal | Before => {
            return Ok(Applied { state: stored.clone(), outcome: Outcome::Stale, opened: vec![], resolved: vec![] });
        }
        After => Outcome::Applied,
        Concurrent => Outcome::Merged,
    };
    Ok(Applied { outcome, ..superseding(Some(stored), join(stored, incoming)) })
}

/// What writing `state` over `stored` changes in conflicts: the result of a series of
/// merges, seen as one step from the stored state (for writing a batch's final state).
pub fn superseding(stored: Option<&RowState>, state: RowState) -> Applied {
    let was = stored.map(RowState::conflicts).unwrap_or_default();
    let now = state.conflicts();
    let opened = now.iter().filter(|c| !was.iter().any(|w| same_loser(w, c))).cloned().collect();
    let resolved = was.into_iter().filter(|w| !now.iter().any(|c| same_loser(w, c))).collect();
    Applied { state, outcome: Outcome::Applied, opened, resolved }
}

fn same_loser(a: &Conflict, b: &Conflict) -> bool {
    a.field == b.field && a.loser.stamp == b.loser.stamp
}

/// The join of two states of one row.
fn join(a: &RowState, b: &RowState) -> RowState {
    let mut clock = a.clock.clone();
    clock.merge(&b.clock);
    let mut fields = BTreeMap::new();
    let names: std::collections::BTreeSet<&String> = a.fields.keys().chain(b.fields.keys()).collect();
    for name in names {
        let (sa, sb) = (a.fields.get(name), b.fields.get(name));
        let kind = field_kind(a.entity, name).unwrap_or(FieldKind::Tracked);
        let merged = match (sa, sb) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if kind == FieldKind::Tracked => {
                let mut keep: Vec<Sibling> = x
                    .iter()
                    .filter(|s| y.iter().any(|t| t.stamp == s.stamp) || !covers(&b.clock, &s.stamp.dot))
                    .cloned()
                    .collect();
                for s in y {
                    if !keep.iter().any(|k| k.stamp == s.stamp) && !covers(&a.clock, &s.stamp.dot) {
                        keep.push(s.clone());
                    }
                }
                keep
            }
            (Some(x), Some(y)) => {
                let best = x.iter().chain(y.iter()).max_by(|p, q| p.stamp.cmp(&q.stamp));
                best.into_iter().cloned().collect()
            }
            (None, None) => continue,
        };
        fields.insert(name.clone(), merged);
    }
    normalised(RowState { entity: a.entity, id: a.id, owner: a.owner, clock, fields })
}

/// Siblings sorted highest stamp first, so the first is the visible value everywhere.
fn normalised(mut state: RowState) -> RowState {
    for siblings in state.fields.values_mut() {
        siblings.sort_by(|p, q| q.stamp.cmp(&p.stamp));
        siblings.dedup_by(|p, q| p.stamp == q.stamp);
    }
    state
}

/// An HLC time (NTP64) as RFC 3339 with microseconds (what PostgreSQL stores).
pub fn hlc_rfc3339(hlc: u64) -> String {
    hlc_datetime(hlc).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// An HLC time (NTP64: seconds since 1970 in the high 32 bits, fraction in the low 32)
/// as a UTC time, truncated to microseconds.
pub fn hlc_datetime(hlc: u64) -> chrono::DateTime<chrono::Utc> {
    let secs = (hlc >> 32) as i64;
    let nanos = (((hlc & 0xFFFF_FFFF) as u128 * 1_000_000_000) >> 32) as u32;
    let micros = nanos / 1000 * 1000;
    chrono::DateTime::from_timestamp(secs, micros).unwrap_or_default()
}

#[cfg(test)]
mod tests;
