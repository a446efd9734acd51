//! Shards on a PostgreSQL server reached over TCP: every connection is TLS (rustls), the
//! sslmode policy holds, and a refused certificate shows as such while the node stays up.
//!
//! The server is real — PostgreSQL with `ssl=on` on 127.0.0.1 — and so are its
//! certificates: a CA generated here signs a server certificate for `localhost` only.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::pg_tls::{TlsServer, free_port};
use common::{Node, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

/// Starts a node whose shards may never come up, and waits until `status --json` shows a
/// shard whose `last_error` contains `needle`; returns the node and that report.
async fn start_failing(dir: &Path, args: &[&str], needle: &str) -> (Node, Value) {
    let mut child = Node::spawn(dir, args);
    let report = wait_for(&format!("a shard error containing {needle:?}"), Duration::from_secs(60), || {
        let report = shard_error_report(dir, &mut child, needle);
        async move { report }
    })
    .await;
    let info = json!({
        "pid": report["pid"],
        "api_url": report["api_url"],
        "tls_cert": dir.join("tls/cert.pem"),
    });
    (Node::from_info(dir, info, Some(child)), report)
}

/// Stops a node from `start_failing` (still waiting for its shards) with SIGTERM: it
/// must act on the stop at once, not after boot's 60 s ready deadline, and never
/// announce itself as ready.
async fn stop_unready(mut node: Node) {
    let status = node.stop().expect("the node was running");
    assert!(status.success(), "{status}; log:\n{}", node.log());
    node.wait_log("the early stop in the log", |l| l.contains("stopped before it was ready")).await;
    let log = node.log();
    assert!(!log.contains("reporting ready anyway"), "the stop waited for the ready deadline:\n{log}");
    assert!(!log.contains("node ready"), "{log}");
}

fn shard_error_report(dir: &Path, child: &mut Child, needle: &str) -> Option<Value> {
    if let Some(status) = child.try_wait().unwrap() {
        panic!("node exited ({status}); log:\n{}", std::fs::read_to_string(dir.join("test-node.log")).unwrap());
    }
    let report: Value = serde_json::from_str(&common::cli(dir, &["status", "--json"]).stdout).ok()?;
    let shards = report["shards"].as_array()?;
    shards.iter().any(|s| s["last_error"].as_str().is_some_and(|e| e.contains(needle))).then_some(report)
}

/// Runs `cosmicsync start` with `args` to its exit; returns the exit code and stderr.
fn start_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let run = common::cli(dir.path(), &[&["start"][..], common::FAST, args].concat());
    (run.code, run.stderr)
}

async fn assert_serves(node: &Node, username: &str) {
    let user = node.user(username).await;
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", user.id), &user).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["username"], username);
}

#[tokio::test]
async fn verify_full_shards_serve_and_every_connection_is_encrypted() {
    let Some(server) = TlsServer::start() else { return };
    let urls = [server.url("localhost", "s0", "sslmode=verify-full"), server.url("localhost", "s1", "")];
    let ca = server.ca.to_str().unwrap();
    let node = Node::start(&["--shard-url", &urls[0], "--shard-url", &urls[1], "--shard-ca-file", ca]).await;

    assert_serves(&node, "ada").await;
    assert_serves(&node, "grace").await;
    let (encrypted, plain, versions) = server.node_connections().await;
    assert_eq!(plain, 0, "the node has unencrypted connections");
    assert!(encrypted >= 2, "expected a connection to each shard, found {encrypted}");
    assert_eq!(versions, ["TLSv1.3"]);
    assert!(!node.log().contains("not authenticated"), "verify-full must not warn");
    drop(node);
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_keeps_the_shard_down_not_the_node() {
    let Some(server) = TlsServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("localhost", "s0", "sslmode=verify-full");
    let other_ca = server.other_ca.to_str().unwrap();
    let (node, report) =
        start_failing(dir.path(), &["--shard-url", &url, "--shard-ca-file", other_ca], "certificate verify failed")
            .await;

    let shard = &report["shards"][0];
    assert_ne!(shard["state"], "up");
    assert!(shard["last_error"].as_str().unwrap().contains("UnknownIssuer"), "{shard}");
    assert_eq!(report["ready"], false);
    assert_eq!(node.client.get(node.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 503);
    assert!(node.log().contains("certificate verify failed"));
    let (encrypted, plain, _) = server.node_connections().await;
    assert_eq!((encrypted, plain), (0, 0), "no session may outlive a refused certificate");
    stop_unready(node).await;
}

#[tokio::test]
async fn a_host_name_not_in_the_certificate_fails_verify_full_but_passes_verify_ca() {
    let Some(server) = TlsServer::start() else { return };
    let ca = server.ca.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let full = server.url("127.0.0.1", "s0", "sslmode=verify-full");
    let (node, report) =
        start_failing(dir.path(), &["--shard-url", &full, "--shard-ca-file", ca], "certificate verify failed").await;
    let error = report["shards"][0]["last_error"].as_str().unwrap();
    assert!(error.contains("not valid for name \"127.0.0.1\""), "{error}");
    stop_unready(node).await;

    let verify_ca = server.url("127.0.0.1", "s0", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    let node = Node::start(&["--shard-url", &verify_ca]).await;
    assert_serves(&node, "ada").await;
    let (encrypted, plain, _) = server.node_connections().await;
    assert!(encrypted > 0 && plain == 0, "encrypted {encrypted}, plain {plain}");
    drop(node);
}

#[tokio::test]
async fn require_without_a_ca_encrypts_and_warns_without_the_password() {
    let Some(server) = TlsServer::start() else { return };
    // The server trusts local TCP clients, so it never asks for this password.
    let url = format!("postgresql://postgres:Never-Logged-7@localhost:{}/s0?sslmode=require", server.port);
    let node = Node::start(&["--shard-url", &url]).await;
    assert_serves(&node, "ada").await;
    let (encrypted, plain, _) = server.node_connections().await;
    assert!(encrypted > 0 && plain == 0, "encrypted {encrypted}, plain {plain}");
    let log = node.log();
    let warning = log.lines().find(|l| l.contains("not authenticated")).expect("a warning about require");
    assert!(warning.contains("shard: 0") && warning.contains(&format!("localhost:{}", server.port)), "{warning}");
    assert!(!log.contains("Never-Logged-7"), "the password is in the log");
    drop(node);
}

#[test]
fn plaintext_or_unverifiable_shard_urls_are_refused_at_start() {
    let secret = "hunter2-not-in-errors";
    let tcp = format!("postgresql://cs:{secret}@127.0.0.1:{}/s0", free_port());
    let missing_ca = std::env::temp_dir().join("cosmicsync-no-such-ca.pem");
    let cases: [(Vec<String>, &[&str]); 4] = [
        (vec!["--shard-url".into(), format!("{tcp}?sslmode=disable")], &["shard-url", "sslmode=disable"]),
        (
            vec!["--shard-url".into(), format!("host=127.0.0.1 password={secret} sslmode=disable")],
            &["shard-url", "sslmode=disable"],
        ),
        (vec!["--shard-url".into(), tcp.clone()], &["shard-url", "verify-full", "--shard-ca-file"]),
        (
            vec!["--shard-url".into(), tcp.clone(), "--shard-ca-file".into(), missing_ca.display().to_string()],
            &["CA file", "cosmicsync-no-such-ca.pem"],
        ),
    ];
    for (args, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = start_to_exit(&args);
        assert!(code.is_some_and(|c| c != 0), "{args:?} started (exit {code:?}): {stderr}");
        for s in says {
            assert!(stderr.contains(s), "{args:?}: {s:?} not in: {stderr}");
        }
        assert!(!stderr.contains(secret), "{args:?}: password in: {stderr}");
    }
}
