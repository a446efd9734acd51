//! Typed rows ↔ replicated row states.
//!
//! The shards store a row's visible values in typed columns (what the API reads) and the
//! stamps of those values beside them; `rules` works on `RowState`. These functions turn
//! one into the other. A state from a peer that does not read back as a typed row (a
//! wrong type, a missing field) is refused here, before anything is written.
//!
//! Pure: no SQL, no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

use super::rules::{DELETED, Dot, RowState, Sibling, Stamp, UPDATED_AT, fields_of};
use crate::model::{Entity, Profile, Project, UserRow};
use crate::vclock::VectorClock;

/// Why a state does not read as a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row state for a {entity} does not read as one: {why}")]
pub struct Unreadable {
    entity: &'static str,
    why: String,
}

fn get<T: DeserializeOwned>(state: &RowState, field: &str) -> Result<T, Unreadable> {
    let unreadable = |why: String| Unreadable { entity: state.entity.as_str(), why };
    let value = state.value(field).ok_or_else(|| unreadable(format!("field {field:?} is missing")))?;
    serde_json::from_value(value.clone()).map_err(|e| unreadable(format!("field {field:?}: {e}")))
}

/// Checks that a state holds every field of its entity (a complete row).
pub fn check_complete(state: &RowState) -> Result<(), Unreadable> {
    match fields_of(state.entity).iter().find(|f| !state.fields.contains_key(**f)) {
        Some(f) => Err(Unreadable { entity: state.entity.as_str(), why: format!("field {f:?} is missing") }),
        None => Ok(()),
    }
}

/// The user a state describes.
pub fn user(state: &RowState) -> Result<UserRow, Unreadable> {
    Ok(UserRow {
        id: state.id,
        username: get(state, "username")?,
        email: get(state, "email")?,
        password_hash: get(state, "password_hash")?,
        profile_id: get(state, "profile_id")?,
        created_at: get(state, "created_at")?,
        updated_at: get(state, UPDATED_AT)?,
        password_changed_at: get(state, "password_changed_at")?,
        vclock: state.clock.clone(),
    })
}

/// The profile a state describes.
pub fn profile(state: &RowState) -> Result<Profile, Unreadable> {
    Ok(Profile {
        id: state.id,
        user_id: get(state, "user_id")?,
        name: get(state, "name")?,
        bio: get(state, "bio")?,
        skills: get(state, "skills")?,
        interests: get(state, "interests")?,
        created_at: get(state, "created_at")?,
        updated_at: get(state, UPDATED_AT)?,
        vclock: state.clock.clone(),
    })
}

/// The project a state describes (also when it is a tombstone).
pub fn project(state: &RowState) -> Result<Project, Unreadable> {
    Ok(Project {
        id: state.id,
        creator_id: get(state, "creator_id")?,
        name: get(state, "name")?,
        description: get(state, "description")?,
        tags: get(state, "tags")?,
        created_at: get(state, "created_at")?,
        updated_at: get(state, UPDATED_AT)?,
        vclock: state.clock.clone(),
    })
}

/// The fields of a new user row.
pub fn user_fields(u: &UserRow) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("username".into(), json!(u.username)),
        ("email".into(), json!(u.email)),
        ("password_hash".into(), json!(u.password_hash)),
        ("password_changed_at".into(), json!(u.password_changed_at)),
        ("profile_id".into(), json!(u.profile_id)),
        ("created_at".into(), json!(u.created_at)),
        (UPDATED_AT.into(), json!(u.updated_at)),
    ])
}

/// The fields of a new profile.
pub fn profile_fields(p: &Profile) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("user_id".into(), json!(p.user_id)),
        ("name".into(), json!(p.name)),
        ("bio".into(), json!(p.bio)),
        ("skills".into(), json!(p.skills)),
        ("interests".into(), json!(p.interests)),
        ("created_at".into(), json!(p.created_at)),
        (UPDATED_AT.into(), json!(p.updated_at)),
    ])
}

/// The fields of a new project.
pub fn project_fields(p: &Project) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("creator_id".into(), json!(p.creator_id)),
        ("name".into(), json!(p.name)),
        ("description".into(), json!(p.description)),
        ("tags".into(), json!(p.tags)),
        ("created_at".into(), json!(p.created_at)),
        (UPDATED_AT.into(), json!(p.updated_at)),
        (DELETED.into(), json!(false)),
    ])
}

/// The stamps of a row's visible values as stored beside its columns.
pub fn stamps_of(state: &RowState) -> BTreeMap<String, Stamp> {
    state.fields.iter().filter_map(|(f, s)| s.first().map(|s| (f.clone(), s.stamp.clone()))).collect()
}

/// A replicated row as a shard stores it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub entity: Entity,
    pub id: Uuid,
    pub owner: Uuid,
    pub clock: VectorClock,
    /// The values of its columns (the visible values).
    pub values: BTreeMap<String, Value>,
    /// The stamps of those values (`stamps` column).
    pub stamps: BTreeMap<String, Stamp>,
    /// The losing values of its open conflicts, by field.
    pub losers: Vec<(String, Sibling)>,
    pub updated_at: DateTime<Utc>,
}

/// Rebuilds a state from a stored row. A row written before stamps existed has none: its
/// values get the dot of the clock's one entry and the HLC time of `updated_at`, as every
/// such row was written by one node.
pub fn state_from_stored(stored: Stored) -> RowState {
    let Stored { entity, id, owner, clock, values, stamps, losers, updated_at } = stored;
    let fallback = || {
        let (node, counter) = clock.entries().max_by_key(|(_, c)| *c).map(|(n, c)| (n.to_owned(), c))?;
        Some(Stamp { dot: Dot { node, counter }, hlc: hlc_of(updated_at) })
    };
    let mut fields = BTreeMap::new();
    for (field, value) in values {
        let Some(stamp) = stamps.get(&field).cloned().or_else(fallback) else { continue };
        fields.insert(field, vec![Sibling { stamp, value }]);
    }
    for (field, loser) in losers {
        if let Some(siblings) = fields.get_mut(&field) {
            siblings.push(loser);
        }
    }
    for siblings in fields.values_mut() {
        siblings.sort_by(|p, q| q.stamp.cmp(&p.stamp));
    }
    RowState { entity, id, owner, clock, fields }
}

/// A UTC time as an HLC time (NTP64).
pub fn hlc_of(t: DateTime<Utc>) -> u64 {
    let secs = t.timestamp().max(0) as u64;
    let frac = ((t.timestamp_subsec_nanos() as u128) << 32) / 1_000_000_000;
    (secs << 32) | frac as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::rules::{Write, WriteCtx, apply_local};

    #[test]
    fn a_row_survives_the_round_trip_through_a_state() {
        let now = crate::model::now();
        let p = Profile {
            id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            name: "Ada".into(),
            bio: "".into(),
            skills: vec!["math".into()],
            interests: vec![],
            created_at: now,
            updated_at: now,
            vclock: VectorClock::new(),
        };
        let ctx = WriteCtx { node: "n1", hlc: hlc_of(now), caller: None, if_match: None };
        let write = Write::Create { entity: Entity::Profile, id: p.id, owner: p.user_id, fields: profile_fields(&p) };
        let state = apply_local(None, write, &ctx).unwrap().state;
        check_complete(&state).unwrap();
        let back = profile(&state).unwrap();
        assert_eq!(back, Profile { vclock: state.clock.clone(), ..p });
        assert!(user(&state).is_err());
    }

    #[test]
    fn rows_without_stamps_get_their_writers_dot() {
        let now = crate::model::now();
        let clock = VectorClock::new().incremented("n1").incremented("n1");
        let values = BTreeMap::from([("name".to_owned(), json!("x"))]);
        let s = state_from_stored(Stored {
            entity: Entity::Project,
            id: Uuid::nil(),
            owner: Uuid::nil(),
            clock,
            values,
            stamps: BTreeMap::new(),
            losers: vec![],
            updated_at: now,
        });
        assert_eq!(s.stamp("name").unwrap().dot, Dot { node: "n1".into(), counter: 2 });
        assert_eq!(s.stamp("name").unwrap().hlc, hlc_of(now));
    }
}
