//! `recommend run`: starts a recommendation run on the node (or joins the one going on)
//! and follows it to the end over the control socket, with a progress bar for a person.
//!
//! The bar goes to stderr and only when stdout is a terminal and `--json` is not given,
//! so scripts get clean output. This command must never touch the node's data itself.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cosmicsync::actors::recommend::{Phase, RecommendStatus};
use cosmicsync::control::{self, ControlError, Request, Response};
use indicatif::{ProgressBar, ProgressStyle};

use super::{REQUEST_TIMEOUT, exit};

/// How often the run's progress is asked for.
const POLL: Duration = Duration::from_millis(200);

/// One request whose answer must be `Ok`; `None` when no node runs.
fn ask(data_dir: &Path, request: &Request) -> anyhow::Result<Option<serde_json::Value>> {
    match control::request(data_dir, request, REQUEST_TIMEOUT) {
        Ok(Response::Ok { data }) => Ok(Some(data)),
        Ok(Response::Error { status, message }) => bail!("the node refused ({status}): {message}"),
        Err(ControlError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn not_running(data_dir: &Path) -> ExitCode {
    eprintln!("not running (no node on {})", data_dir.display());
    ExitCode::from(exit::NOT_RUNNING)
}

/// `recommend run`: 0 the run finished and its results are served; 1 it failed (the
/// previous results stay); 3 no node runs.
pub fn run(data_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let Some(started) = ask(data_dir, &Request::RecommendRun)? else { return Ok(not_running(data_dir)) };
    let generation =
        started.get("generation").and_then(|g| g.as_i64()).context("the node did not say which run it started")?;
    let bar = if json || !std::io::stdout().is_terminal() { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} users ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    loop {
        let Some(data) = ask(data_dir, &Request::RecommendStatus)? else {
            bar.abandon();
            return Ok(not_running(data_dir));
        };
        let status: RecommendStatus =
            serde_json::from_value(data).context("the node sent a recommendation status this CLI cannot read")?;
        match &status.running {
            Some(p) if p.generation == generation => {
                bar.set_message(phase_name(p.phase));
                bar.set_length(p.total);
                bar.set_position(p.done);
            }
            _ => {
                bar.finish_and_clear();
                return finish(&status, generation, json);
            }
        }
        std::thread::sleep(POLL);
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Reading => "reading",
        Phase::Computing => "computing",
        Phase::Writing => "writing",
        Phase::Activating => "activating",
    }
}

/// Reports how run `generation` ended.
fn finish(status: &RecommendStatus, generation: i64, json: bool) -> anyhow::Result<ExitCode> {
    if let Some(last) = status.last_run.as_ref().filter(|r| r.generation == generation) {
        if json {
            println!("{}", serde_json::to_string_pretty(last)?);
        } else {
            println!(
                "recommendations computed for {} users in {:.1} s (run {generation}, served since {})",
                last.users,
                last.duration_ms as f64 / 1000.0,
                last.finished_at.to_rfc3339()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    match status.last_failure.as_ref().filter(|f| f.generation == generation) {
        Some(failure) => {
            eprintln!("error: the recommendation run failed; the previous results stay in place: {}", failure.error);
            Ok(ExitCode::FAILURE)
        }
        None => bail!("run {generation} ended but the node reports neither its results nor its failure"),
    }
}
