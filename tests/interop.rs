//! Interoperability with another libp2p implementation: a js-libp2p peer
//! (`tests/interop/js/peer.js`, versions pinned in its `package-lock.json`) joins a
//! network of real `cosmicsync` nodes on loopback, configured only with the same
//! protocol names (TCP + TLS 1.3 + yamux, identify, ping, `/cosmicsync/kad/1.0.0`).
//!
//! It checks both directions. The JS peer, knowing only node A: identifies A (agent
//! `cosmicsync/…`, the DHT, identify and ping protocols), pings it, and finds node B's
//! addresses through A's DHT. Our side: A lists the JS peer with its js-libp2p agent and
//! a ping time, and a third node C, started afterwards and knowing only A, finds the JS
//! peer through the DHT and dials it (the JS peer answers DHT queries, as a server).
//!
//! Needs Node.js 20+ and the peer's npm packages (`.ci/ensure-interop`, which `make test`
//! runs, installs them). Without them the test prints `SKIPPED: <reason>` and returns
//! (nextest shows its output, see `.config/nextest.toml`), except under `CI=true`, where
//! a missing tool fails it.

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::p2p::{bootstrap_addr, listen_addrs, peer_id, wait_peer};
use common::{Node, or_skip, wait_for};
use serde_json::Value;

/// How long anything here may take (generous: 2 shared cores, Node.js start-up included).
const DEADLINE: Duration = Duration::from_secs(90);

/// The JS peer's own limit for dialling, identify, ping and the lookup; below `DEADLINE`
/// so its own error message arrives first.
const JS_TIMEOUT_SECS: &str = "60";

/// The protocols our node must announce for another implementation to use it.
const KAD_PROTOCOL: &str = "/cosmicsync/kad/1.0.0";
const REQUIRED_PROTOCOLS: &[&str] = &[KAD_PROTOCOL, "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"];

/// Nodes on loopback answer DHT queries (no AutoNAT verdict would ever come).
const P2P: &[&str] = &["--kad-mode", "server"];

/// The JS peer's directory, or why it cannot run here.
fn js_peer_dir() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/js");
    let version = Command::new("node").arg("--version").output().map_err(|e| format!("`node` not found ({e})"))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    if major < 20 {
        return Err(format!("needs Node.js 20 or later, found `{version}`"));
    }
    // The stamp .ci/ensure-interop writes after `npm ci`: the hash of the lock it installed.
    let stamp = std::fs::read_to_string(dir.join("node_modules/.cosmicsync-lock.sha256"))
        .map_err(|_| "the js-libp2p packages are not installed (run .ci/ensure-interop)".to_owned())?;
    let lock = Command::new("sha256sum")
        .arg(dir.join("package-lock.json"))
        .output()
        .map_err(|e| format!("cannot run sha256sum ({e})"))?;
    let lock = String::from_utf8_lossy(&lock.stdout);
    if lock.split_whitespace().next() != Some(stamp.trim()) {
        return Err("the js-libp2p packages are out of date (run .ci/ensure-interop)".into());
    }
    Ok(dir)
}

/// The running JS peer: its report line arrives on a channel; dropping it closes its
/// stdin (its signal to disconnect and exit) and, if it lingers, kills it.
struct JsPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl JsPeer {
    fn start(dir: &Path, bootstrap: &str, target: &str) -> JsPeer {
        let mut child = Command::new("node")
            .arg("peer.js")
            .args([bootstrap, target, "--timeout", JS_TIMEOUT_SECS, "--kad-protocol", KAD_PROTOCOL])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the js-libp2p peer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        JsPeer { stdin: child.stdin.take(), child, lines, stderr: Some(stderr) }
    }

    /// The peer's one-line JSON report; panics with its error (and stderr) if it failed.
    async fn report(&mut self) -> Value {
        let line = wait_for("the js-libp2p peer's report", DEADLINE, || {
            let line = match self.lines.try_recv() {
                Ok(line) => Some(Ok(line)),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => Some(Err(())),
            };
            async move { line }
        })
        .await;
        let report: Option<Value> = line.as_deref().ok().and_then(|l| serde_json::from_str(l).ok());
        match report {
            Some(report) if report["ok"] == true => report,
            _ => panic!("the js-libp2p peer failed: {line:?}\nstderr:\n{}", self.finish().1),
        }
    }

    /// Closes stdin and waits (bounded) for the exit; returns the exit code and stderr.
    fn finish(&mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        let code = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (code, stderr)
    }
}

impl Drop for JsPeer {
    fn drop(&mut self) {
        if self.stderr.is_some() {
            self.finish();
        }
    }
}

/// `addr` without a trailing `/p2p/<id>`.
fn without_peer_id(addr: &str) -> &str {
    addr.find("/p2p/").map_or(addr, |i| &addr[..i])
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_libp2p_peer_identifies_pings_and_uses_the_dht_both_ways() {
    let Some(js_dir) = or_skip(js_peer_dir()) else { return };
    let a = Node::start(P2P).await;
    let bootstrap = bootstrap_addr(&a);
    let b = Node::start(&[P2P, &["--bootstrap", &bootstrap]].concat()).await;
    let (pa, pb) = (peer_id(&a), peer_id(&b));
    // A can answer a lookup of B once identify told it B's addresses.
    wait_peer(&a, &pb, "A to identify B", DEADLINE, |p| p["agent"].is_string()).await;

    let mut js = JsPeer::start(&js_dir, &bootstrap, &pb);
    let report = js.report().await;
    let pj = report["peer_id"].as_str().expect("the JS peer's id").to_owned();

    // (a) Identify: the JS peer learnt who A is and what it speaks.
    let id = &report["identify"];
    assert_eq!(id["peer_id"], pa.as_str(), "{report:#}");
    let agent = id["agent_version"].as_str().unwrap_or_default();
    assert!(agent.starts_with("cosmicsync/"), "A's agent as js-libp2p saw it: {report:#}");
    let protocols = strings(&id["protocols"]);
    for p in REQUIRED_PROTOCOLS {
        assert!(protocols.contains(p), "A announces {p}: {protocols:?}");
    }

    // (b) Ping over our ping protocol.
    let rtt = report["ping_rtt_ms"].as_f64().unwrap_or(-1.0);
    assert!(rtt >= 0.0, "a ping round-trip time: {report:#}");

    // (c) A's DHT told the JS peer where B is: the answer came from A and holds one of
    // the addresses B listens on.
    let lookup = &report["lookup"];
    assert_eq!(lookup["target"], pb.as_str());
    assert_eq!(lookup["from"], pa.as_str(), "the lookup was answered by A: {report:#}");
    let found = strings(&lookup["addrs"]);
    let b_addrs = listen_addrs(&b);
    assert!(
        found.iter().any(|f| b_addrs.iter().any(|l| l == without_peer_id(f))),
        "the DHT gave one of B's listen addresses {b_addrs:?}: {found:?}"
    );

    // (d) Our side: A sees the JS peer, its agent and a ping time (our ping to it)...
    let entry = wait_peer(&a, &pj, "A to identify and ping the JS peer", DEADLINE, |p| {
        p["agent"].is_string() && p["rtt_ms"].is_f64()
    })
    .await;
    let js_agent = entry["agent"].as_str().unwrap_or_default().to_owned();
    assert!(js_agent.starts_with("js-libp2p/"), "{entry:#}");
    let run = common::cli(&a.dir, &["network", "peers"]).expect(0);
    assert!(run.stdout.contains(&pj) && run.stdout.contains("js-libp2p/"), "{}", run.stdout);

    // ... and a node that joins after the JS peer and knows only A finds the JS peer
    // through the DHT: our DHT handed out the JS peer's address, the new node dialled it
    // there (so the JS peer is the listening side of TLS too) and the JS peer answered its
    // DHT query (a Kademlia lookup counts only peers that answered). B cannot show this:
    // the JS peer's own DHT walk connects it to B, so B may have learnt it first-hand.
    let c = Node::start(&[P2P, &["--bootstrap", &bootstrap]].concat()).await;
    let js_addrs: Vec<&str> = strings(&report["listen_addrs"]).into_iter().map(without_peer_id).collect();
    let found_js = wait_for("C to find the JS peer through the DHT", DEADLINE, || {
        let run = common::cli(&c.dir, &["network", "find-peer", &pj, "--json"]);
        let found = (run.code == Some(0)).then(|| run.json());
        async move { found }
    })
    .await;
    let addrs = strings(&found_js["addrs"]);
    assert!(
        addrs.iter().any(|f| js_addrs.contains(&without_peer_id(f))),
        "the DHT gave one of the JS peer's listen addresses {js_addrs:?}: {found_js:#}"
    );
    let c_entry = wait_peer(&c, &pj, "C to connect to the JS peer", DEADLINE, |p| p["agent"].is_string()).await;
    let c_addr = c_entry["address"].as_str().unwrap_or_default();
    assert!(js_addrs.contains(&without_peer_id(c_addr)), "C dialled the JS peer at its listen address: {c_entry:#}");

    let (code, stderr) = js.finish();
    assert_eq!(code, Some(0), "the JS peer stops cleanly when its stdin closes: {stderr}");
    eprintln!(
        "interop with {js_agent}: it identified A as {agent} and pinged it in {rtt:.1} ms (A pinged it in {:.1} ms); \
         it found B through A's DHT in {:.1} ms at {found:?}; C, knowing only A, found it in {:.1} ms at {addrs:?} \
         and dialled it at {c_addr}",
        entry["rtt_ms"].as_f64().unwrap_or(f64::NAN),
        lookup["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        found_js["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
    );
}
