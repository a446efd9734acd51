//! `StoreError`: why a storage request failed, as the shards and `Shards` return it.
//!
//! A storage error knows nothing about HTTP: `crate::problem` maps it to a status and a
//! client message at the edge. Causes that are error values stay typed (`#[source]`), so
//! a log shows the whole chain (`crate::errors::chain`); they sit behind `Arc`s because
//! the error is `Clone` (one answer may reach several waiters).

use std::sync::Arc;

use crate::replication::rows::Unreadable;
use crate::sealing::SealError;

/// Errors from a shard (see `actors::shard`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("the resource has changed since it was read (If-Match does not match)")]
    PreconditionFailed,
    #[error("only the owner may change this {0}")]
    Forbidden(&'static str),
    #[error("shard {0} is unavailable")]
    Unavailable(usize),
    /// PostgreSQL refused a statement (a lost connection is `Unavailable` instead).
    /// The text shows the SQLSTATE and message only: the server's DETAIL (reachable
    /// through `source`) may quote a row, sealed columns and hashes included, so it is
    /// never to be logged.
    #[error("database error: {}", postgres_text(.0))]
    Database(#[source] Arc<tokio_postgres::Error>),
    /// A sealed value could not be opened (key missing or data altered).
    #[error("cannot open a sealed value: {0}")]
    Sealing(#[source] SealError),
    /// A row state that does not read as a row of its entity.
    #[error("stored data does not read back: {0}")]
    Unreadable(#[from] Unreadable),
    /// Stored data that does not read back as what the node writes.
    #[error("stored data does not read back: {0}")]
    Corrupt(String),
    /// A value that does not encode to, or decode from, its JSON column.
    #[error("JSON column: {0}")]
    Json(#[source] Arc<serde_json::Error>),
    /// The sequencer could not reserve numbers on disk.
    #[error("cannot reserve sequence numbers: {0}")]
    Sequence(#[source] Arc<std::io::Error>),
    /// The task running a request ended without an answer (it panicked).
    #[error("shard task failed: {0}")]
    Task(#[source] Arc<tokio::task::JoinError>),
}

impl StoreError {
    /// True when the request may have committed although it failed (the answer, not
    /// necessarily the work, went missing): a cross-shard write then asks its
    /// coordinator what was decided.
    pub fn may_have_committed(&self) -> bool {
        match self {
            StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::PreconditionFailed
            | StoreError::Forbidden(_)
            | StoreError::Sealing(_) => false,
            StoreError::Unavailable(_)
            | StoreError::Database(_)
            | StoreError::Unreadable(_)
            | StoreError::Corrupt(_)
            | StoreError::Json(_)
            | StoreError::Sequence(_)
            | StoreError::Task(_) => true,
        }
    }
}

/// A PostgreSQL error as `SQLSTATE: message`, leaving out the DETAIL and HINT.
fn postgres_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Json(Arc::new(e))
    }
}
