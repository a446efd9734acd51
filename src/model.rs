//! Domain types: the rows a shard stores, the views clients see, the bodies they send,
//! and the change events that describe every committed write.
//!
//! Plain data with serde and OpenAPI derives; no I/O. A `UserRow` holds the password
//! hash and the email: it must never be serialised to a client or a log; clients get a
//! `UserView`, which shows the email only to the user themself.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::vclock::VectorClock;

/// The current time at the precision PostgreSQL stores (microseconds), so what a write
/// returns equals what a later read returns.
pub fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// A user as stored on its shard.
#[derive(Clone)]
pub struct UserRow {
    pub id: Uuid,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub profile_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub password_changed_at: DateTime<Utc>,
    pub vclock: VectorClock,
}

impl std::fmt::Debug for UserRow {
    // Hand-written so the hash and the email never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow").field("id", &self.id).field("username", &self.username).finish_non_exhaustive()
    }
}

impl UserRow {
    /// What a client may see; `email` only when the caller is this user.
    pub fn view(&self, caller: Option<Uuid>) -> UserView {
        UserView {
            id: self.id,
            username: self.username.clone(),
            email: (caller == Some(self.id)).then(|| self.email.clone()),
            profile_id: self.profile_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A user as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub username: String,
    /// Present only when the caller is this user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub profile_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A user's profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Profile {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub bio: String,
    pub skills: Vec<String>,
    pub interests: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub vclock: VectorClock,
}

/// A project, owned by the user who created it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Project {
    pub id: Uuid,
    pub creator_id: Uuid,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub vclock: VectorClock,
}

/// `POST /users` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub username: String,
    pub email: String,
    pub password: String,
}

/// `PUT /users/{id}` body: the fields to change; omitted fields are kept.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    pub username: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
}

/// `PUT /profiles/{id}` body: the fields to change; omitted fields are kept.
/// Send `""` or `[]` to clear a field.
#[derive(Debug, Deserialize, ToSchema, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    pub name: Option<String>,
    pub bio: Option<String>,
    pub skills: Option<Vec<String>>,
    pub interests: Option<Vec<String>>,
}

/// `POST /projects` body.
#[derive(Debug, Deserialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `PUT /projects/{id}` body: the fields to change; omitted fields are kept.
#[derive(Debug, Deserialize, ToSchema, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProjectUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub tags: Option<Vec<String>>,
}

/// `POST /users` response: the user and the id of the empty profile created with it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedUser {
    #[serde(flatten)]
    pub user: UserView,
}

/// `POST /auth/login` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// `POST /auth/login` response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

/// A page of projects.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProjectPage {
    pub items: Vec<Project>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The kind of row a change touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    User,
    Profile,
    Project,
}

impl Entity {
    /// The name stored in the change log.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::User => "user",
            Entity::Profile => "profile",
            Entity::Project => "project",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Entity::User),
            "profile" => Some(Entity::Profile),
            "project" => Some(Entity::Project),
            _ => None,
        }
    }
}

/// What a change did to its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Create,
    Update,
    Delete,
}

impl Op {
    /// The name stored in the change log.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Op::Create),
            "update" => Some(Op::Update),
            "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// One committed write, as stored in the change log and sent on the WebSocket.
/// `data` is the row's public view after the change (never a hash or an email).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ChangeEvent {
    /// This node's sequence number: strictly increasing in commit order; gaps are
    /// writes that did not commit.
    pub seq: i64,
    /// The node that made the change.
    pub origin: String,
    /// The change's sequence number on its origin node.
    pub origin_seq: i64,
    pub entity: Entity,
    pub op: Op,
    pub id: Uuid,
    /// The user who owns the row (the user themself for a user row).
    pub owner_id: Uuid,
    #[schema(value_type = Object)]
    pub vclock: VectorClock,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub committed_at: DateTime<Utc>,
    /// Concurrent edits of one field this change brought to light (a change from another
    /// node merged with one made here); absent when there were none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<ConflictNote>,
}

/// One value in a conflict: what it is, which write set it, and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ConflictValue {
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    /// The node whose write set it.
    pub origin: String,
    /// That node's counter for the row: the write's entry in the row's vector clock.
    pub counter: u64,
    /// The write's hybrid-logical-clock time (the highest wins).
    pub at: DateTime<Utc>,
}

/// Concurrent writes of one field: the value every node shows, and one that lost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ConflictNote {
    pub field: String,
    pub winner: ConflictValue,
    pub loser: ConflictValue,
}

/// A conflict on one of the caller's rows (`GET /api/v1/conflicts`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ConflictView {
    pub entity: Entity,
    pub row_id: Uuid,
    pub field: String,
    pub winner: ConflictValue,
    pub loser: ConflictValue,
    /// When this node found it.
    pub detected_at: DateTime<Utc>,
    /// When a write that saw both values superseded it (the owner chose a value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved: bool,
}

/// A page of conflicts, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConflictPage {
    pub items: Vec<ConflictView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
