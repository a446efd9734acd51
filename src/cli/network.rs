//! `network peers` and `network find-peer`: the peer-to-peer view of a running node, as a
//! table for a person or JSON for a script. Read-only: these commands never change the
//! node's connections.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use cosmicsync::actors::peer::{FoundPeer, PeerReport};
use cosmicsync::control::Request;

use super::query::show;

/// `network peers`.
pub fn peers(data_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    show(data_dir, Request::NetworkPeers, (!json).then_some(peer_table as fn(_) -> _))
}

/// `network find-peer`.
pub fn find_peer(data_dir: &Path, peer_id: String, json: bool) -> anyhow::Result<ExitCode> {
    show(data_dir, Request::FindPeer { peer_id }, (!json).then_some(found_summary as fn(_) -> _))
}

fn peer_table(data: serde_json::Value) -> anyhow::Result<String> {
    let peers: Vec<PeerReport> =
        serde_json::from_value(data).context("the node sent a peer list this CLI cannot read")?;
    Ok(format_peers(&peers))
}

fn found_summary(data: serde_json::Value) -> anyhow::Result<String> {
    let found: FoundPeer = serde_json::from_value(data).context("the node sent an answer this CLI cannot read")?;
    let mut out = format!(
        "peer {} found in {:.1} ms ({})\n",
        found.peer_id,
        found.elapsed_ms,
        if found.connected { "connected" } else { "not connected" }
    );
    for addr in &found.addrs {
        let _ = writeln!(out, "  {addr}");
    }
    Ok(out)
}

/// One line per peer, columns aligned.
fn format_peers(peers: &[PeerReport]) -> String {
    if peers.is_empty() {
        return "no connected peers\n".into();
    }
    let rows: Vec<[String; 5]> = peers
        .iter()
        .map(|p| {
            [
                p.peer_id.clone(),
                p.route.clone(),
                p.rtt_ms.map(|ms| format!("{ms:.1} ms")).unwrap_or_else(|| "-".into()),
                p.agent.clone().unwrap_or_else(|| "-".into()),
                p.address.clone(),
            ]
        })
        .collect();
    let header = ["PEER", "ROUTE", "RTT", "AGENT", "ADDRESS"].map(String::from);
    let widths: Vec<usize> =
        (0..5).map(|i| rows.iter().chain([&header]).map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_shows_missing_values() {
        let peers = vec![
            PeerReport {
                peer_id: "12D3KooWA".into(),
                address: "/ip4/127.0.0.1/tcp/4001".into(),
                route: "direct".into(),
                connections: 1,
                rtt_ms: Some(0.42),
                agent: Some("cosmicsync/0.1.0".into()),
                gossip_score: Some(0.0),
            },
            PeerReport {
                peer_id: "12D3KooWBB".into(),
                address: "/ip4/1.2.3.4/tcp/1/p2p/x/p2p-circuit".into(),
                route: "relayed".into(),
                connections: 2,
                rtt_ms: None,
                agent: None,
                gossip_score: None,
            },
        ];
        let text = format_peers(&peers);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("PEER        ROUTE    RTT     AGENT"), "{text}");
        assert!(lines[1].contains("direct   0.4 ms  cosmicsync/0.1.0"), "{text}");
        assert!(lines[2].contains("relayed  -       -"), "{text}");
        assert_eq!(format_peers(&[]), "no connected peers\n");
    }
}
