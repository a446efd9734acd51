//! A recommendation run's inputs and results as the shards store them: plain rows, read
//! and written by the shards, computed by `RecommendActor`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Mode, SharedFeature};

/// A user as the batch reads them from their shard.
#[derive(Debug, Clone)]
pub struct RecoInput {
    pub user_id: Uuid,
    pub username: String,
    pub skills: Vec<String>,
    pub interests: Vec<String>,
}

/// One stored neighbour of one user in one mode.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoRow {
    pub user_id: Uuid,
    pub mode: Mode,
    /// 1 = best.
    pub rank: i16,
    pub neighbour_id: Uuid,
    pub username: String,
    pub score: f64,
    pub shared: Vec<SharedFeature>,
}

/// What a shard records about the run it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub generation: i64,
    pub computed_at: DateTime<Utc>,
    pub users: i32,
    pub duration_ms: i64,
    pub k: i32,
}
