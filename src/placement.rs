//! Where rows live: id generation and shard routing.
//!
//! Every id is a UUIDv7 (time-ordered, unique across nodes without coordination). Bytes
//! 12..16 of an id are its *placement key*: random for a user, and copied from the owner
//! for everything a user owns (their profile, the projects they create). So any id routes
//! to its owner's shard on its own, on every node, whatever that node's shard count.
//! Pure logic: it must never depend on anything but its inputs, or rows would move.

use uuid::Uuid;

const KEY_BYTES: std::ops::Range<usize> = 12..16;

/// The placement key carried by an id (bytes 12..16).
pub fn placement_key(id: &Uuid) -> u32 {
    let b = id.as_bytes();
    u32::from_be_bytes([b[12], b[13], b[14], b[15]])
}

/// A fresh id for a row with no owner but itself (a user).
pub fn new_root_id() -> Uuid {
    Uuid::now_v7()
}

/// A fresh id for a row owned by `owner`: it routes to the owner's shard.
pub fn new_owned_id(owner: &Uuid) -> Uuid {
    let mut bytes = *Uuid::now_v7().as_bytes();
    bytes[KEY_BYTES].copy_from_slice(&owner.as_bytes()[KEY_BYTES]);
    Uuid::from_bytes(bytes)
}

/// Jump consistent hash (Lamping & Veach): maps a key to one of `buckets` buckets so
/// that growing the bucket count moves only the keys that must move.
fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// Routes ids and directory keys to shards for a fixed shard count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Router {
    shards: u32,
}

impl Router {
    /// A router over `shards` shards (at least one).
    pub fn new(shards: u32) -> Self {
        Self { shards: shards.max(1) }
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards as usize
    }

    /// The shard that holds the row with this id (its owner's shard).
    pub fn shard_of(&self, id: &Uuid) -> usize {
        // Mix the 32-bit key into 64 bits before jumping: jump hash wants a full-width key.
        let key = xxhash_rust::xxh3::xxh3_64(&placement_key(id).to_be_bytes());
        jump_hash(key, self.shards) as usize
    }

    /// The shard that holds a directory entry (a unique username or email).
    pub fn shard_of_directory_key(&self, kind: &str, key: &str) -> usize {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(kind.as_bytes());
        h.update(&[0]);
        h.update(key.as_bytes());
        jump_hash(h.digest(), self.shards) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn owned_ids_are_v7_and_follow_their_owner() {
        let owner = new_root_id();
        let owned = new_owned_id(&owner);
        assert_eq!(owned.get_version_num(), 7);
        assert_ne!(owned, owner);
        assert_eq!(placement_key(&owned), placement_key(&owner));
    }

    const SHARD_OF_FIXED_ID: usize = 0;

    #[test]
    fn placement_is_stable() {
        // Fixed vectors: if these change, every existing row would be looked for on the wrong shard.
        let id = Uuid::parse_str("01890a5d-ac96-774b-bcce-b302099a8057").unwrap();
        assert_eq!(placement_key(&id), 0x099a_8057);
        assert_eq!(Router::new(4).shard_of(&id), SHARD_OF_FIXED_ID);
        assert_eq!(Router::new(16).shard_of(&id), 10);
        assert_eq!(Router::new(4).shard_of_directory_key("username", "ada"), 1);
        assert_eq!(jump_hash(0, 1), 0);
        assert_eq!(jump_hash(256, 1024), 520);
        assert_eq!(jump_hash(0xdead_beef, 16), 5);
    }

    #[test]
    fn shards_are_used_evenly() {
        let router = Router::new(4);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[router.shard_of(&new_root_id())] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven placement: {counts:?}");
        }
    }

    proptest! {
        #[test]
        fn a_users_rows_share_one_shard(bytes in any::<[u8; 16]>(), shards in 1u32..64) {
            let owner = Uuid::from_bytes(bytes);
            let router = Router::new(shards);
            let s = router.shard_of(&owner);
            prop_assert!(s < shards as usize);
            for _ in 0..4 {
                prop_assert_eq!(router.shard_of(&new_owned_id(&owner)), s);
            }
        }

        #[test]
        fn growing_moves_only_to_the_new_shard(bytes in any::<[u8; 16]>(), shards in 1u32..63) {
            let id = Uuid::from_bytes(bytes);
            let before = Router::new(shards).shard_of(&id);
            let after = Router::new(shards + 1).shard_of(&id);
            prop_assert!(after == before || after == shards as usize);
        }
    }
}
