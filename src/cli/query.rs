//! `status` and the read-only queries (`users get`, `projects list`, …): one request
//! over the control socket, the answer printed for a person or as JSON for a script.
//!
//! Output goes to stdout only on success, so `… | jq` never sees an error message;
//! these commands must never change anything on the node.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use cosmicsync::actors::shard::ShardState;
use cosmicsync::actors::supervisor::StatusReport;
use cosmicsync::boot::read_node_info;
use cosmicsync::control::{self, ControlError, Request, Response};

use super::{REQUEST_TIMEOUT, exit};
use crate::cli::node::is_node_process;

/// `status`: 0 when a node answers, 3 when none runs.
pub fn status(data_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    match control::request(data_dir, &Request::Status, REQUEST_TIMEOUT) {
        Ok(Response::Ok { data }) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                let report: StatusReport =
                    serde_json::from_value(data).context("the node sent a status report this CLI cannot read")?;
                print!("{}", summary(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(Response::Error { status, message }) => {
            anyhow::bail!("the node cannot report its status ({status}): {message}")
        }
        Err(err @ ControlError::NotRunning(_)) => {
            // A live node process with no socket is a broken node, not a stopped one.
            if let Some(pid) = read_node_info(data_dir).map(|i| i.pid).filter(|pid| is_node_process(*pid)) {
                anyhow::bail!("the node (pid {pid}) is running, but {err}");
            }
            not_running(data_dir, json);
            Ok(ExitCode::from(exit::NOT_RUNNING))
        }
        Err(err) => Err(err.into()),
    }
}

/// A query whose answer is printed as pretty JSON: 0 found, 1 refused (not found, bad
/// cursor…), 3 no node running.
pub fn print(data_dir: &Path, request: Request) -> anyhow::Result<ExitCode> {
    show(data_dir, request, None)
}

/// A query whose answer is printed by `human` for a person, or as pretty JSON when
/// `human` is `None`; exit statuses as `print`.
pub fn show(
    data_dir: &Path,
    request: Request,
    human: Option<fn(serde_json::Value) -> anyhow::Result<String>>,
) -> anyhow::Result<ExitCode> {
    match control::request(data_dir, &request, REQUEST_TIMEOUT) {
        Ok(Response::Ok { data }) => {
            match human {
                Some(human) => print!("{}", human(data)?),
                None => println!("{}", serde_json::to_string_pretty(&data)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(Response::Error { status, message }) => {
            eprintln!("error: {message} ({status})");
            Ok(ExitCode::FAILURE)
        }
        Err(ControlError::NotRunning(_)) => {
            not_running(data_dir, true);
            Ok(ExitCode::from(exit::NOT_RUNNING))
        }
        Err(err) => Err(err.into()),
    }
}

/// Says so on stdout for a person, on stderr when stdout is meant for JSON.
fn not_running(data_dir: &Path, json: bool) {
    let message = format!("not running (no node on {})", data_dir.display());
    if json {
        eprintln!("{message}");
    } else {
        println!("{message}");
    }
}

/// The human-readable status.
fn summary(r: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node:     {}", r.node_id);
    let _ = writeln!(out, "version:  {}", r.version);
    let _ = writeln!(out, "pid:      {}", r.pid);
    let _ = writeln!(out, "uptime:   {}", duration(r.uptime_secs));
    let _ = writeln!(out, "api:      {}", r.api_url);
    let _ = writeln!(out, "storage:  {}", r.storage);
    let _ = writeln!(out, "ready:    {}", if r.ready { "yes" } else { "no" });
    let _ = writeln!(out, "shards:   {}", r.shards.len());
    for shard in &r.shards {
        let state = match shard.state {
            ShardState::Up => "up",
            ShardState::Down => "down",
            ShardState::Connecting => "connecting",
        };
        let _ = write!(
            out,
            "  shard {:<3} {state:<11} restarts {:<4} for {}",
            shard.shard,
            shard.restarts,
            duration(shard.since_secs)
        );
        if let Some(error) = &shard.last_error {
            let _ = write!(out, "  last error: {error}");
        }
        out.push('\n');
    }
    if let Some(events) = &r.events {
        let _ = writeln!(out, "events:   {} WebSocket sessions, delivered up to seq {}", events.sessions, events.seq);
    }
    if let Some(reco) = &r.recommendations {
        let every = reco.interval_secs.map_or("on demand only".to_owned(), |s| format!("every {}", duration(s)));
        let _ = writeln!(out, "recommendations: k {}, {every}", reco.k);
        match &reco.last_run {
            Some(run) => {
                let _ = writeln!(
                    out,
                    "  last run {} for {} users, took {:.1}s",
                    run.finished_at.to_rfc3339(),
                    run.users,
                    run.duration_ms as f64 / 1000.0
                );
            }
            None => out.push_str("  no run has finished yet\n"),
        }
        if let Some(p) = &reco.running {
            let _ = writeln!(out, "  running: {:?} {}/{}", p.phase, p.done, p.total);
        }
        if let Some(f) = &reco.last_failure {
            let _ = writeln!(out, "  last run failed at {}: {}", f.failed_at.to_rfc3339(), f.error);
        }
    }
    if let Some(n) = &r.network {
        let _ = writeln!(
            out,
            "network:  peer {}, {} connected, NAT {}, {} in the routing table{}",
            n.peer_id,
            n.peers.len(),
            n.nat_status,
            n.routing_table_size,
            match n.restarts {
                0 => String::new(),
                k => format!(", restarted {k} times"),
            }
        );
    }
    out
}

/// `3725` → `1h 2m 5s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosmicsync::actors::event_hub::HubStatus;
    use cosmicsync::actors::shard::ShardHealth;

    #[test]
    fn durations_read_naturally() {
        for (secs, text) in [(0, "0s"), (59, "59s"), (61, "1m 1s"), (3725, "1h 2m 5s"), (90_061, "1d 1h 1m")] {
            assert_eq!(duration(secs), text);
        }
    }

    #[test]
    fn summary_shows_every_shard_and_readiness() {
        let report = StatusReport {
            node_id: "abc".into(),
            version: "0.1.0".into(),
            pid: 42,
            uptime_secs: 61,
            api_url: "https://127.0.0.1:8443".into(),
            storage: "embedded".into(),
            ready: false,
            shards: vec![
                ShardHealth { shard: 0, state: ShardState::Up, since_secs: 5, restarts: 0, last_error: None },
                ShardHealth {
                    shard: 1,
                    state: ShardState::Down,
                    since_secs: 2,
                    restarts: 3,
                    last_error: Some("refused".into()),
                },
            ],
            events: Some(HubStatus { sessions: 2, seq: 17, pending_reports: 0 }),
            recommendations: None,
            network: None,
        };
        let text = summary(&report);
        for needle in
            ["node:     abc", "pid:      42", "uptime:   1m 1s", "ready:    no", "shards:   2", "2 WebSocket sessions"]
        {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
        assert!(text.contains("shard 1   down        restarts 3    for 2s  last error: refused"), "{text}");
    }
}
