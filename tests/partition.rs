//! A network split in two and healed, in network namespaces of the project's lab
//! (`tests/common/netlab.rs`, `Lab::segment_reachable`): five nodes on one LAN segment,
//! partitioned 2 | 3 by the switch, concurrent writes on both sides, then healed. After
//! healing every node must hold the same rows, within a bounded time, and list every
//! same-field pair of edits as a conflict.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{NetworkKey, get, login_on, rows, wait_get};
use common::netlab::{Lab, reachable_node_in, segment_bootstrap};
use common::{Node, TestUser, or_skip, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const SHARDS: usize = 2;
/// How long the healed network may take to converge (printed as measured).
const CONVERGE: Duration = Duration::from_secs(180);

async fn put(node: &Node, user: &TestUser, path: &str, body: Value) {
    let res = node.req(Method::PUT, path, user).json(&body).send().await.expect("put");
    assert_eq!(res.status(), 200, "PUT {path} on {}", node.api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_network_heals_to_identical_rows_with_every_same_field_edit_a_conflict() {
    let Some(lab) = or_skip(Lab::segment_reachable(5)) else { return };
    let key = NetworkKey::new();
    let member = |bootstrap: Option<String>| {
        // No --kad-mode: nodes on a LAN form the DHT by themselves (AutoNAT confirms them).
        let mut args = vec![
            "--shards".to_owned(),
            SHARDS.to_string(),
            "--network-key-file".into(),
            key.arg(),
            "--sync-interval".into(),
            "2s".into(),
        ];
        if let Some(b) = bootstrap {
            args.extend(["--bootstrap".into(), b]);
        }
        args
    };
    let first = member(None);
    let a = reachable_node_in(&lab, 0, &first.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let joiner = member(Some(segment_bootstrap(0, &a)));
    let joiner: Vec<&str> = joiner.iter().map(String::as_str).collect();
    let mut nodes = vec![a];
    for i in 1..5 {
        nodes.push(reachable_node_in(&lab, i, &joiner).await);
    }
    let all: Vec<&Node> = nodes.iter().collect();

    // Data everyone holds before the split: a user, their profile, two projects.
    let ada = nodes[0].user("ada").await;
    let mut users = vec![ada.clone()];
    for n in &nodes[1..] {
        users.push(login_on(n, &ada).await);
    }
    let create = |name: &str| {
        let req = nodes[0].req(Method::POST, "/api/v1/projects", &ada).json(&json!({ "name": name }));
        async move {
            let v: Value = req.send().await.expect("post").json().await.expect("project");
            format!("/api/v1/projects/{}", v["id"].as_str().expect("id"))
        }
    };
    let shared = create("Shared").await;
    let doomed = create("Doomed").await;
    let profile = format!("/api/v1/profiles/{}", ada.profile_id);
    for (n, u) in nodes.iter().zip(&users) {
        wait_get(n, &doomed, u, 200, |_| true).await;
    }
    // Everyone connected to everyone, so each side keeps a mesh of its own after the split.
    for n in &nodes {
        wait_for("every node to see the four others", CONVERGE, || async {
            let peers = common::p2p::ask(n, cosmicsync::control::Request::NetworkPeers)?;
            (peers.as_array()?.len() >= 4).then_some(())
        })
        .await;
    }

    // Split A,B | C,D,E and write on both sides: the same field of one project on both,
    // different fields of the profile, and a delete against an update.
    lab.partition(&[&[0, 1], &[2, 3, 4]]);
    put(&nodes[0], &users[0], &shared, json!({ "name": "left", "tags": ["left"] })).await;
    put(&nodes[2], &users[2], &shared, json!({ "name": "right", "description": "right side" })).await;
    put(&nodes[1], &users[1], &profile, json!({ "bio": "written on the left" })).await;
    put(&nodes[3], &users[3], &profile, json!({ "name": "Ada (right)" })).await;
    let res = nodes[1].req(Method::DELETE, &doomed, &users[1]).send().await.expect("delete");
    assert_eq!(res.status(), 204);
    put(&nodes[4], &users[4], &doomed, json!({ "name": "edited on the right" })).await;
    // Each side converges on its own writes while split.
    wait_get(&nodes[1], &shared, &users[1], 200, |p| p["name"] == "left").await;
    wait_get(&nodes[4], &shared, &users[4], 200, |p| p["name"] == "right").await;
    let (_, left) = get(&nodes[0], &shared, &users[0]).await;
    assert_eq!(left["name"], "left", "no write crossed the split: {left}");

    // Heal: every node holds the same rows, in bounded time.
    lab.heal();
    let healed = Instant::now();
    let identical = wait_for("all five nodes to hold the same rows", CONVERGE, || async {
        let first = rows(&nodes[0], SHARDS).await;
        for n in &all[1..] {
            if rows(n, SHARDS).await != first {
                return None;
            }
        }
        Some(first.len())
    })
    .await;
    eprintln!("healed: {identical} identical rows on 5 nodes {:.1} s after healing", healed.elapsed().as_secs_f64());

    let project_id = shared.rsplit('/').next().expect("id").to_owned();
    for (n, u) in nodes.iter().zip(&users) {
        let (_, p) = get(n, &shared, u).await;
        assert_eq!(p["description"], "right side", "{p}");
        assert_eq!(p["tags"], json!(["left"]), "{p}");
        assert!(p["name"] == "left" || p["name"] == "right", "{p}");
        let (_, prof) = get(n, &profile, u).await;
        assert_eq!((prof["bio"].as_str(), prof["name"].as_str()), (Some("written on the left"), Some("Ada (right)")));
        assert_eq!(get(n, &doomed, u).await.0, 404, "the delete wins over the concurrent update");
        let (_, page) = get(n, &format!("/api/v1/conflicts?id={project_id}"), u).await;
        let items = page["items"].as_array().expect("items");
        assert_eq!(items.len(), 1, "the name edited on both sides, and only it: {page:#}");
        assert_eq!(items[0]["field"], "name");
        assert_eq!(items[0]["winner"]["value"], p["name"], "every node shows the winner: {page:#}");
    }
}
