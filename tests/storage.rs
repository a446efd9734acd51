//! Storage guarantees, checked in PostgreSQL itself: the change log records every write
//! with its clock; cross-shard transactions left in doubt are settled; a crash never
//! leaves a half-created user; reads are answered while password hashing is busy; a data
//! directory cannot be started with another shard count than its data was created with.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{FAST, Node, PASSWORD, shard_db, start_foreground, wait_for};
use cosmicsync::sealing::{Sealed, email_context};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn change_log_records_every_write_with_its_clock() {
    let node = Node::start(&[]).await;
    let node_id = node.info["node_id"].as_str().unwrap().to_owned();
    let ada = node.user("ada").await;
    let path = format!("/api/v1/profiles/{}", ada.profile_id);
    node.req(Method::PUT, &path, &ada).json(&json!({ "bio": "hi" })).send().await.unwrap();
    let res = node.req(Method::POST, "/api/v1/projects", &ada).json(&json!({ "name": "p" })).send().await.unwrap();
    let project: Value = res.json().await.unwrap();
    let pid = project["id"].as_str().unwrap();
    node.req(Method::PUT, &format!("/api/v1/projects/{pid}"), &ada).json(&json!({ "name": "q" })).send().await.unwrap();
    node.req(Method::DELETE, &format!("/api/v1/projects/{pid}"), &ada).send().await.unwrap();

    // Every entry of every shard, in sequence order.
    let mut entries = Vec::new();
    for shard in 0..4 {
        let db = shard_db(&node.dir, shard).await;
        for row in db
            .query("SELECT seq, origin, origin_seq, entity, op, row_id, vclock, data FROM changes", &[])
            .await
            .unwrap()
        {
            let (seq, origin, origin_seq): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
            let (entity, op, id): (String, String, Uuid) = (row.get(3), row.get(4), row.get(5));
            let (vclock, data): (Value, Value) = (row.get(6), row.get(7));
            entries.push((seq, origin, origin_seq, entity, op, id, vclock, data));
        }
    }
    entries.sort_by_key(|e| e.0);
    let summary: Vec<(String, String)> = entries.iter().map(|e| (e.3.clone(), e.4.clone())).collect();
    let expected = [
        ("user", "create"),
        ("profile", "create"),
        ("profile", "update"),
        ("project", "create"),
        ("project", "update"),
        ("project", "delete"),
    ];
    assert_eq!(summary, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
    for (seq, origin, origin_seq, _, _, _, _, data) in &entries {
        assert_eq!(origin, &node_id);
        assert_eq!(origin_seq, seq);
        assert!(data.get("email").is_none() && data.get("password_hash").is_none(), "{data}");
    }
    let counters: Vec<u64> = entries.iter().map(|e| e.6[&node_id].as_u64().unwrap()).collect();
    assert_eq!(counters, [1, 1, 2, 1, 2, 3], "each update bumps this node's entry of the row's clock");

    // The row keeps the clock of its last change; the deleted project is a tombstone.
    let db = shard_db(&node.dir, node_shard(&ada.id)).await;
    let row = db
        .query_one("SELECT vclock, deleted_at IS NOT NULL FROM projects WHERE id = $1", &[&entries[3].5])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Value>(0), entries[5].6);
    assert!(row.get::<_, bool>(1));
}

fn node_shard(id: &Uuid) -> usize {
    cosmicsync::placement::Router::new(4).shard_of(id)
}

#[tokio::test]
async fn transactions_left_in_doubt_are_settled_on_start() {
    let mut node = Node::start(&[]).await;
    node.user("ada").await;
    let temp = node.take_temp();
    let dir = node.dir.clone();
    drop(node);

    // Leave two prepared directory claims behind, as a crash between the phases would:
    // one whose coordinator (shard 0) recorded a commit, one with no decision.
    // Guarded, so a failing step cannot leave this server running after the test.
    let pg = common::PgGuard::start(&dir.join("pg"));
    let (committed, undecided) = (Uuid::now_v7(), Uuid::now_v7());
    let participant = shard_db(&dir, 1).await;
    for (txid, name) in [(committed, "ghost-committed"), (undecided, "ghost-undecided")] {
        participant.batch_execute("BEGIN").await.unwrap();
        participant
            .execute(
                "INSERT INTO directory (kind, key, user_id) VALUES ('username', $1, $2)",
                &[&name, &Uuid::now_v7()],
            )
            .await
            .unwrap();
        participant.batch_execute(&format!("PREPARE TRANSACTION 'cs:{txid}:0:1'")).await.unwrap();
    }
    let coordinator = shard_db(&dir, 0).await;
    coordinator.execute("INSERT INTO tx_decisions (txid, outcome) VALUES ($1, 'commit')", &[&committed]).await.unwrap();
    drop((participant, coordinator));
    pg.stop().unwrap();

    let node = Node::start_in(&dir, &[]).await;
    let db = shard_db(&dir, 1).await;
    let prepared: i64 = db.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get(0);
    assert_eq!(prepared, 0, "every prepared transaction was settled before the node said it was ready");
    let names: Vec<String> = db
        .query("SELECT key FROM directory WHERE key LIKE 'ghost%'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["ghost-committed"]);
    assert!(node.log().contains("settled cross-shard transactions"));

    // tx_decisions is pruned: the recovered commit is forgotten once no shard holds it
    // prepared; the abort recovery recorded stays while its coordinator could still be
    // running, and goes once older than the retention (made so here by backdating it).
    let coordinator = shard_db(&dir, 0).await;
    let decisions =
        |rows: Vec<tokio_postgres::Row>| -> Vec<(Uuid, String)> { rows.iter().map(|r| (r.get(0), r.get(1))).collect() };
    let query = "SELECT txid, outcome FROM tx_decisions ORDER BY txid";
    assert_eq!(decisions(coordinator.query(query, &[]).await.unwrap()), [(undecided, "abort".to_owned())]);
    coordinator
        .execute("UPDATE tx_decisions SET decided_at = now() - interval '2 days' WHERE txid = $1", &[&undecided])
        .await
        .unwrap();
    wait_for("the old abort decision to be pruned", Duration::from_secs(60), || {
        let coordinator = &coordinator;
        async move { coordinator.query(query, &[]).await.unwrap().is_empty().then_some(()) }
    })
    .await;
    drop(node);
    drop(temp);
}

#[tokio::test]
async fn a_crash_never_leaves_a_half_created_user() {
    let mut node = Node::start(&[]).await;
    let (client, api) = (node.client.clone(), node.api.clone());
    let created = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (client, api, created) = (client.clone(), api.clone(), created.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{w}u{i}");
                let res = client
                    .post(format!("{api}/api/v1/users"))
                    .json(&json!({ "username": name, "email": format!("{name}@example.org"), "password": PASSWORD }))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 201 => {
                        created.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
        }));
    }
    wait_for("registrations under way", Duration::from_secs(60), || {
        let n = created.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= 40).then_some(()) }
    })
    .await;
    // Kill the node mid-burst: no graceful anything. Its PostgreSQL keeps running.
    let mut child = node.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    for w in workers {
        let _ = w.await;
    }
    let acknowledged = created.load(std::sync::atomic::Ordering::SeqCst);
    let temp = node.take_temp();
    let dir = node.dir.clone();
    drop(node);

    let node = Node::start_in(&dir, &[]).await;
    let keys = common::keyring(&dir);
    let mut users = BTreeMap::new();
    let mut directory = BTreeSet::new();
    for shard in 0..4 {
        let db = shard_db(&dir, shard).await;
        let prepared: i64 = db.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).await.unwrap().get(0);
        assert_eq!(prepared, 0);
        for r in db.query("SELECT id, lower(username), email_key, email_sealed FROM users", &[]).await.unwrap() {
            let id: Uuid = r.get(0);
            let sealed = Sealed { key_id: r.get(2), bytes: r.get(3) };
            let email = keys.open_string(&sealed, &email_context(&id)).expect("the email opens with the node's key");
            users.insert(id, (r.get::<_, String>(1), keys.blind_index("email", &email.to_lowercase())));
        }
        for r in db.query("SELECT kind, key, user_id FROM directory", &[]).await.unwrap() {
            directory.insert((r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, Uuid>(2)));
        }
        let orphans: i64 = db
            .query_one(
                "SELECT count(*) FROM users u WHERE NOT EXISTS (SELECT 1 FROM profiles p WHERE p.user_id = u.id)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(orphans, 0, "a user without a profile");
    }
    assert!(users.len() >= acknowledged, "{} users stored, {acknowledged} acknowledged", users.len());
    let expected: BTreeSet<(String, String, Uuid)> = users
        .iter()
        .flat_map(|(id, (name, email))| {
            [("username".to_owned(), name.clone(), *id), ("email".to_owned(), email.clone(), *id)]
        })
        .collect();
    assert_eq!(directory, expected, "directory and users disagree");
    // And the node works: a user created before the crash can log in.
    assert_eq!(node.login("w0u0", PASSWORD).await.status(), 200);
    drop(node);
    drop(temp);
}

/// Password hashing never holds up other requests, on any number of cores: the test
/// itself keeps every hashing job in flight (fail point `password-work`, released by a
/// file), so the reads below are made while the pool is busy and a queue waits for it.
/// Were bcrypt run on an actor thread, the held job would block it and the reads with it.
#[tokio::test]
async fn reads_are_answered_while_password_hashing_is_busy() {
    let release_dir = tempfile::tempdir().expect("temp dir");
    let release = release_dir.path().join("release");
    // Present while the user registers (nothing is held), removed to hold the logins.
    std::fs::write(&release, "").expect("release file");
    let failpoint = format!("FAILPOINTS=password-work=return({})", release.display());
    let node = Node::start_wrapped_temp(&["env", &failpoint], common::FAST).await;
    let ada = node.user("ada").await;
    std::fs::remove_file(&release).expect("remove the release file");

    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let burst = tokio::spawn({
        let (client, url, done) = (node.client.clone(), node.url("/api/v1/auth/login"), done.clone());
        async move {
            let sends = (0..24).map(|_| async {
                let ok = client
                    .post(&url)
                    .json(&json!({ "username": "ada", "password": PASSWORD }))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                ok
            });
            futures_util::future::join_all(sends).await.into_iter().filter(|ok| *ok).count()
        }
    });
    node.wait_log("a bcrypt job held", |l| l.contains("fail point password-work: holding")).await;

    let reads = async {
        for _ in 0..50 {
            let res = node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada).send().await.unwrap();
            assert_eq!(res.status(), 200);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), reads).await.expect("reads answered while hashing is held");
    // Nothing is released until the file exists, so every login is still in flight.
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 0, "a login finished while its hash was held");
    std::fs::write(&release, "").expect("release file");
    assert_eq!(burst.await.unwrap(), 24);
}

/// Rows are placed by the shard count, so the count a data directory was created with is
/// kept: another `--shards` is refused with the count to use, also for a data directory
/// from before the count was recorded, and with the right count every user is there.
#[tokio::test]
async fn a_data_directory_keeps_its_shard_count() {
    let mut node = Node::start(&["--shards", "4"]).await;
    let temp = node.take_temp().expect("temp dir");
    let dir = temp.path();
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(node.user(&format!("user{i}")).await);
    }
    node.stop();
    drop(node);
    assert_eq!(std::fs::read_to_string(dir.join("shard_count")).expect("shard_count").trim(), "4");

    let with_shards = |n: &'static str| -> Vec<&str> { FAST.iter().copied().chain(["--shards", n]).collect() };
    let run = start_foreground(dir, &with_shards("2")).expect(1);
    assert!(run.stderr.contains("created with 4 shards") && run.stderr.contains("--shards 4"), "{run:#?}");
    assert!(!dir.join("node.json").exists(), "a refused node announced itself");
    // A directory from before the count was kept: its databases tell.
    std::fs::remove_file(dir.join("shard_count")).expect("remove shard_count");
    let run = start_foreground(dir, &with_shards("8")).expect(1);
    assert!(run.stderr.contains("created with 4 shards (counted from its shard databases)"), "{run:#?}");

    let node = Node::start_in(dir, &["--shards", "4"]).await;
    assert_eq!(std::fs::read_to_string(dir.join("shard_count")).expect("shard_count").trim(), "4");
    for user in &users {
        let res = node.req(Method::GET, &format!("/api/v1/users/{}", user.id), user).send().await.unwrap();
        assert_eq!(res.status(), 200, "{} is missing", user.username);
        assert_eq!(node.login(&user.username, PASSWORD).await.status(), 200, "{} cannot log in", user.username);
    }
    drop(node);
    drop(temp);
}
