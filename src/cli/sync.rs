//! `sync status`: a running node's replication, as a summary for a person or JSON for a
//! script. Read-only.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use cosmicsync::actors::sync::SyncStatus;
use cosmicsync::control::Request;

use super::query::show;

/// `sync status`.
pub fn status(data_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    show(data_dir, Request::SyncStatus, (!json).then_some(summary as fn(_) -> _))
}

fn summary(data: serde_json::Value) -> anyhow::Result<String> {
    let s: SyncStatus = serde_json::from_value(data).context("the node sent a sync status this CLI cannot read")?;
    Ok(format_status(&s))
}

fn format_status(s: &SyncStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node {} in network {}", s.node_id, s.network);
    let _ = writeln!(
        out,
        "open conflicts: {}   waiting for a dependency: {}   name clashes: {}",
        s.open_conflicts, s.waiting_for_dependency, s.name_clashes
    );
    let t = &s.totals;
    let _ = writeln!(
        out,
        "gossip: {} batches ({} changes) published, {} received, {} dropped; {} changes applied from peers",
        t.batches_published, t.changes_published, t.batches_received, t.batches_dropped, t.changes_applied
    );
    let _ = writeln!(out, "reconciliations: {} done, {} failed", t.sessions_done, t.sessions_failed);
    if s.peers.is_empty() {
        let _ = writeln!(out, "\nno peers yet");
    } else {
        let _ =
            writeln!(out, "\n{:<54} {:<9} {:<26} {:>8} {:>8}", "PEER", "STATE", "LAST RECONCILED", "SENT", "RECEIVED");
        for p in &s.peers {
            let last = p.last_reconciliation.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string());
            let _ = writeln!(
                out,
                "{:<54} {:<9} {:<26} {:>8} {:>8}",
                p.peer_id,
                if p.connected { "connected" } else { "gone" },
                last.as_deref().unwrap_or("never"),
                p.changes_sent,
                p.changes_received
            );
            if let Some(e) = &p.last_error {
                let _ = writeln!(out, "  last error: {e}");
            }
        }
    }
    if !s.origins.is_empty() {
        let _ = writeln!(out, "\n{:<34} {:>10}", "ORIGIN", "WRITES HELD");
        for o in &s.origins {
            let _ = writeln!(out, "{:<34} {:>10}", o.origin, o.writes);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_every_part() {
        let s: SyncStatus = serde_json::from_value(serde_json::json!({
            "node_id": "n1", "network": "abcd", "waiting_for_dependency": 2, "open_conflicts": 1, "name_clashes": 0,
            "peers": [{"peer_id": "12D3KooWA", "connected": true, "changes_sent": 3, "changes_received": 4,
                       "session_bytes": 10}],
            "origins": [{"origin": "n1", "writes": 7}],
            "totals": {"batches_published": 1, "changes_published": 1, "batches_received": 0, "batches_dropped": 0,
                       "changes_applied": 0, "sessions_done": 1, "sessions_failed": 0, "conflicts_found": 0}
        }))
        .unwrap();
        let text = format_status(&s);
        for part in ["network abcd", "open conflicts: 1", "waiting for a dependency: 2", "12D3KooWA", "never", "n1"] {
            assert!(text.contains(part), "{part} missing from:\n{text}");
        }
    }
}
