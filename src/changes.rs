//! What a shard tells the rest of the node after a write: every sequence number it
//! allocated, committed or void (`Report`, to EventHub), and the new states of rows this
//! node changed (`Published`, to SyncActor).
//!
//! Plain data, so storage code depends on no other actor: the shards hold these as
//! `actix::Recipient`s. Nothing here runs SQL or touches the network.

use std::ops::Range;

use actix::Message;

use crate::model::ChangeEvent;
use crate::replication::rules::RowState;

/// What a shard tells the hub about a sequence number it allocated: exactly one report
/// per number (see `crate::sequencer`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum Report {
    /// The change committed.
    Committed(ChangeEvent),
    /// These numbers will never carry a change.
    Void(Range<i64>),
}

/// A committed local change: its sequence number here and the row's new state.
#[derive(Debug, Clone)]
pub struct LocalChange {
    pub seq: i64,
    pub state: RowState,
}

/// From a shard: changes it committed (in commit order).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Published(pub Vec<LocalChange>);
