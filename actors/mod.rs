//! The node's actor tree (see docs/ARCHITECTURE.md for the picture and the invariants).
//!
//! ```text
//! NodeSupervisor
//! ├── ShardActor × N   one per PostgreSQL shard; the only code that runs SQL
//! ├── AuthActor        bcrypt on a blocking pool, JWT issue/verify, revocations, login limits
//! ├── KeyActor         the data keys: key file, rotation, re-sealing rows under old keys
//! ├── RecommendActor batch user-user recommendations (timer and on demand)
//! ├── EventHub         orders committed changes and fans them out to WebSocket sessions
//! ├── PeerActor        the libp2p network: owns the Swarm's event loop (Supervisor-restarted)
//! ├── HttpActor        the actix-web server (REST + WebSocket)
//! └── ControlActor     the CLI's local channel (a Unix socket in the data directory)
//! ```
//!
//! Actors talk only through the typed messages defined beside each of them. The message
//! graph is a DAG: HTTP/Control → Auth/Keys → Shards → EventHub; nothing sends upwards.

pub mod auth;
pub mod control;
pub mod event_hub;
pub mod http;
pub mod keys;
pub mod peer;
pub mod recommend;
pub mod shard;
pub mod shards;
pub mod supervisor;
pub mod sync;
