//! Recommendations end to end: a real node, users with real profiles, the real
//! `cosmicsync recommend run`, and `GET /api/v1/recommendations/users` checked against
//! what the similarity model says — plus the answers before any run, bad input, a run
//! that fails half-way (the previous results must stay), and timed runs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Node, PgGuard, TestUser, binary, wait_for};
use cosmicsync::placement::Router;
use cosmicsync::similarity::{Mode, Model, Params, UserFeatures};
use reqwest::Method;
use serde_json::{Value, json};

/// The longest one CLI call may take.
const CLI_DEADLINE: Duration = Duration::from_secs(120);

/// What a CLI call produced.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `cosmicsync --data-dir <dir> <args>`, with no `COSMICSYNC_*` variables, within a deadline.
async fn cli(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.arg("--data-dir").arg(dir).args(args).kill_on_drop(true);
    for (name, _) in std::env::vars_os().filter(|(n, _)| n.to_string_lossy().starts_with("COSMICSYNC_")) {
        cmd.env_remove(name);
    }
    let out = tokio::time::timeout(CLI_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`cosmicsync {}` took longer than {CLI_DEADLINE:?}", args.join(" ")))
        .expect("run cosmicsync");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sets a user's skills and interests.
async fn profile(node: &Node, user: &TestUser, skills: &[&str], interests: &[&str]) {
    let res = node
        .req(Method::PUT, &format!("/api/v1/profiles/{}", user.profile_id), user)
        .json(&json!({ "skills": skills, "interests": interests }))
        .send()
        .await
        .expect("profile update");
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
}

/// `GET /api/v1/recommendations/users?<query>` as `user`: (status, body).
async fn recommendations(node: &Node, user: &TestUser, query: &str) -> (u16, Value) {
    let res = node.req(Method::GET, &format!("/api/v1/recommendations/users?{query}"), user).send().await.unwrap();
    let status = res.status().as_u16();
    if status != 200 {
        let kind = res.headers()["content-type"].to_str().unwrap_or_default().to_owned();
        assert!(kind.starts_with("application/problem+json"), "{status} with {kind}");
    }
    (status, res.json().await.unwrap_or(Value::Null))
}

/// `recommend run --json`, which must succeed: the finished run.
async fn run_ok(dir: &Path) -> Value {
    let run = cli(dir, &["recommend", "run", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run:#?}"))
}

fn skipped() -> bool {
    !common::have_postgres()
}

#[tokio::test]
async fn recommendations_follow_the_model() {
    if skipped() {
        return;
    }
    let node = Node::start(&["--recommend-interval", "off", "--recommend-k", "3"]).await;
    let people: [(&str, &[&str], &[&str]); 6] = [
        ("ada", &["Rust", "Quantum Chemistry", "sql"], &["Gardening"]),
        ("bea", &[" quantum   chemistry ", "rust"], &["painting"]),
        ("cyd", &["rust", "python"], &["cooking"]),
        ("dan", &["python", "sql"], &["rust"]),
        ("eve", &["gardening", "knitting"], &[]),
        ("fay", &[], &[]),
    ];
    let mut users = Vec::new();
    for (name, skills, interests) in people {
        let user = node.user(name).await;
        profile(&node, &user, skills, interests).await;
        users.push(user);
    }
    let ada = &users[0];

    // Before any run: a clear answer, never an error.
    let (status, body) = recommendations(&node, ada, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "no_run_yet", "{body}");
    assert_eq!(body["computed_at"], Value::Null);
    assert_eq!(body["users"], json!([]));
    assert!(body["explanation"].as_str().is_some_and(|e| !e.is_empty()));

    // Bad input: 400 problems; no token: 401.
    for query in ["mode=best", "mode=", "limit=0", "limit=4", "limit=ten", "limit=-1"] {
        let (status, body) = recommendations(&node, ada, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["status"], 400);
    }
    let res = node.client.get(node.url("/api/v1/recommendations/users")).send().await.unwrap();
    assert_eq!(res.status(), 401);

    let finished = run_ok(&node.dir).await;
    assert_eq!(finished["users"], 6, "{finished}");

    // Qualitatively: the rare shared skill ranks first; complementary finds the gardener.
    let (status, similar) = recommendations(&node, ada, "mode=similar").await;
    assert_eq!(status, 200, "{similar}");
    assert_eq!(similar["status"], "ready");
    assert!(similar["computed_at"].is_string(), "{similar}");
    assert_eq!(similar["users"][0]["username"], "bea", "{similar}");
    let why = &similar["users"][0]["shared_features"];
    assert!(why.as_array().unwrap().contains(&json!({ "kind": "skill", "name": "quantum chemistry" })), "{why}");
    let (_, complementary) = recommendations(&node, ada, "mode=complementary").await;
    assert_eq!(complementary["users"][0]["username"], "eve", "{complementary}");
    assert_eq!(complementary["users"][0]["shared_features"], json!([{ "kind": "skill", "name": "gardening" }]));
    let (_, nobody) = recommendations(&node, &users[5], "").await;
    assert_eq!((nobody["status"].as_str(), nobody["users"].as_array().map(Vec::len)), (Some("ready"), Some(0)));

    // Exactly: every user's answer equals the model's top k on the same profiles.
    let features: Vec<UserFeatures> = people
        .iter()
        .zip(&users)
        .map(|((_, skills, interests), u)| UserFeatures {
            id: u.id,
            skills: skills.iter().map(|s| s.to_string()).collect(),
            interests: interests.iter().map(|s| s.to_string()).collect(),
        })
        .collect();
    let model = Model::build(&features, &Params::default());
    for mode in Mode::ALL {
        let top = model.top_k(mode, 3, &|_| {});
        for (i, user) in users.iter().enumerate() {
            let (status, body) = recommendations(&node, user, &format!("mode={}&limit=3", mode.as_str())).await;
            assert_eq!(status, 200);
            let got = body["users"].as_array().unwrap();
            assert_eq!(got.len(), top[i].len(), "{} in {mode:?}: {body}", user.username);
            for (g, want) in got.iter().zip(&top[i]) {
                assert_eq!(g["user_id"], json!(model.id(want.user)), "{} in {mode:?}: {body}", user.username);
                assert!((g["score"].as_f64().unwrap() - want.score).abs() < 1e-9, "{body}");
                assert_eq!(g["shared_features"], json!(model.shared(mode, i as u32, want.user)));
            }
        }
    }
    let (_, one) = recommendations(&node, ada, "limit=1").await;
    assert_eq!(one["users"].as_array().map(Vec::len), Some(1));

    // The last run shows in both status views.
    let status = cli(&node.dir, &["status", "--json"]).await;
    let report: Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(report["recommendations"]["last_run"]["users"], 6, "{report}");
    assert_eq!(report["recommendations"]["last_run"]["generation"], finished["generation"]);
    let human = cli(&node.dir, &["status"]).await;
    assert!(human.stdout.contains("last run") && human.stdout.contains("for 6 users"), "{human:#?}");
    let res = node.req(Method::GET, "/api/v1/network/status", ada).send().await.unwrap();
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["recommendations"]["last_run"]["generation"], finished["generation"], "{report}");
    assert_eq!(report["recommendations"]["k"], 3);

    // After a restart (tokens stay valid: same key) the results are still served, and the
    // status still knows the run.
    let mut node = node;
    let temp = node.take_temp();
    let dir = node.dir.clone();
    node.stop();
    drop(node);
    let node = Node::start_in(&dir, &["--recommend-interval", "off", "--recommend-k", "3"]).await;
    assert_eq!(recommendations(&node, ada, "mode=similar").await.1, similar);
    wait_for("the restarted node to report the last run", Duration::from_secs(60), || async {
        let status = cli(&node.dir, &["status", "--json"]).await;
        let report: Value = serde_json::from_str(&status.stdout).ok()?;
        (report["recommendations"]["last_run"]["generation"] == finished["generation"]).then_some(())
    })
    .await;
    drop(node);
    drop(temp);
}

#[tokio::test]
async fn a_failed_run_leaves_the_previous_results() {
    if skipped() {
        return;
    }
    // Four shards on one server the test can reach, to make one refuse writes.
    let dirs = tempfile::tempdir().unwrap();
    let pg = PgGuard::start(&dirs.path().join("pg"));
    let names: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    pg.ensure_databases(&names).unwrap();
    let urls: Vec<String> = names.iter().map(|n| pg.url(n)).collect();
    let mut args = vec!["--recommend-interval", "off"];
    for u in &urls {
        args.extend(["--shard-url", u.as_str()]);
    }
    let node = Node::start(&args).await;

    // Everyone shares "rust", so everyone has neighbours; at least one user on shard 3
    // and some elsewhere.
    let router = Router::new(4);
    let mut users = Vec::new();
    for i in 0..40 {
        let user = node.user(&format!("user{i}")).await;
        profile(&node, &user, &["rust", &format!("skill{}", i % 3)], &[]).await;
        users.push(user);
        let on_3 = users.iter().filter(|u| router.shard_of(&u.id) == 3).count();
        if on_3 >= 1 && users.len() - on_3 >= 3 {
            break;
        }
    }
    assert!(users.iter().any(|u| router.shard_of(&u.id) == 3), "no user landed on shard 3");

    let first = run_ok(&node.dir).await;
    let mut before = Vec::new();
    for u in &users {
        before.push(recommendations(&node, u, "").await.1);
    }
    assert!(before.iter().all(|b| b["status"] == "ready" && !b["users"].as_array().unwrap().is_empty()));

    // New profiles would change every answer; then shard 3 refuses the new rows.
    for u in &users {
        profile(&node, u, &["go", "haskell"], &[]).await;
    }
    let (client, connection) = tokio_postgres::connect(&urls[3], tokio_postgres::NoTls).await.expect("connect to s3");
    let connection = tokio::spawn(connection);
    client
        .batch_execute("ALTER TABLE recommendations ADD CONSTRAINT refuse_new_rows CHECK (false) NOT VALID")
        .await
        .expect("make shard 3 refuse writes");
    let failed = cli(&node.dir, &["recommend", "run", "--json"]).await;
    assert_eq!(failed.code, Some(1), "{failed:#?}");
    assert!(failed.stderr.contains("shard 3"), "{failed:#?}");

    // Every user, on every shard, still sees exactly the first run's results.
    for (u, was) in users.iter().zip(&before) {
        assert_eq!(&recommendations(&node, u, "").await.1, was, "{}", u.username);
    }
    let status = cli(&node.dir, &["status", "--json"]).await;
    let report: Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(report["recommendations"]["last_run"]["generation"], first["generation"], "{report}");
    assert!(report["recommendations"]["last_failure"]["error"].as_str().unwrap_or_default().contains("shard 3"));

    // Once the shard accepts writes again, a run serves the new profiles.
    client.batch_execute("ALTER TABLE recommendations DROP CONSTRAINT refuse_new_rows").await.unwrap();
    let third = run_ok(&node.dir).await;
    assert_ne!(third["generation"], first["generation"]);
    for (u, was) in users.iter().zip(&before) {
        let (_, now) = recommendations(&node, u, "").await;
        assert_ne!(now["computed_at"], was["computed_at"]);
        let why = &now["users"][0]["shared_features"];
        assert!(why.as_array().unwrap().iter().any(|f| f["name"] == "haskell"), "{now}");
    }
    drop(client);
    let _ = connection.await;
    drop(node);
}

#[tokio::test]
async fn timed_runs_happen_on_their_own() {
    if skipped() {
        return;
    }
    let node = Node::start(&["--recommend-interval", "1s"]).await;
    let (ann, bob) = (node.user("ann").await, node.user("bob").await);
    profile(&node, &ann, &["welding"], &[]).await;
    profile(&node, &bob, &["welding"], &[]).await;
    let first = wait_for("a timed run to serve ann's match", Duration::from_secs(60), || async {
        let (_, body) = recommendations(&node, &ann, "").await;
        (body["users"][0]["username"] == "bob").then_some(body)
    })
    .await;
    assert!(first["computed_at"].is_string());
    let res = node.req(Method::GET, "/api/v1/network/status", &ann).send().await.unwrap();
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["recommendations"]["interval_secs"], 1, "{report}");
    assert!(report["recommendations"]["last_run"]["users"].as_u64() >= Some(2), "{report}");
}
