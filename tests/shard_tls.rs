//! Shards on a PostgreSQL server reached over TCP: every connection is TLS (rustls), the
//! sslmode policy holds, and a refused certificate shows as such while the node stays up.
//!
//! The server is real — PostgreSQL with `ssl=on` on 127.0.0.1 — and so are its
//! certificates: a CA generated here signs a server certificate for `localhost` only.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{Node, PgGuard, wait_for};
use cosmicsync::embedded_pg::{EmbeddedOptions, EmbeddedPostgres};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use reqwest::Method;
use serde_json::{Value, json};

/// A PostgreSQL server with TLS on a free TCP port, its CA, and a CA that did not sign it.
struct TlsServer {
    /// First field, so the server stops before its directory goes.
    pg: PgGuard,
    port: u16,
    ca: PathBuf,
    other_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    /// Starts the server with databases `s0` and `s1`; `None` (and a note why) when the
    /// machine has no PostgreSQL.
    fn start() -> Option<TlsServer> {
        if EmbeddedPostgres::find_bin_dir(None).is_err() {
            eprintln!("SKIPPED: PostgreSQL server binaries not found (install the postgresql package)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("CosmicSync test shard CA");
        let server_key = KeyPair::generate().unwrap();
        let server_cert =
            CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&server_key, &ca).unwrap();

        // The server's files: its key must be private to the account PostgreSQL runs as.
        let certs = dir.path().join("server-tls");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("server.crt"), server_cert.pem()).unwrap();
        write_private(&certs.join("server.key"), &server_key.serialize_pem());
        give_to_postgres(&certs);

        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&other_ca, self::ca("Some other CA").pem()).unwrap();

        let port = free_port();
        let mut opts = EmbeddedOptions::new(dir.path().join("pg"));
        opts.port = port;
        opts.extra_settings = [
            ("listen_addresses", "127.0.0.1".to_owned()),
            ("ssl", "on".to_owned()),
            ("ssl_cert_file", certs.join("server.crt").display().to_string()),
            ("ssl_key_file", certs.join("server.key").display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let pg = PgGuard(EmbeddedPostgres::start(&opts).expect("start PostgreSQL with TLS"));
        // initdb -A trust lets local TCP clients in; the node's connections must match it.
        let hba = std::fs::read_to_string(pg.data_dir().join("pg_hba.conf")).unwrap();
        assert!(hba.lines().any(|l| l.starts_with("host") && l.contains("127.0.0.1/32")), "pg_hba.conf:\n{hba}");
        pg.ensure_databases(&["s0".into(), "s1".into()]).unwrap();
        Some(TlsServer { pg, port, ca: ca_file, other_ca, _dir: dir })
    }

    /// `postgresql://postgres@HOST:PORT/DB?QUERY`.
    fn url(&self, host: &str, db: &str, query: &str) -> String {
        format!("postgresql://postgres@{host}:{}/{db}?{query}", self.port)
    }

    /// The node's connections to this server: (encrypted, plain, TLS versions in use).
    async fn node_connections(&self) -> (i64, i64, Vec<String>) {
        let (client, conn) = tokio_postgres::connect(&self.pg.url("postgres"), tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE ssl), count(*) FILTER (WHERE NOT ssl), \
                        coalesce(array_agg(DISTINCT version) FILTER (WHERE ssl), '{}') \
                 FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'cosmicsync'",
                &[],
            )
            .await
            .unwrap();
        drop(client);
        let _ = conn.await;
        (row.get(0), row.get(1), row.get(2))
    }
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// As root the server runs as `postgres`, which must own its key (PostgreSQL refuses a
/// key others can read, and root's 0600 file is unreadable to it).
fn give_to_postgres(path: &Path) {
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let out = Command::new("chown").arg("-R").arg("postgres:").arg(path).output().expect("run chown");
    assert!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

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
