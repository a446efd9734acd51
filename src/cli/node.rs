//! `start --detach` and `stop`: a node's process lifecycle seen from outside.
//!
//! A detached node is this same binary re-executed without `--detach` in a new session;
//! it announces itself by writing `<data-dir>/node.json` with its pid. `stop` asks over
//! the control socket and falls back to SIGTERM, then returns only once the node and its
//! own PostgreSQL (pid from `<data-dir>/pg/postmaster.pid`) are gone: no thread of them
//! runs, and they have been reaped (or `REAP_GRACE` passed: a zombie holds nothing but
//! its pid, and only its parent can reap it). This module must never signal a pid it
//! has not checked is a live `cosmicsync` process (a stale node.json may name a pid the
//! kernel has since given to someone else), and never pid 0 or -1 (process groups).

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cosmicsync::boot::read_node_info;
use cosmicsync::config::{GlobalOptions, NodeArgs, NodeConfig};
use cosmicsync::control::{self, ControlError, Request, Response};

use super::exit;

/// How long `start --detach` waits for the node to report ready.
const READY_DEADLINE: Duration = Duration::from_secs(120);

/// How long `stop` waits for an answer on the control socket before it signals.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `stop` waits for the parent of an exited process (the node, its PostgreSQL)
/// to reap it: until then `ps` and `kill -0` still show it. Some inits reap lazily.
const REAP_GRACE: Duration = Duration::from_secs(10);

/// How often a wait re-checks its condition.
const POLL: Duration = Duration::from_millis(50);

/// How many lines of node.log a failed detached start shows.
const LOG_TAIL_LINES: usize = 40;

/// Starts a node in the background and returns once it has written node.json.
pub fn start_detached(global: &GlobalOptions, args: &NodeArgs) -> anyhow::Result<ExitCode> {
    // Resolving here fails fast on a bad option, and finds the data directory even
    // when only the --config file names it.
    let data_dir = NodeConfig::resolve(global, args)?.data_dir;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    if let Ok(Response::Ok { .. }) = control::request(&data_dir, &Request::Status, Duration::from_secs(5)) {
        bail!("a node is already running on {}", data_dir.display());
    }

    let log_path = data_dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find this program's path to start the node")?;
    let child_args: Vec<OsString> = std::env::args_os().skip(1).filter(|a| a != "--detach").collect();

    let mut command = Command::new(exe);
    command.args(child_args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the forked child.
    // A new session detaches the node from this terminal (no SIGHUP or Ctrl-C from it).
    unsafe {
        command.pre_exec(|| if libc::setsid() == -1 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = command.spawn().context("cannot start the node process")?;
    let pid = child.id();

    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().context("cannot watch the node process")? {
            eprintln!("error: the node exited during start ({status}); the end of {}:", log_path.display());
            eprintln!("{}", log_tail(&log_path, log_start, LOG_TAIL_LINES));
            return Ok(ExitCode::FAILURE);
        }
        if let Some(info) = read_node_info(&data_dir).filter(|i| i.pid == pid) {
            println!("node started (pid {pid})");
            println!("api: {}", info.api_url);
            println!("log: {}", log_path.display());
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            // It may still come up (a slow disk, a big recovery): leave it running.
            bail!(
                "the node (pid {pid}) was not ready after {} s; it is still starting — see {}, or `cosmicsync stop` it",
                READY_DEADLINE.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// The last `lines` lines written to the log since `from`.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = Vec::new();
    let read = std::fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_end(&mut text)
    });
    if let Err(e) = read {
        return format!("(cannot read the log: {e})");
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops the node on `data_dir`: 0 stopped, 1 none running, 2 still running after `timeout`.
pub fn stop(data_dir: &Path, timeout: Duration) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    let recorded = read_node_info(data_dir).map(|i| i.pid);
    // Read before the node stops it (which removes the file); only a live `postgres`.
    let postgres = cosmicsync::embedded_pg::postmaster_pid(&data_dir.join("pg"))
        .filter(|pid| pid_alive(*pid) && comm(*pid).as_deref() == Some("postgres"));
    // Leave time for the SIGTERM fallback if the node is wedged and never answers.
    let ask_timeout = timeout.min(CONTROL_TIMEOUT);
    let pid = match control::request(data_dir, &Request::Stop, ask_timeout) {
        Ok(Response::Ok { data }) => {
            // The node tells us its pid: node.json may not be written yet (still starting).
            match data.get("pid").and_then(|p| p.as_u64()).and_then(|p| u32::try_from(p).ok()).or(recorded) {
                Some(pid) => pid,
                None => bail!("the node accepted the stop but did not say its pid"),
            }
        }
        Ok(Response::Error { status, message }) => bail!("the node refused to stop ({status}): {message}"),
        Err(err) => {
            // No answer on the socket: if node.json names a live node, SIGTERM does the
            // same graceful stop.
            match recorded.filter(|pid| is_node_process(*pid)) {
                Some(pid) => {
                    terminate(pid)
                        .with_context(|| format!("the control socket failed ({err}); cannot signal {pid}"))?;
                    eprintln!("cannot reach the node ({err}); sent SIGTERM to pid {pid}");
                    pid
                }
                None if matches!(err, ControlError::NotRunning(_)) => {
                    println!("not running (no node on {})", data_dir.display());
                    return Ok(ExitCode::FAILURE);
                }
                None => return Err(err.into()),
            }
        }
    };
    for (what, pid) in std::iter::once(("the node", pid)).chain(postgres.map(|pg| ("its PostgreSQL", pg))) {
        if !wait_gone(pid, deadline) {
            eprintln!("error: {what} (pid {pid}) is still running after {} s", timeout.as_secs());
            return Ok(ExitCode::from(exit::TIMED_OUT));
        }
    }
    println!("stopped (pid {pid})");
    Ok(ExitCode::SUCCESS)
}

/// Waits until `pid` has exited and been reaped (or has been exited for `REAP_GRACE`);
/// false if it still runs at `deadline`.
fn wait_gone(pid: u32, deadline: Instant) -> bool {
    let mut exited_at = None;
    loop {
        if !pid_exists(pid) {
            return true;
        }
        if pid_alive(pid) {
            if Instant::now() >= deadline {
                return false;
            }
        } else if exited_at.get_or_insert_with(Instant::now).elapsed() >= REAP_GRACE {
            return true;
        }
        std::thread::sleep(POLL);
    }
}

/// A pid we may signal: never 0, 1 or negative once cast (those address groups or
/// everything), and never ourselves.
fn signalable(pid: u32) -> Option<libc::pid_t> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    (pid > 1 && pid as u32 != std::process::id()).then_some(pid)
}

/// Whether `pid` is in the process table at all (running, or a zombie not yet reaped).
fn pid_exists(pid: u32) -> bool {
    let Some(raw) = signalable(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let sent = unsafe { libc::kill(raw, 0) };
    sent == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `pid` exists and has not exited. A zombie counts as exited, unless one of its
/// threads still runs (the main thread of an exiting process turns zombie before the
/// others are gone, and they may still hold its sockets and files).
fn pid_alive(pid: u32) -> bool {
    if !pid_exists(pid) {
        return false;
    }
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks.flatten().any(|task| !is_zombie(&task.path().join("stat"))),
        // Without /proc there is nothing more to learn: it exists.
        Err(_) => true,
    }
}

/// `stat` files have the state right after the parenthesised command name.
fn is_zombie(stat: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(stat) else { return true };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next());
    matches!(state, Some('Z' | 'X'))
}

/// The program name of `pid`, from /proc.
fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim().to_owned())
}

/// Whether `pid` is alive and runs a program with this one's name.
pub fn is_node_process(pid: u32) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let ours = std::fs::read_to_string("/proc/self/comm").ok().map(|c| c.trim().to_owned());
    match (comm(pid), ours) {
        (Some(theirs), Some(ours)) => theirs == ours,
        // Without /proc there is nothing to compare; the pid is alive and recorded.
        _ => true,
    }
}

/// Sends SIGTERM (the node stops gracefully on it).
fn terminate(pid: u32) -> std::io::Result<()> {
    let Some(raw) = signalable(pid) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("refusing to signal pid {pid}")));
    };
    // SAFETY: plain kill(2) on a single, checked pid.
    if unsafe { libc::kill(raw, libc::SIGTERM) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_signals_groups_or_itself() {
        for pid in [0, 1, u32::MAX, std::process::id()] {
            assert_eq!(signalable(pid), None, "{pid}");
            assert!(terminate(pid).is_err(), "{pid}");
        }
    }

    #[test]
    fn a_reaped_child_is_gone_and_a_zombie_counts_as_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(pid_alive(pid));
        if Path::new("/proc/self/comm").exists() {
            assert!(!is_node_process(pid), "`sleep` is not a node");
        }
        terminate(pid).unwrap();
        // Unreaped, it is a zombie; wait for that observable state with a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) {
            assert!(Instant::now() < deadline, "SIGTERM did not end `sleep`");
            std::thread::sleep(POLL);
        }
        child.wait().unwrap();
        assert!(!pid_alive(pid));
    }

    #[test]
    fn log_tail_shows_only_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.log");
        std::fs::write(&path, "old run\n").unwrap();
        let from = std::fs::metadata(&path).unwrap().len();
        let mut text = String::from("old run\n");
        for i in 0..100 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, from, 3);
        assert_eq!(tail, "line 97\nline 98\nline 99");
        assert!(log_tail(&dir.path().join("missing"), 0, 3).contains("cannot read"));
    }
}
