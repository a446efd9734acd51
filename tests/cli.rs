//! The `cosmicsync` command line end to end: the real binary starting, querying and
//! stopping a real node (with its own PostgreSQL) through its control socket, checked
//! against what the REST API says.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{FAST, Node, TestUser, cli, cli_env};
use reqwest::Method;
use serde_json::{Value, json};

/// Whether `pid` still runs (a zombie nobody has reaped yet does not).
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}

/// A node started with `start --detach`. Dropping it makes sure the node and its
/// PostgreSQL are gone even when an assertion failed half-way.
struct Detached {
    dir: PathBuf,
    pid: u32,
    _temp: Option<tempfile::TempDir>,
}

impl Detached {
    /// `start --detach` with `args` (and `env`) in a fresh temp directory.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Detached {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_owned();
        let mut all = vec!["start", "--detach"];
        all.extend_from_slice(args);
        let run = cli_env(&dir, &all, env).expect(0);
        let info = read_info(&dir).expect("node.json after a detached start");
        let pid = info["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("pid");
        assert!(run.stdout.contains(&format!("api: {}", info["api_url"].as_str().unwrap_or("?"))), "{run:#?}");
        assert!(run.stdout.contains(&format!("log: {}", dir.join("node.log").display())), "{run:#?}");
        assert!(pid_alive(pid), "node.json names pid {pid}, which is not running");
        Detached { dir, pid, _temp: Some(temp) }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if pid_alive(self.pid) {
            // SAFETY: signalling the node this test started (checked alive above).
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60);
            while pid_alive(self.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(self.pid) {
                // SAFETY: as above.
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            }
        }
        common::stop_cluster(&self.dir);
    }
}

fn read_info(dir: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("node.json")).ok()?).ok()
}

/// Sends a REST request and returns its JSON body, which must come with `status`.
async fn rest_json(req: reqwest::RequestBuilder, status: u16) -> Value {
    let res = req.send().await.expect("REST request");
    assert_eq!(res.status(), status, "unexpected REST status");
    res.json().await.expect("JSON body")
}

#[tokio::test]
async fn detached_node_lifecycle_and_queries() {
    let node = Detached::start(FAST, &[]);
    let dir = node.dir.as_path();
    let info = read_info(dir).expect("node.json");

    // status: a summary for people, the StatusReport for scripts.
    let run = cli(dir, &["status"]).expect(0);
    for needle in [
        format!("pid:      {}", node.pid),
        format!("api:      {}", info["api_url"].as_str().unwrap_or("?")),
        "ready:    yes".to_owned(),
        "shards:   4".to_owned(),
        "storage:  embedded".to_owned(),
    ] {
        assert!(run.stdout.contains(&needle), "{needle:?} missing: {run:#?}");
    }
    let report = cli(dir, &["status", "--json"]).expect(0).json();
    assert_eq!(report["pid"], node.pid);
    assert_eq!(report["node_id"], info["node_id"]);
    assert_eq!(report["ready"], true);
    let shards = report["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 4);
    assert!(shards.iter().all(|s| s["state"] == "up" && s["restarts"].is_u64()), "{report:#}");
    let network = cli(dir, &["network", "status"]).expect(0).json();
    assert_eq!(network["node_id"], info["node_id"]);

    // A second node on the same directory is refused before it starts anything.
    let run = cli(dir, &["start", "--detach", "--http-addr", "127.0.0.1:0"]).expect(1);
    assert!(run.stderr.contains("already running"), "{run:#?}");

    // Data written over REST reads back the same through the CLI.
    let api = Node::attach(dir);
    let ada: TestUser = api.user("ada").await;
    let bob: TestUser = api.user("bob").await;
    let ada_public = rest_json(api.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &bob), 200).await;
    let got = cli(dir, &["users", "get", &ada.id.to_string()]).expect(0).json();
    assert_eq!(got, ada_public);
    assert_eq!(got["username"], "ada");
    assert!(got.get("email").is_none() && got.get("password_hash").is_none(), "{got:#}");

    let profile = rest_json(api.req(Method::GET, &format!("/api/v1/profiles/{}", ada.profile_id), &ada), 200).await;
    assert_eq!(cli(dir, &["profiles", "get", &ada.profile_id.to_string()]).expect(0).json(), profile);

    let mut projects = Vec::new();
    for name in ["first", "second"] {
        let body = json!({ "name": name, "description": "d", "tags": ["cli"] });
        let res = api.req(Method::POST, "/api/v1/projects", &ada).json(&body);
        projects.push(rest_json(res, 201).await);
    }
    let bobs = api.req(Method::POST, "/api/v1/projects", &bob).json(&json!({ "name": "bobs", "description": "" }));
    let bobs = rest_json(bobs, 201).await;
    let id = projects[0]["id"].as_str().expect("project id");
    assert_eq!(cli(dir, &["projects", "get", id]).expect(0).json(), projects[0]);

    let rest_page = rest_json(api.req(Method::GET, "/api/v1/projects", &ada), 200).await;
    let page = cli(dir, &["projects", "list"]).expect(0).json();
    assert_eq!(page, rest_page);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(3), "{page:#}");

    // Paging through one creator's projects, newest first.
    let creator = ada.id.to_string();
    let first = cli(dir, &["projects", "list", "--creator", &creator, "--limit", "1"]).expect(0).json();
    assert_eq!(first["items"][0], projects[1]);
    let cursor = first["next_cursor"].as_str().expect("a full page has a next_cursor");
    let second = cli(dir, &["projects", "list", "--creator", &creator, "--limit", "1", "--cursor", cursor]);
    assert_eq!(second.expect(0).json()["items"][0], projects[0]);
    let theirs = cli(dir, &["projects", "list", "--creator", &bob.id.to_string()]).expect(0).json();
    assert_eq!(theirs["items"], json!([bobs]));

    // Refusals: the node's message on stderr, exit 1, nothing on stdout.
    let missing = uuid::Uuid::now_v7().to_string();
    let missing = missing.as_str();
    for args in [["users", "get", missing], ["profiles", "get", missing], ["projects", "get", missing]] {
        let run = cli(dir, &args).expect(1);
        assert!(run.stderr.contains("not found") && run.stdout.is_empty(), "{run:#?}");
    }
    let run = cli(dir, &["projects", "list", "--cursor", "garbage"]).expect(1);
    assert!(run.stderr.contains("cursor"), "{run:#?}");
    let run = cli(dir, &["projects", "list", "--limit", "100000"]).expect(1);
    assert!(run.stderr.contains("limit"), "{run:#?}");

    // stop: the node exits, and cleans up after itself. It returns only once the node
    // and its PostgreSQL are gone from the process table, not merely exiting: the
    // detached node's parent is init, which reaps it.
    let postgres: u32 = std::fs::read_to_string(dir.join("pg/postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse().ok())
        .expect("the node's PostgreSQL pid");
    let run = cli(dir, &["stop"]).expect(0);
    assert!(run.stdout.contains(&format!("stopped (pid {})", node.pid)), "{run:#?}");
    for (what, pid) in [("the node", node.pid), ("its PostgreSQL", postgres)] {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{what} (pid {pid}) is still there after `stop`");
    }
    assert!(!dir.join("node.json").exists(), "node.json left behind");
    assert!(!dir.join("control.sock").exists(), "control socket left behind");
    let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    assert!(log.contains("node stopped"), "node.log:\n{log}");

    // And once it is gone, every command says so.
    let run = cli(dir, &["stop"]).expect(1);
    assert!(run.stdout.contains("not running"), "{run:#?}");
    let run = cli(dir, &["status"]).expect(3);
    assert!(run.stdout.contains("not running"), "{run:#?}");
    let run = cli(dir, &["status", "--json"]).expect(3);
    assert!(run.stdout.is_empty() && run.stderr.contains("not running"), "{run:#?}");
    let run = cli(dir, &["users", "get", &ada.id.to_string()]).expect(3);
    assert!(run.stderr.contains("not running"), "{run:#?}");
}

/// flags > `COSMICSYNC_*` > `--config` file > defaults, observed on a running node: the
/// listen address in node.json, the shard count in its status and the log format of
/// node.log. (Every layer asks for port 0; they differ in the loopback address.)
#[test]
fn config_precedence_and_stop_by_signal() {
    let conf_dir = tempfile::tempdir().expect("temp dir");
    let conf = conf_dir.path().join("node.toml");
    std::fs::write(&conf, "http_addr = \"127.0.0.2:0\"\nshards = 3\nlog_format = \"json\"\nbcrypt_cost = 5\n[p2p]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n")
        .expect("write config");
    let conf = conf.to_string_lossy().into_owned();

    let node = Detached::start(
        &["--config", &conf, "--http-addr", "127.0.0.4:0", "--bcrypt-cost", "4"],
        &[("COSMICSYNC_HTTP_ADDR", "127.0.0.3:0"), ("COSMICSYNC_SHARDS", "2")],
    );
    let dir = node.dir.as_path();
    let info = read_info(dir).expect("node.json");
    let api_url = info["api_url"].as_str().expect("api_url");
    assert!(api_url.starts_with("https://127.0.0.4:"), "the flag should win: {api_url}");
    let report = cli(dir, &["status", "--json"]).expect(0).json();
    assert_eq!(report["shards"].as_array().map(Vec::len), Some(2), "the env should beat the file: {report:#}");
    let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    let starting = log.lines().find(|l| l.contains("node starting")).unwrap_or_default();
    assert!(
        serde_json::from_str::<Value>(starting).is_ok_and(|v| v["msg"] == "node starting"),
        "the file's log_format = json should apply: {log}"
    );

    // With the control socket gone, `stop` falls back to SIGTERM on node.json's pid.
    std::fs::remove_file(dir.join("control.sock")).expect("remove control socket");
    let run = cli(dir, &["stop", "--timeout", "60"]).expect(0);
    assert!(run.stderr.contains("SIGTERM"), "{run:#?}");
    assert!(!pid_alive(node.pid), "pid {} still runs", node.pid);
    assert!(!dir.join("node.json").exists(), "node.json left behind");
}

#[test]
fn detached_start_that_fails_shows_the_log() {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut args = vec!["start", "--detach", "--pg-bin-dir", "/nonexistent/postgresql/bin"];
    args.extend_from_slice(FAST);
    let run = cli(temp.path(), &args).expect(1);
    assert!(run.stderr.contains("exited during start"), "{run:#?}");
    assert!(run.stderr.contains("error:") && run.stderr.contains("PostgreSQL"), "the node's own error: {run:#?}");
    assert!(!temp.path().join("node.json").exists());
}

#[test]
fn commands_on_a_directory_without_a_node() {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path();
    let run = cli(dir, &["status"]).expect(3);
    assert!(run.stdout.contains("not running"), "{run:#?}");
    let run = cli(dir, &["stop"]).expect(1);
    assert!(run.stdout.contains("not running"), "{run:#?}");
    let run = cli(dir, &["projects", "list"]).expect(3);
    assert!(run.stdout.is_empty() && run.stderr.contains("not running"), "{run:#?}");
    // A stale node.json naming a pid that is not a node must not be signalled.
    std::fs::write(
        dir.join("node.json"),
        json!({
            "pid": std::process::id(), "node_id": "x", "version": "0", "api_url": "https://127.0.0.1:1",
            "tls_cert": "/x", "data_dir": dir, "control_socket": dir.join("control.sock"),
            "started_at": "2026-01-01T00:00:00Z"
        })
        .to_string(),
    )
    .expect("write node.json");
    cli(dir, &["stop", "--timeout", "1"]).expect(1);
}

#[test]
fn every_command_has_help() {
    let temp = tempfile::tempdir().expect("temp dir");
    for args in [
        &["--help"][..],
        &["start", "--help"],
        &["stop", "--help"],
        &["status", "--help"],
        &["users", "--help"],
        &["users", "get", "--help"],
        &["profiles", "--help"],
        &["profiles", "get", "--help"],
        &["projects", "--help"],
        &["projects", "get", "--help"],
        &["projects", "list", "--help"],
        &["network", "--help"],
        &["network", "status", "--help"],
    ] {
        let run = cli(temp.path(), args).expect(0);
        assert!(run.stdout.contains("Usage: cosmicsync"), "{args:?}: {run:#?}");
    }
    let run = cli(temp.path(), &["start", "--help"]).expect(0);
    for option in ["--detach", "--config", "--http-addr", "--bcrypt-cost", "--data-dir", "--log-format"] {
        assert!(run.stdout.contains(option), "start --help lacks {option}");
    }
    let run = cli(temp.path(), &["--version"]).expect(0);
    assert!(run.stdout.contains(env!("CARGO_PKG_VERSION")), "{run:#?}");
}

#[test]
fn bad_arguments_are_clear_usage_errors() {
    let temp = tempfile::tempdir().expect("temp dir");
    for (args, needle) in [
        (&["users", "get", "not-a-uuid"][..], "not a UUID"),
        (&["projects", "list", "--creator", "42"], "not a UUID"),
        (&["stop", "--timeout", "soon"], "--timeout"),
        (&["status", "--log-level", "loud"], "possible values"),
        (&["launch"], "unrecognized subcommand"),
    ] {
        let run = cli(temp.path(), args).expect(2);
        assert!(run.stderr.contains(needle), "{args:?}: {run:#?}");
    }
}

/// A start that cannot listen fails with its own error and nothing else: no panic (the
/// actors already started are stopped inside the runtime), exit status 1. Each port is
/// taken in turn: HTTPS, p2p TCP held by a plain listener, p2p TCP held by a running
/// node (whose listener allows port sharing, so only our check refuses it), QUIC.
#[tokio::test]
async fn a_start_on_a_taken_port_fails_with_its_error_alone() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    let tcp_port = tcp.local_addr().expect("addr").port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
    let udp_port = udp.local_addr().expect("addr").port();
    let running = Node::start(&[]).await;
    let node_tcp = running.info["p2p_addrs"]
        .as_array()
        .and_then(|a| a.iter().filter_map(Value::as_str).find(|a| a.contains("/tcp/")))
        .expect("the running node's TCP address")
        .to_owned();

    let http = format!("127.0.0.1:{tcp_port}");
    let p2p_tcp = format!("/ip4/127.0.0.1/tcp/{tcp_port}");
    let quic = format!("/ip4/127.0.0.1/udp/{udp_port}/quic-v1");
    let free_tcp = "/ip4/127.0.0.1/tcp/0";
    let free_quic = "/ip4/127.0.0.1/udp/0/quic-v1";
    let temp = tempfile::tempdir().expect("temp dir");
    for (http, tcp, quic, needle) in [
        (http.as_str(), free_tcp, free_quic, format!("cannot listen on {http}")),
        ("127.0.0.1:0", p2p_tcp.as_str(), free_quic, format!("cannot listen on {p2p_tcp}")),
        ("127.0.0.1:0", node_tcp.as_str(), free_quic, format!("cannot listen on {node_tcp}")),
        ("127.0.0.1:0", free_tcp, quic.as_str(), format!("cannot listen on {quic}")),
    ] {
        let args = ["--http-addr", http, "--p2p-listen", tcp, "--p2p-listen", quic];
        let run = common::start_foreground(temp.path(), &args).expect(1);
        let output = format!("{}{}", run.stdout, run.stderr);
        assert!(!output.contains("panicked"), "a panic on the way out: {run:#?}");
        // The error is the last thing printed, and it names the address.
        let last = run.stderr.trim_end().lines().last().unwrap_or_default();
        assert!(last.starts_with("error:") && last.contains(&needle), "{needle:?} should end the output: {run:#?}");
        assert!(!temp.path().join("node.json").exists(), "a node that failed announced itself");
    }
    // The running node was not disturbed.
    let res = running.client.get(running.url("/healthz")).send().await.expect("healthz");
    assert!(res.status().is_success());
    drop((tcp, udp));
}

/// A fresh node, and the same node restarted, log only what is true and worth saying:
/// no PostgreSQL NOTICEs (migrations create nothing that exists), and a node without
/// bootstrap peers says so once at info instead of warning on every DHT refresh (here
/// every second, and the node is watched for three).
#[tokio::test]
async fn a_fresh_start_logs_no_notices_and_no_bootstrap_warnings() {
    let quiet = |log: &str| {
        for noise in ["NOTICE", "already exists, skipping", "Failed to trigger bootstrap", "No known peers"] {
            assert!(!log.contains(noise), "{noise:?} in the log:\n{log}");
        }
        let said: Vec<&str> = log.lines().filter(|l| l.contains("no bootstrap peers")).collect();
        assert!(said.len() == 1 && said[0].contains("INFO"), "said once, at info: {said:?}\n{log}");
    };
    let mut node = Node::start(&["--kad-refresh", "1"]).await;
    let temp = node.take_temp().expect("temp dir");
    let dir = temp.path().to_owned();
    let up_for = |secs: u64| {
        let dir = dir.clone();
        move || {
            let report = cli(&dir, &["status", "--json"]).expect(0).json();
            let shards = report["shards"].as_array().cloned().unwrap_or_default();
            let up = !shards.is_empty() && shards.iter().all(|s| s["since_secs"].as_u64() >= Some(secs));
            async move { up.then_some(()) }
        }
    };
    common::wait_for("three DHT refresh periods", Duration::from_secs(60), up_for(3)).await;
    node.stop();
    let first = std::fs::read_to_string(dir.join("test-node.log")).expect("log");
    assert!(first.contains("node stopped"), "{first}");
    quiet(&first);

    // The restart finds every table there: still no NOTICE.
    std::fs::remove_file(dir.join("test-node.log")).expect("remove the log");
    let node = Node::start_in(&dir, &["--kad-refresh", "1"]).await;
    common::wait_for("three DHT refresh periods", Duration::from_secs(60), up_for(3)).await;
    drop(node);
    quiet(&std::fs::read_to_string(dir.join("test-node.log")).expect("log"));
    drop(temp);
}
