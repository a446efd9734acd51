//! Pure pieces of the peer-to-peer network: its configuration, multiaddr helpers and the
//! dial back-off. The Swarm itself lives in `actors::peer` (the only code that touches it).
//!
//! Nothing here may open a socket, spawn a task or hold an actor: these modules are
//! unit-tested without a runtime.

pub mod addr;
pub mod backoff;
pub mod config;
