//! `keys rotate` and `keys status`: the node's data keys, over the control socket.
//!
//! `rotate` asks the node for a new data key, then follows the re-sealing of existing
//! rows with a progress bar (on a terminal) until it is done. The work happens in the
//! node: interrupting this command does not interrupt it, and a node stopped halfway
//! resumes on its next start. Nothing here ever prints key bytes.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use cosmicsync::actors::keys::KeyStatus;
use cosmicsync::control::{self, ControlError, Request, Response};
use indicatif::{ProgressBar, ProgressStyle};

use super::{REQUEST_TIMEOUT, exit};

/// How often `rotate` asks the node how far it is.
const POLL: Duration = Duration::from_millis(200);

/// One request; `Ok(Err(code))` is an exit status to end with.
fn ask(data_dir: &Path, request: &Request) -> anyhow::Result<Result<KeyStatus, ExitCode>> {
    match control::request(data_dir, request, REQUEST_TIMEOUT) {
        Ok(Response::Ok { data }) => {
            Ok(Ok(serde_json::from_value(data).context("the node sent a key status this CLI cannot read")?))
        }
        Ok(Response::Error { status, message }) => {
            eprintln!("error: {message} ({status})");
            Ok(Err(ExitCode::FAILURE))
        }
        Err(ControlError::NotRunning(_)) => {
            eprintln!("not running (no node on {})", data_dir.display());
            Ok(Err(ExitCode::from(exit::NOT_RUNNING)))
        }
        Err(err) => Err(err.into()),
    }
}

fn describe(status: &KeyStatus) -> String {
    let rows: Vec<String> = status.rows_by_key.iter().map(|(k, n)| format!("key {k}: {n} rows")).collect();
    format!(
        "key file: {}\ncurrent data key: {}\nkeys in file: {:?}\nsealed rows: {}\n",
        status.key_file.display(),
        status.current_key,
        status.keys,
        if rows.is_empty() { "none".into() } else { rows.join(", ") }
    )
}

/// `keys status`: 0 answered, 1 refused, 3 no node running.
pub fn status(data_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let status = match ask(data_dir, &Request::KeysStatus)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", describe(&status));
        if let Some(p) = status.reseal.as_ref().filter(|p| !p.finished) {
            println!("re-sealing to key {}: {} of {} rows", p.target_key, p.done, p.total);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keys rotate`: 0 once every row is sealed under the new key (or at once with
/// `no_wait`), 1 refused, 3 no node running.
pub fn rotate(data_dir: &Path, no_wait: bool) -> anyhow::Result<ExitCode> {
    let mut status = match ask(data_dir, &Request::KeysRotate)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let target = status.reseal.as_ref().map_or(status.current_key, |p| p.target_key);
    println!("data key {target} seals new values; re-sealing existing rows under it");
    if no_wait {
        println!("follow with `cosmicsync keys status`");
        return Ok(ExitCode::SUCCESS);
    }
    // Drawn on stderr, and only on a terminal: a script sees the final lines alone.
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} re-sealing [{bar:40}] {pos}/{len} rows ({eta} left) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    loop {
        let progress = status.reseal.clone().unwrap_or_default();
        bar.set_length(progress.total);
        bar.set_position(progress.done.min(progress.total));
        bar.set_message(progress.last_error.clone().map(|e| format!("(waiting: {e})")).unwrap_or_default());
        if progress.finished {
            bar.finish_and_clear();
            println!("done: {} rows re-sealed under key {}", progress.done, progress.target_key);
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(POLL);
        status = match ask(data_dir, &Request::KeysStatus)? {
            Ok(s) => s,
            Err(code) => {
                bar.abandon();
                eprintln!("the re-sealing goes on in the node; it resumes by itself after a restart");
                return Ok(code);
            }
        };
    }
}
