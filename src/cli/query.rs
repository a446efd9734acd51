//! `status` and the read-only queries (`users get`, `projects list`, …): one request
//! over the control socket, the answer printed for a person or as JSON for a script.
//!
//! Output goes to stdout only on success, so `… | jq` never sees an error message;
//! these commands must never change anything on the node.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
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
    match control::request(data_dir, &request, REQUEST_TIMEOUT) {
        Ok(Response::Ok { data }) => {
            println!("{}", serde_json::to_string_pretty(&data)?);
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
    for (i, shard) in r.shards.iter().enumerate() {
        // Shard health is a loose JSON object on the wire: show what is there.
        let index = shard.get("shard").and_then(|v| v.as_u64()).map_or_else(|| i.to_string(), |n| n.to_string());
        let state = shard.get("state").and_then(|v| v.as_str()).unwrap_or("unknown");
        let restarts = shard.get("restarts").and_then(|v| v.as_u64()).unwrap_or(0);
        let since = shard.get("since_secs").and_then(|v| v.as_u64()).map(duration).unwrap_or_default();
        let _ = write!(out, "  shard {index:<3} {state:<11} restarts {restarts:<4} for {since}");
        if let Some(error) = shard.get("last_error").and_then(|v| v.as_str()) {
            let _ = write!(out, "  last error: {error}");
        }
        out.push('\n');
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
    use serde_json::json;

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
                json!({"shard": 0, "state": "up", "since_secs": 5, "restarts": 0}),
                json!({"shard": 1, "state": "down", "since_secs": 2, "restarts": 3, "last_error": "refused"}),
                json!("something unexpected"),
            ],
        };
        let text = summary(&report);
        for needle in ["node:     abc", "pid:      42", "uptime:   1m 1s", "ready:    no", "shards:   3"] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
        assert!(text.contains("shard 1   down        restarts 3    for 2s  last error: refused"), "{text}");
        assert!(text.contains("shard 2   unknown"), "{text}");
    }
}
