//! EventHub: puts committed changes in sequence order and fans them out to WebSocket
//! sessions.
//!
//! TODO: being written.

use std::ops::Range;

use actix::prelude::*;

use crate::model::ChangeEvent;

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

/// The hub.
#[derive(Default)]
pub struct EventHub;

impl Actor for EventHub {
    type Context = Context<Self>;
}

impl Handler<Report> for EventHub {
    type Result = ();
    fn handle(&mut self, _msg: Report, _ctx: &mut Self::Context) {}
}
