//! The network key: the one secret that defines a network, and everything derived from it.
//!
//! A network is a 256-bit secret in `<data-dir>/network.key` (mode 0600; created on first
//! start, so a new node is a network of one) or the file `--network-key-file` names. Every
//! key replication needs is derived from it with HKDF-SHA256 under a distinct label, so
//! nothing else is ever distributed:
//!
//! | label | use |
//! |---|---|
//! | `cosmicsync/seal/v1` | ChaCha20-Poly1305 key sealing every replication message |
//! | `cosmicsync/topic/v1` | the gossipsub topic name (a hash: two networks never share one) |
//!
//! Sync requests are authenticated by being sealed with the same key: a request that does
//! not open is refused. A sealed message is `nonce (12) ‖ ciphertext ‖ tag (16)`, with a
//! fresh random nonce and the message kind as associated data, so a message of one kind
//! cannot be replayed as another.
//!
//! Pure apart from `load_or_create`; it must never log or return key bytes.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;

/// Length of the network secret in bytes.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What a sealed message carries; bound into the seal as associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A batch of row states on the gossip topic.
    Gossip,
    /// A reconciliation request.
    SyncRequest,
    /// A reconciliation response.
    SyncResponse,
}

impl Kind {
    fn label(self) -> &'static [u8] {
        match self {
            Kind::Gossip => b"cosmicsync/msg/gossip/v1",
            Kind::SyncRequest => b"cosmicsync/msg/sync-request/v1",
            Kind::SyncResponse => b"cosmicsync/msg/sync-response/v1",
        }
    }
}

/// Why a sealed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("message too short to be sealed")]
    Truncated,
    #[error("message does not open with this network's key (wrong network, altered, or another kind)")]
    Refused,
}

/// The keys derived from one network secret.
#[derive(Clone)]
pub struct NetworkKeys {
    cipher: ChaCha20Poly1305,
    topic: String,
    fingerprint: String,
}

impl std::fmt::Debug for NetworkKeys {
    // Never the key: only the public fingerprint.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkKeys").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

fn derive(secret: &[u8; KEY_LEN], label: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"cosmicsync network key"), secret);
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 blocks: this cannot fail.
    hk.expand(label.as_bytes(), &mut out).unwrap_or_default();
    out
}

impl NetworkKeys {
    /// Derives every key from the secret.
    pub fn derive(secret: &[u8; KEY_LEN]) -> Self {
        let seal = derive(secret, "cosmicsync/seal/v1");
        let topic = derive(secret, "cosmicsync/topic/v1");
        let id = derive(secret, "cosmicsync/fingerprint/v1");
        Self {
            cipher: ChaCha20Poly1305::new(&Key::from(seal)),
            topic: format!("/cosmicsync/sync/{}", hex::encode(&topic[..16])),
            fingerprint: hex::encode(&id[..8]),
        }
    }

    /// The gossipsub topic of this network.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// A short public name for the network (safe to log and show): equal on every member.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Seals `plaintext` as a message of `kind`.
    pub fn seal(&self, kind: Kind, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let nonce = Nonce::from(nonce);
        // Encryption with a valid key and nonce fails only on absurd lengths (> 256 GiB).
        let sealed = self.cipher.encrypt(&nonce, Payload { msg: plaintext, aad: kind.label() }).unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a message sealed as `kind` by a member of this network.
    pub fn open(&self, kind: Kind, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Truncated);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| OpenError::Truncated)?;
        self.cipher.decrypt(&nonce, Payload { msg: body, aad: kind.label() }).map_err(|_| OpenError::Refused)
    }
}

/// Loads the network secret at `path`; with `create`, makes a new one (mode 0600) if
/// there is none. Returns the keys and whether the file was created. A file others can
/// read is refused, and so is one of the wrong length.
pub fn load(path: &Path, create: bool) -> std::io::Result<(NetworkKeys, bool)> {
    let existed = path.exists();
    if !existed && !create {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist: copy the network key from a member of the network", path.display()),
        ));
    }
    let bytes = crate::secrets::load_or_create(path, KEY_LEN)?;
    if bytes.len() != KEY_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a network key: it must hold exactly {KEY_LEN} bytes", path.display()),
        ));
    }
    let secret: [u8; KEY_LEN] = bytes.get(..KEY_LEN).and_then(|b| b.try_into().ok()).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a network key: it must hold {KEY_LEN} bytes", path.display()),
        )
    })?;
    Ok((NetworkKeys::derive(&secret), !existed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(byte: u8) -> NetworkKeys {
        NetworkKeys::derive(&[byte; KEY_LEN])
    }

    #[test]
    fn a_sealed_message_opens_with_the_same_network_and_kind_only() {
        let (a, b) = (keys(1), keys(2));
        let sealed = a.seal(Kind::Gossip, b"rows");
        assert_eq!(a.open(Kind::Gossip, &sealed).unwrap(), b"rows");
        assert_eq!(b.open(Kind::Gossip, &sealed), Err(OpenError::Refused));
        assert_eq!(a.open(Kind::SyncRequest, &sealed), Err(OpenError::Refused));
    }

    #[test]
    fn altered_or_truncated_messages_are_refused() {
        let a = keys(1);
        let mut sealed = a.seal(Kind::Gossip, b"rows");
        assert_eq!(a.open(Kind::Gossip, &sealed[..10]), Err(OpenError::Truncated));
        assert_eq!(a.open(Kind::Gossip, &sealed[..sealed.len() - 1]), Err(OpenError::Refused));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(a.open(Kind::Gossip, &sealed), Err(OpenError::Refused));
    }

    #[test]
    fn every_seal_uses_a_fresh_nonce() {
        let a = keys(1);
        assert_ne!(a.seal(Kind::Gossip, b"same"), a.seal(Kind::Gossip, b"same"));
    }

    #[test]
    fn derived_names_differ_between_networks_and_agree_within_one() {
        assert_eq!(keys(1).topic(), keys(1).topic());
        assert_ne!(keys(1).topic(), keys(2).topic());
        assert_ne!(keys(1).fingerprint(), keys(2).fingerprint());
        assert!(!format!("{:?}", keys(1)).contains("cipher"));
    }

    #[test]
    fn the_key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network.key");
        assert!(load(&path, false).is_err(), "a given key file must exist");
        let (first, created) = load(&path, true).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, created) = load(&path, false).unwrap();
        assert!(!created);
        assert_eq!(first.topic(), again.topic());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&path, false).is_err());
        let long = dir.path().join("long.key");
        std::fs::write(&long, [1u8; 40]).unwrap();
        std::fs::set_permissions(&long, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&long, false).is_err());
    }
}
