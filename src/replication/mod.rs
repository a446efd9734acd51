//! Replication between nodes: the pure parts.
//!
//! - `netkey`: the network secret, the keys derived from it, sealed messages;
//! - `rules`: row states, the one write path for local writes and remote states, the
//!   merge and its conflicts.
//!
//! Nothing here runs SQL, touches the network or holds an actor: `actors/sync.rs` and the
//! shards drive these modules.

pub mod netkey;
pub mod rows;
pub mod rules;

/// The node's hybrid logical clock. Its id is derived from the node id; it accepts
/// peers' times up to an hour ahead of its own wall clock (uhlc's default, 500 ms, would
/// refuse times from nodes whose clocks are a little fast). A write to a row is always
/// stamped after the row's newest value anyway (see `actors::shard`).
pub fn hlc(node_id: &str) -> uhlc::HLC {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(node_id.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    // Never zero: uhlc ids must not be.
    id[0] |= 1;
    let id = uhlc::ID::try_from(id).unwrap_or_else(|_| uhlc::ID::rand());
    uhlc::HLCBuilder::new().with_id(id).with_max_delta(std::time::Duration::from_secs(3600)).build()
}
