//! Several nodes of one network on loopback: a shared network key, bootstrap wiring,
//! and a digest of every replicated row a node holds, to compare nodes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::p2p::bootstrap_addr;
use super::{Node, TestUser, shard_db, wait_for};

/// How long replication may take to bring a change to every node (generous: 2 shared
/// cores run every node and its PostgreSQL).
pub const REPLICATE: Duration = Duration::from_secs(60);

/// Shards per test node: fewer servers' worth of work on a small machine.
pub const SHARDS: &str = "2";

/// A network key file (32 random bytes, mode 0600) in its own temp directory.
pub struct NetworkKey {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl NetworkKey {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("network.key");
        std::fs::write(&path, rand::random::<[u8; 32]>()).expect("write network key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod network key");
        Self { _dir: dir, path }
    }

    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

/// Arguments of a member of the network `key` that bootstraps from `bootstrap`.
pub fn member_args(key: &Path, bootstrap: &[&Node], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--kad-mode".into(),
        "server".into(),
        "--shards".into(),
        SHARDS.into(),
        "--network-key-file".into(),
        key.display().to_string(),
    ];
    // Quick periodic reconciliation, unless the test chooses its own.
    if !extra.contains(&"--sync-interval") {
        args.extend(["--sync-interval".into(), "2s".into()]);
    }
    for b in bootstrap {
        args.extend(["--bootstrap".into(), bootstrap_addr(b)]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts a member in a fresh directory.
pub async fn start_member(key: &Path, bootstrap: &[&Node], extra: &[&str]) -> Node {
    let args = member_args(key, bootstrap, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start(&args).await
}

/// Restarts a member on its own directory.
pub async fn restart_member(dir: &Path, key: &Path, bootstrap: &[&Node]) -> Node {
    let args = member_args(key, bootstrap, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start_in(dir, &args).await
}

/// `GET path` as `user` on `node`: the status and the body.
pub async fn get(node: &Node, path: &str, user: &TestUser) -> (u16, Value) {
    match node.req(reqwest::Method::GET, path, user).send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            (status, res.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Waits until `GET path` on `node` answers `status` with a body `accept` likes.
pub async fn wait_get(node: &Node, path: &str, user: &TestUser, status: u16, accept: impl Fn(&Value) -> bool) -> Value {
    let what = format!("{path} to answer {status} on {}", node.api);
    wait_for(&what, REPLICATE, || {
        let fut = get(node, path, user);
        let accept = &accept;
        async move {
            let (s, body) = fut.await;
            (s == status && accept(&body)).then_some(body)
        }
    })
    .await
}

/// Logs `user` in on another node (the password replicated with the user).
pub async fn login_on(node: &Node, user: &TestUser) -> TestUser {
    let what = format!("{} to log in on {}", user.username, node.api);
    let token = wait_for(&what, REPLICATE, || {
        let fut = node.login(&user.username, super::PASSWORD);
        async move {
            let res = fut.await;
            if res.status() != 200 {
                return None;
            }
            let body: Value = res.json().await.ok()?;
            body["access_token"].as_str().map(str::to_owned)
        }
    })
    .await;
    TestUser { token, ..user.clone() }
}

/// Every replicated row of a node in a canonical text form (all shards, sorted): two
/// nodes holding the same rows give equal lists. Sealed columns are left out (each node
/// seals under its own key); everything else is compared, clocks and stamps included.
pub async fn rows(node: &Node, shards: usize) -> Vec<String> {
    let mut all = Vec::new();
    for shard in 0..shards {
        let db = shard_db(&node.dir, shard).await;
        for sql in [
            "SELECT 'user ' || id || ' ' || username || ' ' || password_hash || ' ' || vclock::text || ' ' || stamps::text FROM users",
            "SELECT 'profile ' || id || ' ' || row_to_json(p)::text FROM (SELECT id, user_id, name, bio, skills, interests, created_at, updated_at, vclock, stamps FROM profiles) p",
            "SELECT 'project ' || id || ' ' || row_to_json(p)::text FROM (SELECT id, creator_id, name, description, tags, created_at, updated_at, deleted_at, vclock, stamps FROM projects) p",
            "SELECT 'conflict ' || row_id || ' ' || field || ' ' || loser_node || ' ' || loser_counter || ' ' || winner_node || ' ' || winner_counter FROM conflicts WHERE resolved_at IS NULL",
        ] {
            let found = db.query(sql, &[]).await.expect("read replicated rows");
            all.extend(found.iter().map(|r| r.get::<_, String>(0)));
        }
    }
    all.sort();
    all
}

/// Waits until every node holds exactly the rows the first holds; returns that count.
pub async fn wait_identical(nodes: &[&Node], shards: usize) -> usize {
    wait_for("every node to hold the same rows", REPLICATE * 3, || async {
        let first = rows(nodes[0], shards).await;
        for n in &nodes[1..] {
            if rows(n, shards).await != first {
                return None;
            }
        }
        Some(first.len())
    })
    .await
}

/// Creates `n` projects as `user` on `node`, `parallel` requests at a time; returns the
/// ids. Every one must be created (201).
pub async fn create_projects(node: &Node, user: &TestUser, n: usize, parallel: usize) -> Vec<String> {
    use futures_util::StreamExt;
    let requests = (0..n).map(|i| {
        let req = node
            .req(reqwest::Method::POST, "/api/v1/projects", user)
            .json(&serde_json::json!({ "name": format!("project {i}"), "tags": [format!("t{}", i % 7)] }));
        async move {
            let res = req.send().await.expect("create project");
            let status = res.status();
            let body: Value = res.json().await.expect("project body");
            if status != 201 {
                let log = node.log();
                let tail: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERRO")).collect();
                panic!("create project {i}: {status} {body}; the node's warnings:\n{}", tail.join("\n"));
            }
            body["id"].as_str().expect("id").to_owned()
        }
    });
    futures_util::stream::iter(requests).buffer_unordered(parallel).collect().await
}

/// Rows of a node whose stored version has no change-log entry: a row written without
/// its log entry (or the reverse) would be a half-applied change.
pub async fn rows_without_log_entry(dir: &Path, shards: usize) -> i64 {
    let mut total = 0;
    for shard in 0..shards {
        let db = shard_db(dir, shard).await;
        for table in ["users", "profiles", "projects"] {
            let sql = format!(
                "SELECT count(*) FROM {table} t
                 WHERE NOT EXISTS (SELECT 1 FROM changes c WHERE c.row_id = t.id AND c.vclock = t.vclock)"
            );
            total += db.query_one(&sql, &[]).await.expect("count rows without log entry").get::<_, i64>(0);
        }
    }
    total
}

/// Transactions of the node in `dir` held open in its PostgreSQL (idle in transaction);
/// `None` while that PostgreSQL does not answer yet.
pub async fn open_transactions(dir: &Path) -> Option<i64> {
    let mut config = tokio_postgres::Config::new();
    config.host_path(dir.join("pg")).port(5432).user("postgres").dbname("postgres");
    let (db, conn) = config.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    let sql =
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND application_name = 'cosmicsync'";
    db.query_one(sql, &[]).await.ok().map(|r| r.get(0))
}

/// The ids of the first `n` projects on `node` (as `user` sees the list).
pub async fn first_projects(node: &Node, user: &TestUser, n: usize) -> Vec<String> {
    let (_, page) = get(node, &format!("/api/v1/projects?limit={n}"), user).await;
    page["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}
