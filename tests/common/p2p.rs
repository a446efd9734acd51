//! The peer-to-peer view of a node under test, over its control socket (which also works
//! across network namespaces): its peer id and addresses from node.json, control-socket
//! questions, and waiting for a connected peer.

use std::time::Duration;

use cosmicsync::control::{self, Request, Response};
use serde_json::Value;

use super::{Node, wait_for};

/// A control-socket question: the answer's data, or `None` on any error.
pub fn ask(node: &Node, request: Request) -> Option<Value> {
    match control::request(&node.dir, &request, Duration::from_secs(30)) {
        Ok(Response::Ok { data }) => Some(data),
        _ => None,
    }
}

pub fn peer_id(node: &Node) -> String {
    node.info["peer_id"].as_str().expect("peer_id in node.json").to_owned()
}

/// The node's listen addresses with the ports it bound (node.json's `p2p_addrs`).
pub fn listen_addrs(node: &Node) -> Vec<String> {
    let addrs = node.info["p2p_addrs"].as_array().expect("p2p_addrs in node.json");
    addrs.iter().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// The first TCP listen address + peer id: what another node dials to bootstrap.
pub fn bootstrap_addr(node: &Node) -> String {
    let tcp = listen_addrs(node).into_iter().find(|a| a.contains("/tcp/")).expect("a TCP listen address");
    format!("{tcp}/p2p/{}", peer_id(node))
}

/// `node`'s entry for connected `peer` once `accept` holds for it.
pub async fn wait_peer(
    node: &Node,
    peer: &str,
    what: &str,
    timeout: Duration,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(what, timeout, || {
        let entry = ask(node, Request::NetworkPeers)
            .and_then(|peers| peers.as_array()?.iter().find(|p| p["peer_id"] == peer).cloned())
            .filter(&accept);
        async move { entry }
    })
    .await
}
