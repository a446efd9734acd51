//! Sealing sensitive fields at rest: AES-256-GCM under the node's data keys, and the
//! keyed blind index that lets the node look a sealed value up without storing it in
//! the clear.
//!
//! A `Keyring` holds every data key the node has had (by id) and which one seals new
//! values, plus the blind-index key. Each sealed value is `nonce ‖ ciphertext ‖ tag` with
//! a fresh random nonce, stored beside the id of the key that sealed it; the associated
//! data binds it to its row and column, so a ciphertext copied to another row does not
//! open. The blind-index key never rotates: rotating it would move every directory
//! entry to another shard.
//!
//! Pure logic: no files, no database. It must never log or return key bytes or
//! plaintext in an error.

use std::collections::BTreeMap;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// Bytes in a data key or the blind-index key.
pub const KEY_LEN: usize = 32;

/// The key-check id that stands for the blind-index key (data keys count from 1).
pub const INDEX_KEY_ID: i32 = 0;

/// The format tag of a key file.
const FORMAT: &str = "cosmicsync-keyring/1";

/// Why sealing or opening failed. Carries no key or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("no data key with id {0} in the key file")]
    UnknownKey(i32),
    #[error("a sealed value failed authentication (wrong key, or the data was altered)")]
    Corrupt,
    #[error("the key file is malformed: {0}")]
    BadKeyFile(String),
}

/// A value sealed under a data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: i32,
    /// `nonce ‖ ciphertext ‖ tag`.
    pub bytes: Vec<u8>,
}

/// A key's check value: proves which key sealed the data without revealing the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCheck {
    pub key_id: i32,
    pub value: Vec<u8>,
}

struct DataKey {
    raw: [u8; KEY_LEN],
    aead: RandomizedNonceKey,
    created_at: String,
}

/// The node's keys.
pub struct Keyring {
    current: i32,
    keys: BTreeMap<i32, DataKey>,
    index_raw: [u8; KEY_LEN],
    index: hmac::Key,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids only: key bytes never reach a log.
        f.debug_struct("Keyring").field("current", &self.current).field("keys", &self.key_ids()).finish()
    }
}

/// The key file as stored (JSON, mode 0600).
#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    current: i32,
    index_key: String,
    data_keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyFileEntry {
    id: i32,
    key: String,
    created_at: String,
}

fn random_key() -> [u8; KEY_LEN] {
    let mut raw = [0u8; KEY_LEN];
    rand::fill(&mut raw);
    raw
}

fn data_key(raw: [u8; KEY_LEN], created_at: String) -> DataKey {
    // A 32-byte key is always valid for AES-256-GCM.
    let aead = RandomizedNonceKey::new(&AES_256_GCM, &raw).expect("a 32-byte AES-256 key");
    DataKey { raw, aead, created_at }
}

fn check_value(raw: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, raw);
    hmac::sign(&key, b"cosmicsync key check v1").as_ref()[..16].to_vec()
}

fn decode_key(text: &str, what: &str) -> Result<[u8; KEY_LEN], SealError> {
    let bytes = B64.decode(text.trim()).map_err(|_| SealError::BadKeyFile(format!("{what} is not base64")))?;
    bytes.try_into().map_err(|_| SealError::BadKeyFile(format!("{what} is not {KEY_LEN} bytes")))
}

impl Keyring {
    /// A new keyring: data key 1 and a blind-index key, both random.
    pub fn generate() -> Self {
        let index_raw = random_key();
        let mut keys = BTreeMap::new();
        keys.insert(1, data_key(random_key(), chrono::Utc::now().to_rfc3339()));
        Self { current: 1, keys, index: hmac::Key::new(hmac::HMAC_SHA256, &index_raw), index_raw }
    }

    /// Parses a key file.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let file: KeyFile = serde_json::from_str(text).map_err(|e| SealError::BadKeyFile(e.to_string()))?;
        if file.format != FORMAT {
            return Err(SealError::BadKeyFile(format!("format is {:?}, expected {FORMAT:?}", file.format)));
        }
        let index_raw = decode_key(&file.index_key, "index_key")?;
        let mut keys = BTreeMap::new();
        for entry in file.data_keys {
            if entry.id <= INDEX_KEY_ID {
                return Err(SealError::BadKeyFile(format!("data key id {} is not positive", entry.id)));
            }
            let raw = decode_key(&entry.key, &format!("data key {}", entry.id))?;
            if keys.insert(entry.id, data_key(raw, entry.created_at)).is_some() {
                return Err(SealError::BadKeyFile(format!("data key id {} appears twice", entry.id)));
            }
        }
        if !keys.contains_key(&file.current) {
            return Err(SealError::BadKeyFile(format!("current key {} is not in the file", file.current)));
        }
        Ok(Self { current: file.current, keys, index: hmac::Key::new(hmac::HMAC_SHA256, &index_raw), index_raw })
    }

    /// The key file's text.
    pub fn to_file(&self) -> String {
        let file = KeyFile {
            format: FORMAT.into(),
            current: self.current,
            index_key: B64.encode(self.index_raw),
            data_keys: self
                .keys
                .iter()
                .map(|(id, k)| KeyFileEntry { id: *id, key: B64.encode(k.raw), created_at: k.created_at.clone() })
                .collect(),
        };
        serde_json::to_string_pretty(&file).expect("a key file serialises") + "\n"
    }

    /// This keyring plus a new random data key, which becomes current.
    pub fn rotated(&self) -> Self {
        let mut keys: BTreeMap<i32, DataKey> =
            self.keys.iter().map(|(id, k)| (*id, data_key(k.raw, k.created_at.clone()))).collect();
        let next = self.keys.keys().max().copied().unwrap_or(0) + 1;
        keys.insert(next, data_key(random_key(), chrono::Utc::now().to_rfc3339()));
        Self {
            current: next,
            keys,
            index: hmac::Key::new(hmac::HMAC_SHA256, &self.index_raw),
            index_raw: self.index_raw,
        }
    }

    /// The id of the key new values are sealed with.
    pub fn current(&self) -> i32 {
        self.current
    }

    /// Every data key id, ascending.
    pub fn key_ids(&self) -> Vec<i32> {
        self.keys.keys().copied().collect()
    }

    /// Check values of the blind-index key and every data key.
    pub fn checks(&self) -> Vec<KeyCheck> {
        std::iter::once(KeyCheck { key_id: INDEX_KEY_ID, value: check_value(&self.index_raw) })
            .chain(self.keys.iter().map(|(id, k)| KeyCheck { key_id: *id, value: check_value(&k.raw) }))
            .collect()
    }

    /// Does this keyring hold the key a stored check value was made from?
    pub fn verifies(&self, check: &KeyCheck) -> bool {
        let raw = if check.key_id == INDEX_KEY_ID {
            Some(&self.index_raw)
        } else {
            self.keys.get(&check.key_id).map(|k| &k.raw)
        };
        raw.is_some_and(|raw| check_value(raw) == check.value)
    }

    /// Seals `plaintext` under the current key, bound to `context` (e.g. table, column, row id).
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Sealed {
        let key = &self.keys[&self.current];
        let mut in_out = plaintext.to_vec();
        // AES-GCM sealing with a random nonce fails only if the system RNG does.
        let nonce = key.aead.seal_in_place_append_tag(Aad::from(context), &mut in_out).expect("AES-GCM seal");
        let mut bytes = Vec::with_capacity(NONCE_LEN + in_out.len());
        bytes.extend_from_slice(nonce.as_ref());
        bytes.extend_from_slice(&in_out);
        Sealed { key_id: self.current, bytes }
    }

    /// Opens a sealed value; fails if the key is unknown or the value was altered or moved.
    pub fn open(&self, sealed: &Sealed, context: &[u8]) -> Result<Vec<u8>, SealError> {
        let key = self.keys.get(&sealed.key_id).ok_or(SealError::UnknownKey(sealed.key_id))?;
        if sealed.bytes.len() < NONCE_LEN {
            return Err(SealError::Corrupt);
        }
        let (nonce, body) = sealed.bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Corrupt)?;
        let mut in_out = body.to_vec();
        let plain = key.aead.open_in_place(nonce, Aad::from(context), &mut in_out).map_err(|_| SealError::Corrupt)?;
        Ok(plain.to_vec())
    }

    /// Opens a sealed UTF-8 string.
    pub fn open_string(&self, sealed: &Sealed, context: &[u8]) -> Result<String, SealError> {
        String::from_utf8(self.open(sealed, context)?).map_err(|_| SealError::Corrupt)
    }

    /// The blind index of an already normalised value in `domain`: a keyed HMAC, hex.
    pub fn blind_index(&self, domain: &str, normalised: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.index);
        ctx.update(domain.as_bytes());
        ctx.update(&[0]);
        ctx.update(normalised.as_bytes());
        hex::encode(ctx.sign().as_ref())
    }
}

/// The keyring the node uses, swapped whole when a key is added. Readers take an `Arc`
/// and never hold the lock while they work.
#[derive(Debug)]
pub struct SharedKeyring(std::sync::RwLock<std::sync::Arc<Keyring>>);

impl SharedKeyring {
    /// Shares `ring`.
    pub fn new(ring: Keyring) -> Self {
        Self(std::sync::RwLock::new(std::sync::Arc::new(ring)))
    }

    /// The keyring as it is now.
    pub fn get(&self) -> std::sync::Arc<Keyring> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the keyring (after its file was written).
    pub fn replace(&self, ring: Keyring) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(ring);
    }
}

/// The associated data that binds a user's sealed email to its row.
pub fn email_context(user_id: &uuid::Uuid) -> Vec<u8> {
    let mut ctx = b"users.email:".to_vec();
    ctx.extend_from_slice(user_id.as_bytes());
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seal_open_round_trip_with_fresh_nonces() {
        let ring = Keyring::generate();
        let a = ring.seal(b"ada@example.org", b"ctx");
        let b = ring.seal(b"ada@example.org", b"ctx");
        assert_ne!(a.bytes, b.bytes, "a fresh nonce per value");
        assert!(!a.bytes.windows(3).any(|w| w == b"ada"), "no plaintext in the ciphertext");
        assert_eq!(ring.open_string(&a, b"ctx").unwrap(), "ada@example.org");
        assert_eq!(ring.open(&a, b"other row"), Err(SealError::Corrupt));
        let mut tampered = a.clone();
        *tampered.bytes.last_mut().unwrap() ^= 1;
        assert_eq!(ring.open(&tampered, b"ctx"), Err(SealError::Corrupt));
        assert_eq!(ring.open(&Sealed { key_id: 9, bytes: a.bytes }, b"ctx"), Err(SealError::UnknownKey(9)));
        assert_eq!(ring.open(&Sealed { key_id: 1, bytes: vec![1, 2] }, b"ctx"), Err(SealError::Corrupt));
    }

    #[test]
    fn rotation_keeps_old_keys_and_the_index_key() {
        let ring = Keyring::generate();
        let old = ring.seal(b"x", b"c");
        let rotated = ring.rotated();
        assert_eq!(rotated.current(), 2);
        assert_eq!(rotated.key_ids(), vec![1, 2]);
        assert_eq!(rotated.open(&old, b"c").unwrap(), b"x");
        assert_eq!(rotated.seal(b"x", b"c").key_id, 2);
        assert_eq!(ring.blind_index("email", "a@b.c"), rotated.blind_index("email", "a@b.c"));
    }

    #[test]
    fn key_file_round_trip_and_checks() {
        let ring = Keyring::generate().rotated();
        let text = ring.to_file();
        let back = Keyring::parse(&text).unwrap();
        assert_eq!(back.current(), 2);
        let sealed = ring.seal(b"v", b"c");
        assert_eq!(back.open(&sealed, b"c").unwrap(), b"v");
        assert_eq!(ring.checks(), back.checks());
        assert!(ring.checks().iter().all(|c| back.verifies(c)));
        let other = Keyring::generate();
        assert!(ring.checks().iter().all(|c| !other.verifies(c)), "another keyring verifies none of these keys");
        assert!(!format!("{ring:?}").contains(&B64.encode(ring.index_raw)));
    }

    #[test]
    fn malformed_key_files_are_refused() {
        for bad in [
            "",
            "{}",
            r#"{"format":"other","current":1,"index_key":"","data_keys":[]}"#,
            r#"{"format":"cosmicsync-keyring/1","current":1,"index_key":"AA==","data_keys":[]}"#,
        ] {
            assert!(matches!(Keyring::parse(bad), Err(SealError::BadKeyFile(_))), "{bad:?} accepted");
        }
        let ring = Keyring::generate();
        let no_current = ring.to_file().replace("\"current\": 1", "\"current\": 7");
        assert!(Keyring::parse(&no_current).is_err());
    }

    #[test]
    fn blind_index_is_keyed_and_domain_separated() {
        let a = Keyring::generate();
        let b = Keyring::generate();
        assert_eq!(a.blind_index("email", "x@y.z"), a.blind_index("email", "x@y.z"));
        assert_ne!(a.blind_index("email", "x@y.z"), b.blind_index("email", "x@y.z"));
        assert_ne!(a.blind_index("email", "x@y.z"), a.blind_index("other", "x@y.z"));
        assert!(!a.blind_index("email", "x@y.z").contains("x@y.z"));
    }

    proptest! {
        #[test]
        fn any_value_round_trips(value in proptest::collection::vec(any::<u8>(), 0..512), ctx in "[a-z]{0,16}") {
            let ring = Keyring::generate();
            let sealed = ring.seal(&value, ctx.as_bytes());
            prop_assert_eq!(ring.open(&sealed, ctx.as_bytes()).unwrap(), value);
        }
    }
}
