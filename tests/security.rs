//! Security properties of a real node, checked from outside: emails sealed at rest (read
//! back from PostgreSQL itself), a lost key file stops the node instead of being replaced,
//! key rotation re-seals while serving and resumes after a crash, tokens die with a
//! password change, failed logins are limited, only TLS is spoken, and the headers and
//! CORS policy every response carries.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::{Node, PASSWORD, TestUser, cli, shard_db, wait_for};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

/// Every row of every table of every shard, as JSON text.
async fn raw_rows(node: &Node) -> Vec<String> {
    let mut rows = Vec::new();
    for shard in 0..4 {
        let db = shard_db(&node.dir, shard).await;
        let tables =
            db.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", &[]).await.expect("list tables");
        for t in tables {
            let table: String = t.get(0);
            let sql = format!("SELECT row_to_json(t)::text FROM \"{table}\" t");
            for r in db.query(sql.as_str(), &[]).await.expect("read a table") {
                rows.push(format!("{table}: {}", r.get::<_, String>(0)));
            }
        }
    }
    rows
}

async fn status_of(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn emails_are_sealed_at_rest_and_looked_up_by_blind_index() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let _grace = node.user("grace").await;
    // Change an email too: the new one is sealed, the old one gone.
    let res = node
        .req(Method::PUT, &format!("/api/v1/users/{}", ada.id), &ada)
        .json(&json!({ "email": "Ada.Lovelace@Example.org" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let rows = raw_rows(&node).await;
    assert!(rows.iter().any(|r| r.starts_with("users:")), "the scan reads the users table");
    for needle in ["ada@example.org", "grace@example.org", "ada.lovelace@example.org", "@example.org"] {
        let hits: Vec<&String> = rows.iter().filter(|r| r.to_lowercase().contains(needle)).collect();
        assert!(hits.is_empty(), "plaintext {needle:?} found in PostgreSQL: {hits:#?}");
    }
    // The blind index is what the directory holds, and uniqueness still works through it.
    let keys = common::keyring(&node.dir);
    let index = keys.blind_index("email", "ada.lovelace@example.org");
    assert!(rows.iter().any(|r| r.starts_with("directory:") && r.contains(&index)), "blind index in the directory");
    let res = node.register_as("impostor", "ADA.LOVELACE@example.org").await;
    assert_eq!(res.status(), 409, "a taken email is found by its blind index");

    // The owner still reads their email; nobody else does; no hash ever leaves.
    let (status, me) =
        status_of(node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(me["email"], "Ada.Lovelace@Example.org");
    assert!(!me.to_string().contains("$2"), "no password hash in a response: {me}");
    // No email, key or hash reaches the log.
    let log = node.log().to_lowercase();
    assert!(!log.contains("@example.org"), "an email reached the log");
    let keyfile: Value = serde_json::from_str(&std::fs::read_to_string(node.dir.join("keys.json")).unwrap()).unwrap();
    for secret in
        std::iter::once(&keyfile["index_key"]).chain(keyfile["data_keys"].as_array().unwrap().iter().map(|k| &k["key"]))
    {
        assert!(!node.log().contains(secret.as_str().unwrap()), "a key reached the log");
    }
    assert!(!log.contains("$2b$"), "a password hash reached the log");
}

#[tokio::test]
async fn a_lost_or_exposed_key_file_stops_the_node_instead_of_being_replaced() {
    let mut node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let dir = node.dir.clone();
    let _temp = node.take_temp();
    node.stop();
    let keys = dir.join("keys.json");
    let saved = dir.join("keys.json.saved");
    std::fs::rename(&keys, &saved).unwrap();

    let run = cli(&dir, &["start", "--http-addr", "127.0.0.1:0"]);
    assert_ne!(run.code, Some(0), "a node without its key file must not start: {run:?}");
    let log = format!("{}{}", run.stdout, run.stderr);
    assert!(log.contains("key check failed") && log.contains("restore the key file"), "says why: {log}");
    assert!(!keys.exists(), "no new key file is left in place of the lost one");

    // A key file other users could read is refused, not silently fixed.
    std::fs::rename(&saved, &keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = cli(&dir, &["start", "--http-addr", "127.0.0.1:0"]);
    assert_ne!(run.code, Some(0));
    assert!(format!("{run:?}").contains("chmod 600"), "{run:?}");
    assert_eq!(std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777, 0o644, "never changed behind our back");

    // With the key restored, everything is readable again.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = Node::start_in(&dir, &[]).await;
    let ada = TestUser { token: node.token("ada", PASSWORD).await, ..ada };
    let (status, me) =
        status_of(node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada).send().await.unwrap()).await;
    assert_eq!((status.as_u16(), me["email"].as_str()), (200, Some("ada@example.org")));
}

/// Rows per data key, summed over the shards, read from PostgreSQL.
async fn rows_by_key(node: &Node) -> std::collections::BTreeMap<i32, i64> {
    let mut out = std::collections::BTreeMap::new();
    for shard in 0..4 {
        let db = shard_db(&node.dir, shard).await;
        for r in db.query("SELECT email_key, count(*) FROM users GROUP BY email_key", &[]).await.unwrap() {
            *out.entry(r.get::<_, i32>(0)).or_default() += r.get::<_, i64>(1);
        }
    }
    out
}

#[tokio::test]
async fn key_rotation_reseals_every_row_while_serving_and_resumes_after_a_crash() {
    // One row per transaction, so the pass is still running when the node is killed.
    let mut node = Node::start(&["--reseal-batch", "1"]).await;
    const USERS: usize = 400;
    let mut workers = Vec::new();
    for w in 0..8 {
        let (client, api) = (node.client.clone(), node.api.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..USERS / 8 {
                let name = format!("w{w}u{i}");
                let res = client
                    .post(format!("{api}/api/v1/users"))
                    .json(&json!({ "username": name, "email": format!("{name}@example.org"), "password": PASSWORD }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(rows_by_key(&node).await, [(1, USERS as i64)].into());

    let run = cli(&node.dir, &["keys", "rotate", "--no-wait"]).expect(0);
    assert!(run.stdout.contains("data key 2"), "{run:?}");
    // Kill it mid-pass: no graceful anything.
    let mut child = node.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let dir = node.dir.clone();
    let temp = node.take_temp();
    let left = rows_by_key(&node).await;
    drop(node);
    assert!(left.get(&1).copied().unwrap_or(0) > 0, "the pass was not cut short, nothing to resume: {left:?}");
    assert_eq!(left.values().sum::<i64>(), USERS as i64, "no row lost or doubled: {left:?}");

    // It resumes by itself, and the node serves meanwhile.
    let node = Node::start_in(&dir, &["--reseal-batch", "1"]).await;
    let me = node.user("during").await;
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", me.id), &me).send().await.unwrap();
    assert_eq!(res.status(), 200);
    wait_for("the resumed pass to finish", Duration::from_secs(120), || {
        let node = &node;
        async move { (rows_by_key(node).await == [(2, USERS as i64 + 1)].into()).then_some(()) }
    })
    .await;
    node.wait_log("the resumption in the log", |l| l.contains("resuming an unfinished key rotation")).await;

    // A second rotation through the CLI, followed to the end (no terminal: no bar).
    let run = cli(&dir, &["keys", "rotate"]).expect(0);
    assert!(run.stdout.contains(&format!("done: {} rows re-sealed under key 3", USERS + 1)), "{run:?}");
    assert_eq!(rows_by_key(&node).await, [(3, USERS as i64 + 1)].into());
    let status = cli(&dir, &["keys", "status", "--json"]).expect(0).json();
    assert_eq!(status["current_key"], 3);
    assert_eq!(status["keys"], json!([1, 2, 3]), "old keys stay in the file");
    // Everything still opens: logins, emails, uniqueness.
    let res = node.login("w3u7", PASSWORD).await;
    assert_eq!(res.status(), 200);
    let (status, body) =
        status_of(node.req(Method::GET, &format!("/api/v1/users/{}", me.id), &me).send().await.unwrap()).await;
    assert_eq!((status.as_u16(), body["email"].as_str()), (200, Some("during@example.org")));
    assert_eq!(node.register("w3u7x").await.status(), 201);
    assert_eq!(node.register_as("again", "w5u2@example.org").await.status(), 409);
    drop(node);
    drop(temp);
}

#[tokio::test]
async fn a_password_change_ends_every_older_token() {
    let mut node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let other_tab = TestUser { token: node.token("ada", PASSWORD).await, ..ada.clone() };
    let me = format!("/api/v1/users/{}", ada.id);
    let res =
        node.req(Method::PUT, &me, &ada).json(&json!({ "password": "a much newer passphrase" })).send().await.unwrap();
    assert_eq!(res.status(), 200);
    for token in [&ada, &other_tab] {
        let res = node.req(Method::GET, &me, token).send().await.unwrap();
        assert_eq!(res.status(), 401, "a token from before the change is refused at once");
    }
    assert_eq!(node.login("ada", PASSWORD).await.status(), 401, "the old password is gone");
    let fresh = TestUser { token: node.token("ada", "a much newer passphrase").await, ..ada.clone() };
    assert_eq!(node.req(Method::GET, &me, &fresh).send().await.unwrap().status(), 200);

    // Also after a restart: the change is read back from the shards.
    let dir = node.dir.clone();
    let temp = node.take_temp();
    node.stop();
    let node = Node::start_in(&dir, &[]).await;
    assert_eq!(node.req(Method::GET, &me, &ada).send().await.unwrap().status(), 401);
    assert_eq!(node.req(Method::GET, &me, &fresh).send().await.unwrap().status(), 200);
    drop(node);
    drop(temp);
}

async fn attempt(node: &Node, username: &str, password: &str) -> (u16, Option<u64>, Value) {
    let res = node.login(username, password).await;
    let status = res.status().as_u16();
    let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
    (status, retry, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn failed_logins_are_limited_per_username_and_per_address() {
    let node = Node::start(&["--login-failures-per-username", "3", "--login-failures-per-address", "8"]).await;
    node.user("ada").await;
    node.user("bob").await;

    // A known and an unknown username get exactly the same answers, in the same order.
    let mut answers = Vec::new();
    for name in ["ada", "ghost"] {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (status, retry, body) = attempt(&node, name, "wrong password").await;
            seen.push((status, retry.is_some(), body["detail"].clone()));
            if status == 429 {
                assert!(retry.unwrap_or(0) >= 1, "429 says when to retry");
                assert_eq!(body["type"], "urn:cosmicsync:problem:too-many-requests");
            }
        }
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1], "the answers reveal whether the username exists");
    let statuses: Vec<u16> = answers[0].iter().map(|a| a.0).collect();
    assert_eq!(statuses, [401, 401, 401, 429]);

    // Blocked means blocked, even with the right password; other users are not affected.
    assert_eq!(attempt(&node, "ada", PASSWORD).await.0, 429);
    assert_eq!(attempt(&node, "bob", PASSWORD).await.0, 200, "successes do not count");
    // This address has now failed 8 times: the next failure blocks it for every username.
    assert_eq!(attempt(&node, "bob", "wrong password").await.0, 429);
    assert_eq!(attempt(&node, "bob", PASSWORD).await.0, 429);
    // The log is written asynchronously: wait for the line rather than race it.
    node.wait_log("the refusal in the log", |l| l.contains("login refused: too many failures")).await;
}

/// A raw TLS connection to the node with `versions`; returns the protocol agreed.
fn tls_handshake(
    node: &Node,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Option<rustls::ProtocolVersion> {
    let config = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(root_store(node))
        .with_no_client_auth();
    let addr = node.api.trim_start_matches("https://").to_owned();
    let mut sock = std::net::TcpStream::connect(&addr).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().ok()?).ok()?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    conn.protocol_version()
}

fn root_store(node: &Node) -> rustls::RootCertStore {
    let pem = std::fs::read(node.info["tls_cert"].as_str().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).unwrap();
    }
    roots
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).map(|c| c.unwrap()).collect()
}

#[tokio::test]
async fn only_tls_is_spoken_and_every_response_carries_the_security_headers() {
    let node = Node::start(&[]).await;
    cosmicsync::tls::install_crypto_provider();
    // TLS 1.3 by default, 1.2 still accepted; nothing else.
    let v13 = tls_handshake(&node, &[&rustls::version::TLS13, &rustls::version::TLS12]);
    let v12 = tls_handshake(&node, &[&rustls::version::TLS12]);
    assert_eq!(v13, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(v12, Some(rustls::ProtocolVersion::TLSv1_2));
    // Plain HTTP on the same port gets no HTTP answer.
    let plain = reqwest::Client::new().get(node.api.replace("https://", "http://") + "/healthz").send().await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true), "plaintext HTTP was served");

    let ada = node.user("ada").await;
    let cases = [
        node.client.get(node.url("/healthz")),
        node.client.get(node.url("/api/v1/no-such-thing")),
        node.client.get(node.url(&format!("/api/v1/users/{}", ada.id))),
        node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada),
        node.req(Method::GET, &format!("/api/v1/users/{}", Uuid::now_v7()), &ada),
    ];
    for req in cases {
        let res = req.send().await.unwrap();
        let url = res.url().to_string();
        let h = res.headers();
        assert_eq!(h.get("x-content-type-options").map(|v| v.to_str().unwrap()), Some("nosniff"), "{url}");
        assert!(h.get("strict-transport-security").is_some(), "{url}");
        if url.contains("/api/v1/") {
            assert_eq!(h.get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"), "{url}");
        }
        assert!(h.get("access-control-allow-origin").is_none(), "CORS is off by default: {url}");
    }
    // A cross-origin preflight gets no permission from a node without CORS origins.
    let res = node
        .client
        .request(Method::OPTIONS, node.url("/api/v1/projects"))
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let node = Node::start(&["--cors-origin", "https://app.example.org"]).await;
    let preflight = |origin: &'static str| {
        node.client
            .request(Method::OPTIONS, node.url("/api/v1/projects"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization, content-type")
            .send()
    };
    let ok = preflight("https://app.example.org").await.unwrap();
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(ok.headers().get("access-control-allow-origin").unwrap(), "https://app.example.org");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // The node is unharmed and ordinary requests still work.
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 200);
}
