//! CosmicSyncCore: a peer-to-peer data-sync node for collaboration platforms.
//!
//! The library holds everything the `cosmicsync` binary is made of, so integration
//! tests can reuse pieces (an embedded PostgreSQL cluster, the TLS helpers) while still
//! talking to the real binary over the wire.
//!
//! Layout: pure logic (no actor, no I/O) in `vclock`, `placement`, `validate`, `model`,
//! `similarity`;
//! the actor tree in `actors/` (mounted below); the HTTP handlers in `api`; boot code in
//! `boot`, `config`, `embedded_pg`, `tls`, `logging`; the CLI's local channel in `control`.

pub mod api;
pub mod boot;
pub mod changes;
pub mod config;
pub mod control;
pub mod embedded_pg;
pub mod errors;
pub mod logging;
pub mod login_limit;
pub mod model;
pub mod p2p;
pub mod placement;
pub mod problem;
pub mod replication;
pub mod sealing;
pub mod secrets;
pub mod sequencer;
pub mod shard_count;
pub mod shard_tls;
pub mod similarity;
pub mod tls;
pub mod validate;
pub mod vclock;

#[path = "../actors/mod.rs"]
pub mod actors;
