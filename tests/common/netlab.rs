//! Helpers for the tests that run nodes in Linux network namespaces (`tests/nat.rs`,
//! `tests/lan.rs`): what they need to run, the lock they share, the NAT lab of
//! `../shared/netlab/natlab.sh`, starting a node inside a namespace and reading its
//! network report over the control socket.
//!
//! Namespace names are global to the machine, so every test that creates namespaces
//! holds `LOCK` while they exist; nothing here ever sleeps to synchronise.

use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cosmicsync::control::{self, Request, Response};
use serde_json::Value;

use super::Node;

/// Generous: AutoNAT needs a probe to time out before it says "private".
pub const DEADLINE: Duration = Duration::from_secs(180);

/// The lock every namespace test holds while its namespaces exist.
pub const LOCK: &str = "/tmp/cosmicsync-natlab.lock";

/// Listen on fixed ports on every interface, as a node behind a home router would.
pub const LISTEN: &[&str] =
    &["--p2p-listen", "/ip4/0.0.0.0/tcp/4001", "--p2p-listen", "/ip4/0.0.0.0/udp/4001/quic-v1", "--kad-refresh", "10"];

/// Ok when this process is root and every tool in `tools` is on the PATH; else why not.
pub fn require(tools: &[&str]) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root to create network namespaces".into());
    }
    for tool in tools {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Err(format!("`{tool}` is not installed (run .ci/ensure-netlab)"));
        }
    }
    Ok(())
}

/// Takes `LOCK` (blocking until the test holding it is done); released when dropped.
pub fn lock() -> Result<std::fs::File, String> {
    let lock = std::fs::File::create(LOCK).map_err(|e| format!("cannot create {LOCK}: {e}"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err("cannot lock the lab".into());
    }
    Ok(lock)
}

/// Runs a command to set the lab up; its stderr is the error.
pub fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lab script, or why the test cannot run.
fn natlab() -> Result<PathBuf, String> {
    require(&["ip", "nft", "iptables", "conntrack"])?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/netlab/natlab.sh");
    if !script.exists() {
        return Err(format!("{} not found (the shared/ directory beside the repository)", script.display()));
    }
    Ok(script)
}

/// natlab's namespaces, torn down on drop (also when the test fails), built under `LOCK`.
pub struct Lab {
    script: PathBuf,
    _lock: std::fs::File,
}

impl Lab {
    /// The lab with router `nat-a` of NAT type `nat_a` and `nat-b` of `nat_b` (`eim`/`sym`).
    pub fn up(nat_a: &str, nat_b: &str) -> Result<Lab, String> {
        let script = natlab()?;
        let lab = Lab { script, _lock: lock()? };
        lab.run(&["down"]);
        let out = lab.run(&["up", "--nat-a", nat_a, "--nat-b", nat_b]);
        if !out.status.success() {
            return Err(format!("natlab up failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(lab)
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("bash").arg(&self.script).args(args).output().expect("run natlab.sh")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.run(&["down"]);
    }
}

/// Starts a node inside namespace `ns`, listening as `LISTEN` says, with `extra` arguments.
pub async fn node_in(ns: &str, extra: &[&str]) -> Node {
    let args: Vec<&str> = LISTEN.iter().chain(extra).copied().collect();
    Node::start_wrapped_temp(&["ip", "netns", "exec", ns], &args).await
}

/// The network report over the control socket (it works across network namespaces).
pub fn network(node: &Node) -> Option<Value> {
    match control::request(&node.dir, &Request::Status, Duration::from_secs(30)) {
        Ok(Response::Ok { data }) => Some(data["network"].clone()).filter(|n| !n.is_null()),
        _ => None,
    }
}
