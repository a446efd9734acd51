//! Replication end to end: real nodes of one network on loopback, each with its own
//! PostgreSQL, writing on any node and reading on every other, over the wire.

mod common;

use common::cluster::{NetworkKey, REPLICATE, get, login_on, start_member, wait_get, wait_identical};
use common::p2p::{peer_id, wait_peer};
use common::wait_for;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SHARDS: usize = 2;

/// The next `change` frame on a WebSocket (skipping protocol chatter), within `REPLICATE`.
async fn next_change(ws: &mut common::Ws) -> Value {
    let deadline = tokio::time::Instant::now() + REPLICATE;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("a change in time");
        if let Some(Ok(Message::Text(text))) = msg {
            let v: Value = serde_json::from_str(&text).expect("JSON");
            if v["type"] == "change" {
                return v;
            }
        } else if !matches!(msg, Some(Ok(_))) {
            panic!("WebSocket ended: {msg:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_reaches_every_node_and_users_log_in_anywhere() {
    let key = NetworkKey::new();
    let a = start_member(&key.path, &[], &[]).await;
    let b = start_member(&key.path, &[&a], &[]).await;
    let c = start_member(&key.path, &[&a], &[]).await;

    // Registered on A: the user (password hash included) reaches C, where they log in.
    let ada_a = a.user("ada").await;
    let ada_c = login_on(&c, &ada_a).await;
    let ada_b = login_on(&b, &ada_a).await;

    // A WebSocket on C sees a change made on A.
    let mut ws = c.ws(Some(&ada_c.token)).await;
    ws.send(Message::text(json!({ "type": "subscribe", "topics": ["all"] }).to_string())).await.expect("subscribe");

    // Profile updated on B, read on A and C.
    let path = format!("/api/v1/profiles/{}", ada_a.profile_id);
    let res = b.req(Method::PUT, &path, &ada_b).json(&json!({ "bio": "from B" })).send().await.expect("put");
    assert_eq!(res.status(), 200);
    for (n, ada) in [(&a, &ada_a), (&c, &ada_c)] {
        wait_get(n, &path, ada, 200, |p| p["bio"] == "from B").await;
    }

    // Project created on C, renamed on A, deleted on B: every node follows.
    let res = c
        .req(Method::POST, "/api/v1/projects", &ada_c)
        .json(&json!({ "name": "Engine", "tags": ["hardware"] }))
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 201);
    let project: Value = res.json().await.expect("project");
    let path = format!("/api/v1/projects/{}", project["id"].as_str().expect("id"));
    wait_get(&a, &path, &ada_a, 200, |p| p["name"] == "Engine").await;
    let res = a.req(Method::PUT, &path, &ada_a).json(&json!({ "name": "Analytical Engine" })).send().await;
    assert_eq!(res.expect("put").status(), 200);
    for (n, ada) in [(&b, &ada_b), (&c, &ada_c)] {
        wait_get(n, &path, ada, 200, |p| p["name"] == "Analytical Engine").await;
    }
    let change = loop {
        let change = next_change(&mut ws).await;
        if change["entity"] == "project" && change["data"]["name"] == "Analytical Engine" {
            break change;
        }
    };
    assert_eq!(change["op"], "update");
    assert_ne!(change["origin"], c.info["node_id"], "the change came from A: {change}");
    let res = b.req(Method::DELETE, &path, &ada_b).send().await.expect("delete");
    assert_eq!(res.status(), 204);
    for (n, ada) in [(&a, &ada_a), (&c, &ada_c)] {
        wait_get(n, &path, ada, 404, |_| true).await;
    }

    // A user registered on B is a user on A too; and all three nodes hold the same rows.
    let bob_b = b.user("bob").await;
    wait_get(&a, &format!("/api/v1/users/{}", bob_b.id), &ada_a, 200, |u| u["username"] == "bob").await;
    let rows = wait_identical(&[&a, &b, &c], SHARDS).await;
    assert!(rows >= 5, "users, profiles and the project tombstone: {rows}");

    // The sync status shows the peers and what each origin wrote.
    let (status, sync) = get(&a, "/api/v1/sync/status", &ada_a).await;
    assert_eq!(status, 200, "{sync}");
    assert_eq!(sync["open_conflicts"], 0);
    assert!(sync["peers"].as_array().is_some_and(|p| p.len() >= 2), "{sync:#}");
    assert_eq!(sync["origins"].as_array().map(Vec::len), Some(3), "writes from A, B and C: {sync:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_stored_and_forwarded_by_a_node_between() {
    let key = NetworkKey::new();
    let b = start_member(&key.path, &[], &[]).await;
    let mut a = start_member(&key.path, &[&b], &[]).await;
    let ada = a.user("ada").await;
    let res =
        a.req(Method::POST, "/api/v1/projects", &ada).json(&json!({ "name": "Made on A" })).send().await.expect("post");
    assert_eq!(res.status(), 201);
    let project: Value = res.json().await.expect("project");
    let path = format!("/api/v1/projects/{}", project["id"].as_str().expect("id"));
    let ada_b = login_on(&b, &ada).await;
    wait_get(&b, &path, &ada_b, 200, |p| p["name"] == "Made on A").await;
    a.stop();

    // C knows only B; A is gone. C still gets A's user, profile and project.
    let c = start_member(&key.path, &[&b], &[]).await;
    let ada_c = login_on(&c, &ada).await;
    wait_get(&c, &path, &ada_c, 200, |p| p["name"] == "Made on A").await;
    wait_identical(&[&b, &c], SHARDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_network_reads_nothing_and_changes_nothing() {
    let key = NetworkKey::new();
    let a = start_member(&key.path, &[], &[]).await;
    let b = start_member(&key.path, &[&a], &[]).await;
    // A stranger on the same DHT, with a key of its own.
    let other = NetworkKey::new();
    let stranger = start_member(&other.path, &[&a], &[]).await;
    let (pa, ps) = (peer_id(&a), peer_id(&stranger));
    wait_peer(&stranger, &pa, "the stranger to connect to A", REPLICATE, |_| true).await;

    let ada = a.user("ada").await;
    let eve = stranger.user("eve").await;
    wait_get(&b, &format!("/api/v1/users/{}", ada.id), &login_on(&b, &ada).await, 200, |_| true).await;
    // Both networks are live and gossiping; neither side holds the other's user.
    let (status, _) = get(&stranger, &format!("/api/v1/users/{}", ada.id), &eve).await;
    assert_eq!(status, 404, "the stranger must not read A's user");
    let (status, _) = get(&a, &format!("/api/v1/users/{}", eve.id), &ada).await;
    assert_eq!(status, 404, "A must not take the stranger's user");
    assert_eq!(a.login("eve", common::PASSWORD).await.status(), 401);

    // The stranger's sync requests are refused, and its gossip costs it standing at A.
    a.wait_log("A to refuse the stranger's sync request", |l| l.contains("sync request refused") && l.contains(&ps))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_merge_field_by_field_and_same_field_edits_are_conflicts_everywhere() {
    let key = NetworkKey::new();
    let a = start_member(&key.path, &[], &[]).await;
    let mut b = start_member(&key.path, &[&a], &[]).await;
    let ada_a = a.user("ada").await;
    let res = a
        .req(Method::POST, "/api/v1/projects", &ada_a)
        .json(&json!({ "name": "Engine", "description": "start" }))
        .send()
        .await
        .expect("post");
    let project: Value = res.json().await.expect("project");
    let doomed: Value = a
        .req(Method::POST, "/api/v1/projects", &ada_a)
        .json(&json!({ "name": "Doomed" }))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("project");
    let path = format!("/api/v1/projects/{}", project["id"].as_str().expect("id"));
    let doomed = format!("/api/v1/projects/{}", doomed["id"].as_str().expect("id"));
    let ada_b = login_on(&b, &ada_a).await;
    wait_get(&b, &doomed, &ada_b, 200, |_| true).await;
    wait_identical(&[&a, &b], SHARDS).await;

    // B goes away and comes back alone (no bootstrap): the two sides now write without
    // seeing each other.
    let dir = b.dir.clone();
    let _keep = b.take_temp();
    b.stop();
    let put = |node: &common::Node, user: &common::TestUser, path: &str, body: Value| {
        let req = node.req(Method::PUT, path, user).json(&body);
        async move { req.send().await.expect("put").status().as_u16() }
    };
    assert_eq!(put(&a, &ada_a, &path, json!({ "name": "Engine by A", "tags": ["a"] })).await, 200);
    assert_eq!(a.req(Method::DELETE, &doomed, &ada_a).send().await.expect("delete").status(), 204);
    let alone = common::cluster::member_args(&key.path, &[], &[]);
    let mut b = common::Node::start_in(&dir, &alone.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let ada_b = login_on(&b, &ada_a).await;
    assert_eq!(put(&b, &ada_b, &path, json!({ "name": "Engine by B", "description": "from B" })).await, 200);
    assert_eq!(put(&b, &ada_b, &doomed, json!({ "name": "Saved?" })).await, 200);
    b.stop();

    // Healed: B rejoins A. Different fields both survive; the same field is a conflict
    // won by the later write (B's) on both nodes; the delete wins over the update.
    let b = common::cluster::restart_member(&dir, &key.path, &[&a]).await;
    let ada_b = login_on(&b, &ada_a).await;
    for (n, ada) in [(&a, &ada_a), (&b, &ada_b)] {
        let p = wait_get(n, &path, ada, 200, |p| p["description"] == "from B" && p["tags"] == json!(["a"])).await;
        assert_eq!(p["name"], "Engine by B", "{p}");
        wait_get(n, &doomed, ada, 404, |_| true).await;
    }
    wait_identical(&[&a, &b], SHARDS).await;
    let project_id = project["id"].as_str().expect("id");
    for (n, ada) in [(&a, &ada_a), (&b, &ada_b)] {
        let (status, page) = get(n, &format!("/api/v1/conflicts?entity=project&id={project_id}"), ada).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().expect("items");
        assert_eq!(items.len(), 1, "one same-field conflict: {page:#}");
        assert_eq!(items[0]["field"], "name");
        assert_eq!(items[0]["winner"]["value"], "Engine by B");
        assert_eq!(items[0]["loser"]["value"], "Engine by A");
        assert_eq!(items[0]["resolved"], false);
        assert_eq!(items[0]["winner"]["origin"], b.info["node_id"]);
        assert_eq!(items[0]["loser"]["origin"], a.info["node_id"]);
    }
    let (_, sync) = get(&a, "/api/v1/sync/status", &ada_a).await;
    assert_eq!(sync["open_conflicts"], 1, "{sync:#}");

    // The owner settles it on A with If-Match: resolved on both nodes.
    let res = a.req(Method::GET, &path, &ada_a).send().await.expect("get");
    let etag = res.headers()["etag"].to_str().expect("etag").to_owned();
    let res = a.req(Method::PUT, &path, &ada_a).header("if-match", etag).json(&json!({ "name": "Engine" })).send();
    assert_eq!(res.await.expect("put").status(), 200);
    for (n, ada) in [(&a, &ada_a), (&b, &ada_b)] {
        wait_get(n, &format!("/api/v1/conflicts?id={project_id}"), ada, 200, |page| {
            page["items"][0]["resolved"] == true
        })
        .await;
        wait_get(n, &path, ada, 200, |p| p["name"] == "Engine").await;
    }
    let (_, bad) = get(&a, "/api/v1/conflicts?entity=table", &ada_a).await;
    assert!(bad["detail"].as_str().is_some_and(|d| d.contains("entity")), "{bad}");
}

/// How many changes the catch-up test makes while a node is away.
const MISSED: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_away_catches_up_and_a_kill_mid_batch_leaves_nothing_half_applied() {
    use common::cluster::{create_projects, open_transactions, restart_member, rows_without_log_entry};
    let key = NetworkKey::new();
    // Gossip and the session on connect carry the changes; periodic rounds on 10,000 rows
    // every 2 s would only add load on this small machine.
    let slow = ["--sync-interval", "20s"];
    let a = start_member(&key.path, &[], &slow).await;
    let b = start_member(&key.path, &[&a], &slow).await;
    let mut c = start_member(&key.path, &[&a], &slow).await;
    let ada = a.user("ada").await;
    let bob = b.user("bob").await;
    wait_identical(&[&a, &b, &c], SHARDS).await;
    let dir = c.dir.clone();
    let _keep = c.take_temp();
    c.stop();

    // 10,000 changes on A and B while C is away.
    let (made_a, made_b) =
        tokio::join!(create_projects(&a, &ada, MISSED / 2, 8), create_projects(&b, &bob, MISSED / 2, 8));
    assert_eq!(made_a.len() + made_b.len(), MISSED);

    // C comes back with its first catch-up batch held open, and is killed mid-batch.
    let args = common::cluster::member_args(&key.path, &[&a], &slow);
    let args: Vec<&str> = common::FAST.iter().copied().chain(args.iter().map(String::as_str)).collect();
    let mut held = common::Node::spawn_env(&[], &dir, &args, &[("FAILPOINTS", "apply-remote-commit=1*sleep(120000)")]);
    wait_for("C to hold a catch-up batch open", REPLICATE, || async {
        open_transactions(&dir).await.filter(|n| *n > 0)
    })
    .await;
    held.kill().expect("kill -9 C");
    held.wait().expect("reap C");
    assert_eq!(rows_without_log_entry(&dir, SHARDS).await, 0, "a row without its log entry after the kill");

    // Restarted normally, C converges on exactly the rows A and B hold.
    let c = restart_member(&dir, &key.path, &[&a]).await;
    let rows = wait_identical(&[&a, &b, &c], SHARDS).await;
    assert!(rows >= MISSED + 4, "{rows} rows");
    assert_eq!(rows_without_log_entry(&c.dir, SHARDS).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_foreign_and_replayed_gossip_harms_nothing() {
    let key = NetworkKey::new();
    let a = start_member(&key.path, &[], &[]).await;
    // A member gone wrong: every batch it publishes comes with random bytes, a truncated
    // copy, a copy sealed with another network's key and a replay of the previous batch.
    let bad = {
        let args = common::cluster::member_args(&key.path, &[&a], &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::Node::start_env(&args, &[("FAILPOINTS", "gossip-tamper=return")]).await
    };
    wait_peer(&a, &peer_id(&bad), "A to see the bad member", REPLICATE, |_| true).await;
    let ada = a.user("ada").await;
    let mallory = bad.user("mallory").await;
    let _ = common::cluster::create_projects(&bad, &mallory, 20, 1).await;

    a.wait_log("A to refuse a broken gossip message", |l| l.contains("gossip message refused")).await;
    let score = wait_peer(&a, &peer_id(&bad), "the bad member's gossip score to fall", REPLICATE, |p| {
        p["gossip_score"].as_f64().is_some_and(|s| s < 0.0)
    })
    .await;
    assert!(score["gossip_score"].as_f64().unwrap_or(0.0) < 0.0, "{score}");
    // A stays healthy, and what the member wrote validly still arrives (by reconciliation
    // if its gossip is ignored now): both nodes hold the same rows.
    assert_eq!(get(&a, &format!("/api/v1/users/{}", ada.id), &ada).await.0, 200);
    wait_identical(&[&a, &bad], SHARDS).await;
    assert!(!a.log().contains("panicked"), "A panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_log_entries_are_pruned_and_a_new_node_still_gets_every_row() {
    let key = NetworkKey::new();
    let a = start_member(&key.path, &[], &["--change-log-retention", "1s"]).await;
    let ada = a.user("ada").await;
    let path = format!("/api/v1/profiles/{}", ada.profile_id);
    for i in 0..5 {
        let res = a.req(Method::PUT, &path, &ada).json(&json!({ "bio": format!("version {i}") })).send().await;
        assert_eq!(res.expect("put").status(), 200);
    }
    // Five updates of one profile: the four superseded entries go, the latest stays.
    let log_entries = |node: &common::Node| {
        let dir = node.dir.clone();
        let profile = ada.profile_id;
        async move {
            let mut n = 0;
            for shard in 0..SHARDS {
                let db = common::shard_db(&dir, shard).await;
                let row = db.query_one("SELECT count(*) FROM changes WHERE row_id = $1", &[&profile]).await;
                n += row.expect("count").get::<_, i64>(0);
            }
            n
        }
    };
    wait_for("the superseded entries to be pruned", REPLICATE, || async { (log_entries(&a).await == 1).then_some(()) })
        .await;
    // A node that joins now gets the row all the same: catch-up never reads the log.
    let b = start_member(&key.path, &[&a], &[]).await;
    let ada_b = login_on(&b, &ada).await;
    wait_get(&b, &path, &ada_b, 200, |p| p["bio"] == "version 4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_number_that_cannot_be_reserved_never_stops_websocket_delivery() {
    // The third number this node allocates cannot be reserved on disk.
    let node = common::Node::start_env(&[], &[("FAILPOINTS", "sequencer-allocate=2*off->1*return")]).await;
    let ada = node.user("ada").await;
    let mut ws = node.ws(Some(&ada.token)).await;
    ws.send(Message::text(json!({ "type": "subscribe", "topics": ["projects"] }).to_string())).await.expect("sub");
    let create = |name: &str| {
        let req = node.req(Method::POST, "/api/v1/projects", &ada).json(&json!({ "name": name }));
        async move { req.send().await.expect("post").status().as_u16() }
    };
    assert_eq!(create("lost").await, 500, "the write whose number could not be reserved fails");
    assert_eq!(create("kept").await, 201);
    // Delivery goes on past the number that never carried a change.
    let change = next_change(&mut ws).await;
    assert_eq!(change["data"]["name"], "kept", "{change}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_that_arrives_before_its_user_waits_for_it_instead_of_failing() {
    // Only gossip carries the changes here (no periodic reconciliation), and A publishes
    // every batch in reverse: the new user's profile comes before the user.
    let key = NetworkKey::new();
    let quiet = ["--sync-interval", "off"];
    let a = {
        let args = common::cluster::member_args(&key.path, &[], &quiet);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::Node::start_env(&args, &[("FAILPOINTS", "gossip-reverse=return")]).await
    };
    let b = start_member(&key.path, &[&a], &quiet).await;
    wait_peer(&b, &peer_id(&a), "B to connect to A", REPLICATE, |_| true).await;
    // The first session (on connect) has run: from now on only gossip moves rows.
    let probe = a.user("probe").await;
    login_on(&b, &probe).await;

    let ada = a.user("ada").await;
    let ada_b = login_on(&b, &ada).await;
    wait_get(&b, &format!("/api/v1/profiles/{}", ada.profile_id), &ada_b, 200, |_| true).await;
    let (_, sync) = get(&b, "/api/v1/sync/status", &ada_b).await;
    assert_eq!(sync["waiting_for_dependency"], 0, "nothing left waiting: {sync:#}");
    assert!(!b.log().contains("gossip batch not applied"), "a batch failed on B");
}
