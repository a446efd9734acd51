//! A shard whose database goes away: requests for it get 503, the other shards keep
//! serving, the restarts are logged, and the node recovers by itself when the database
//! is back — all without restarting the process.

mod common;

use std::time::Duration;

use common::{Node, PgGuard, TestUser, wait_for};
use reqwest::Method;

async fn profile_status(node: &Node, user: &TestUser) -> u16 {
    let path = format!("/api/v1/profiles/{}", user.profile_id);
    node.req(Method::GET, &path, user).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

#[tokio::test]
async fn a_lost_shard_fails_alone_and_recovers() {
    if !common::have_postgres() {
        return;
    }
    // Shards 0-2 on one server, shard 3 on a server of its own that the test stops.
    let dirs = tempfile::tempdir().unwrap();
    let main_pg = PgGuard::start(&dirs.path().join("a"));
    let lone_pg = PgGuard::start(&dirs.path().join("b"));
    main_pg.ensure_databases(&["s0".into(), "s1".into(), "s2".into()]).unwrap();
    lone_pg.ensure_databases(&["s3".into()]).unwrap();
    let urls = [main_pg.url("s0"), main_pg.url("s1"), main_pg.url("s2"), lone_pg.url("s3")];
    let mut args = Vec::new();
    for u in &urls {
        args.push("--shard-url");
        args.push(u.as_str());
    }
    let node = Node::start(&args).await;

    let (lost, kept) = node.users_on_and_off(4, 3).await;
    assert_eq!(profile_status(&node, &lost).await, 200);

    lone_pg.stop().unwrap();
    wait_for("503 from the lost shard", Duration::from_secs(30), || async {
        (profile_status(&node, &lost).await == 503).then_some(())
    })
    .await;
    let res = node.req(Method::GET, &format!("/api/v1/profiles/{}", lost.profile_id), &lost).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/problem+json"));
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("shard 3"), "{problem}");
    // Other shards keep serving, reads and writes.
    assert_eq!(profile_status(&node, &kept).await, 200);
    assert_eq!(node.create_project(&kept, "still working").await, 201);
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 503);
    wait_for("a logged restart", Duration::from_secs(30), || async {
        let log = node.log();
        (log.contains("actor restarting") && log.contains("ShardActor[3]")).then_some(())
    })
    .await;

    // The database comes back: the node recovers without a restart.
    let pid = node.info["pid"].clone();
    lone_pg.restart().unwrap();
    wait_for("the shard to recover", Duration::from_secs(60), || async {
        (profile_status(&node, &lost).await == 200).then_some(())
    })
    .await;
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(node.info["pid"], pid);
    assert!(node.log().contains("shard up"));
    // The node goes first, then the servers under it (guards drop in reverse order).
    drop(node);
}
