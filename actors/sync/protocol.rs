//! What nodes say to each other about data: the gossip batch and the sync protocol's
//! requests and responses. Serialised as JSON, then sealed with the network key (the
//! kind of message bound in) before it reaches the network layer.

use serde::{Deserialize, Serialize};

use crate::actors::shard::RemoteState;
use crate::replication::netkey::{Kind, NetworkKeys, OpenError};

/// A batch of committed local changes, published on the replication topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GossipBatch {
    /// The node id of the publisher.
    pub node: String,
    pub states: Vec<RemoteState>,
}

/// A request of the sync protocol. Sessions are numbered by the initiator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// One round of range-based set reconciliation (a negentropy message).
    Reconcile {
        session: u64,
        #[serde(with = "b64")]
        message: Vec<u8>,
    },
    /// The states of rows named by their version ids in the responder's session snapshot.
    Fetch { session: u64, ids: Vec<Id> },
    /// States the responder lacks.
    Push { states: Vec<RemoteState> },
    /// The session is over: the responder may drop its snapshot.
    Done { session: u64 },
}

/// A response of the sync protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Reconcile {
        #[serde(with = "b64")]
        message: Vec<u8>,
    },
    States {
        states: Vec<RemoteState>,
    },
    Applied,
    /// The responder serves as many sessions as it will; try later.
    Busy,
    /// The request could not be served.
    Failed {
        reason: String,
    },
}

/// A row version id (32 bytes), base64 in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Id(#[serde(with = "b64_array")] pub [u8; 32]);

/// Seals a message of `kind` as JSON.
pub fn seal<T: Serialize>(keys: &NetworkKeys, kind: Kind, message: &T) -> Vec<u8> {
    // Serialising plain data (strings, numbers, maps with string keys) cannot fail.
    let json = serde_json::to_vec(message).unwrap_or_default();
    keys.seal(kind, &json)
}

/// Why a message from a peer was not understood.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Opens and reads a sealed message of `kind`.
pub fn open<T: for<'de> Deserialize<'de>>(keys: &NetworkKeys, kind: Kind, sealed: &[u8]) -> Result<T, WireError> {
    let json = keys.open(kind, sealed)?;
    Ok(serde_json::from_slice(&json)?)
}

/// Reads an opened message (the network layer opened gossip and requests already).
pub fn read<T: for<'de> Deserialize<'de>>(json: &[u8]) -> Result<T, WireError> {
    Ok(serde_json::from_slice(json)?)
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <&str>::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

mod b64_array {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        super::b64::serialize(bytes, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let v = super::b64::deserialize(d)?;
        v.try_into().map_err(|_| serde::de::Error::custom("a version id is 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_the_seal_and_refuse_other_kinds() {
        let keys = NetworkKeys::derive(&[7; 32]);
        let req = Request::Fetch { session: 3, ids: vec![Id([1; 32])] };
        let sealed = seal(&keys, Kind::SyncRequest, &req);
        let back: Request = open(&keys, Kind::SyncRequest, &sealed).unwrap();
        assert!(matches!(back, Request::Fetch { session: 3, ids } if ids == vec![Id([1; 32])]));
        assert!(open::<Request>(&keys, Kind::SyncResponse, &sealed).is_err());
        assert!(read::<Request>(b"{\"Fetch\":{\"session\":1,\"ids\":[\"AAAA\"]}}").is_err());
    }
}
