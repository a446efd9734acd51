//! The WebSocket end to end: the real binary, real PostgreSQL, `wss://` as a browser or
//! app would use it — authentication, ordered change streams, filters, resuming without
//! loss or duplicates, and the limits (bad messages, big frames, slow clients, timers).

mod common;

use std::time::{Duration, Instant};

use common::{Node, TestUser, Ws, wait_for};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// How long any single expected frame may take.
const WAIT: Duration = Duration::from_secs(30);

/// A frame from the server as the tests care about it.
#[derive(Debug)]
enum Frame {
    Json(Value),
    /// A close frame (code, reason), or 1006 when the connection ended without one.
    Closed(u16, String),
}

async fn next_frame(ws: &mut Ws) -> Frame {
    // One deadline for the frame: the server's pings must not keep extending it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("a frame from the server in time");
        match msg {
            Some(Ok(Message::Text(text))) => return Frame::Json(serde_json::from_str(&text).expect("JSON text")),
            Some(Ok(Message::Close(frame))) => {
                return frame
                    .map(|f| Frame::Closed(f.code.into(), f.reason.to_string()))
                    .unwrap_or(Frame::Closed(1005, String::new()));
            }
            Some(Ok(_)) => continue, // ping/pong/binary: not part of the protocol under test
            Some(Err(e)) => return Frame::Closed(1006, e.to_string()),
            None => return Frame::Closed(1006, "connection ended".into()),
        }
    }
}

/// The next JSON message; panics on a close.
async fn recv(ws: &mut Ws) -> Value {
    match next_frame(ws).await {
        Frame::Json(v) => v,
        Frame::Closed(code, reason) => panic!("closed ({code}): {reason}"),
    }
}

/// The next message, which must be of this type.
async fn expect(ws: &mut Ws, kind: &str) -> Value {
    let v = recv(ws).await;
    assert_eq!(v["type"], kind, "expected {kind}, got {v}");
    v
}

/// Reads until the close frame; returns it and the changes received before it.
async fn until_close(ws: &mut Ws) -> (u16, String, Vec<Value>) {
    let mut changes = Vec::new();
    loop {
        match next_frame(ws).await {
            Frame::Json(v) if v["type"] == "change" => changes.push(v),
            Frame::Json(v) => panic!("unexpected message before the close: {v}"),
            Frame::Closed(code, reason) => return (code, reason, changes),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Connects with a header token and waits for `ready`.
async fn connect(node: &Node, user: &TestUser) -> Ws {
    let mut ws = node.ws(Some(&user.token)).await;
    let ready = expect(&mut ws, "ready").await;
    assert_eq!(ready["user_id"], user.id.to_string());
    ws
}

/// Subscribes; returns the watermark from `subscribed`.
async fn subscribe(ws: &mut Ws, topics: &[String], since: Option<i64>) -> i64 {
    let mut msg = json!({ "type": "subscribe", "topics": topics });
    if let Some(since) = since {
        msg["since"] = json!(since);
    }
    send(ws, msg).await;
    let subscribed = expect(ws, "subscribed").await;
    assert_eq!(subscribed["topics"], json!(topics));
    subscribed["seq"].as_i64().expect("seq")
}

fn topics(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn seq(change: &Value) -> i64 {
    change["seq"].as_i64().expect("change seq")
}

/// `(op, id)` of a change, to compare with the writes a test made.
fn op_id(change: &Value) -> (String, Uuid) {
    (change["op"].as_str().expect("op").to_owned(), change["id"].as_str().and_then(|s| s.parse().ok()).expect("id"))
}

async fn create_project(node: &Node, user: &TestUser, name: &str, description: &str) -> Uuid {
    let res = node
        .req(Method::POST, "/api/v1/projects", user)
        .json(&json!({ "name": name, "description": description }))
        .send()
        .await
        .expect("create project");
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.expect("project");
    body["id"].as_str().and_then(|s| s.parse().ok()).expect("project id")
}

async fn update_project(node: &Node, user: &TestUser, id: Uuid, name: &str) {
    let res = node
        .req(Method::PUT, &format!("/api/v1/projects/{id}"), user)
        .json(&json!({ "name": name }))
        .send()
        .await
        .expect("update project");
    assert_eq!(res.status(), 200);
}

async fn delete_project(node: &Node, user: &TestUser, id: Uuid) {
    let res = node.req(Method::DELETE, &format!("/api/v1/projects/{id}"), user).send().await.expect("delete");
    assert_eq!(res.status(), 204);
}

async fn update_bio(node: &Node, user: &TestUser, bio: &str) {
    let res = node
        .req(Method::PUT, &format!("/api/v1/profiles/{}", user.profile_id), user)
        .json(&json!({ "bio": bio }))
        .send()
        .await
        .expect("update profile");
    assert_eq!(res.status(), 200);
}

/// Reads `n` changes (nothing else may come in between).
async fn changes(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(expect(ws, "change").await);
    }
    out
}

#[tokio::test]
async fn authenticates_by_message_or_header_and_refuses_bad_tokens() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;

    // By first message (what a browser does).
    let mut by_message = node.ws(None).await;
    send(&mut by_message, json!({ "type": "auth", "token": ada.token })).await;
    let ready = expect(&mut by_message, "ready").await;
    assert_eq!(ready["user_id"], ada.id.to_string());
    assert!(ready["expires_at"].as_i64().is_some());

    // By header.
    let mut by_header = connect(&node, &ada).await;

    // Bad tokens, either way, are closed with 1008 and a reason.
    let mut bad = node.ws(None).await;
    send(&mut bad, json!({ "type": "auth", "token": "not-a-token" })).await;
    let (code, reason, _) = until_close(&mut bad).await;
    assert_eq!((code, reason.as_str()), (1008, "the access token is invalid or expired"));
    let mut bad = node.ws(Some("not-a-token")).await;
    let (code, reason, _) = until_close(&mut bad).await;
    assert_eq!((code, reason.as_str()), (1008, "the access token is invalid or expired"));
    // Anything but auth first is refused too.
    let mut early = node.ws(None).await;
    send(&mut early, json!({ "type": "subscribe", "topics": ["all"] })).await;
    let (code, reason, _) = until_close(&mut early).await;
    assert_eq!(code, 1008);
    assert!(reason.starts_with("authenticate first"), "{reason}");
    // A token in the URL is not a way in: the session still waits for one.
    let url = format!("{}/api/v1/ws?token={}", node.api.replacen("https://", "wss://", 1), ada.token);
    let connector = tokio_tungstenite::Connector::Rustls(node.rustls_config());
    let (mut in_url, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)).await.expect("connect");
    send(&mut in_url, json!({ "type": "subscribe", "topics": ["all"] })).await;
    assert_eq!(until_close(&mut in_url).await.0, 1008);
    // A revoked token is refused.
    let res = node.req(Method::POST, "/api/v1/auth/logout", &ada).send().await.expect("logout");
    assert!(res.status().is_success());
    let mut revoked = node.ws(Some(&ada.token)).await;
    let (code, reason, _) = until_close(&mut revoked).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("revoked"), "{reason}");

    // Bad messages get an error and the connection stays usable.
    let bob = node.user("bob").await;
    let mut ws = connect(&node, &bob).await;
    for (msg, expected) in [
        ("not json".to_owned(), "invalid message"),
        (json!({ "type": "hello" }).to_string(), "unknown variant"),
        (json!({ "type": "subscribe", "topics": ["nope"] }).to_string(), "unknown topic"),
        (json!({ "type": "subscribe", "topics": ["user:123"] }).to_string(), "valid UUID"),
        (json!({ "type": "subscribe", "topics": [] }).to_string(), "at least one topic"),
        (json!({ "type": "subscribe", "topics": ["all"], "since": -1 }).to_string(), "since"),
        (json!({ "type": "auth", "token": bob.token }).to_string(), "already authenticated"),
    ] {
        ws.send(Message::text(msg.clone())).await.expect("send");
        let error = expect(&mut ws, "error").await;
        assert!(error["message"].as_str().unwrap_or("").contains(expected), "{msg} -> {error}");
    }
    ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    expect(&mut ws, "error").await;
    subscribe(&mut ws, &topics(&["projects"]), None).await;
    send(&mut ws, json!({ "type": "subscribe", "topics": ["users"] })).await;
    let error = expect(&mut ws, "error").await;
    assert!(error["message"].as_str().unwrap_or("").contains("already subscribed"), "{error}");
    // That was 9 bad messages; 20 is the limit, the 21st closes the connection.
    for _ in 0..11 {
        send(&mut ws, json!({ "type": "nope" })).await;
        expect(&mut ws, "error").await;
    }
    send(&mut ws, json!({ "type": "nope" })).await;
    let (code, reason, _) = until_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1008, "more than 20 bad messages"));

    // A frame over 64 KiB closes the connection.
    by_header.send(Message::text("x".repeat(65 * 1024))).await.expect("send");
    let (code, reason, _) = until_close(&mut by_header).await;
    assert_eq!((code, reason.as_str()), (1008, "frame larger than 64 KiB"));

    // The message-authenticated session still works: it subscribes.
    subscribe(&mut by_message, &topics(&["all"]), None).await;
}

#[tokio::test]
async fn streams_project_changes_in_order() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let mut ws = connect(&node, &ada).await;
    let watermark = subscribe(&mut ws, &topics(&["projects"]), None).await;

    let id = create_project(&node, &ada, "Apollo", "to the moon").await;
    update_project(&node, &ada, id, "Apollo 11").await;
    update_bio(&node, &ada, "not a project change").await;
    delete_project(&node, &ada, id).await;

    let got = changes(&mut ws, 3).await;
    let ops: Vec<(String, Uuid)> = got.iter().map(op_id).collect();
    assert_eq!(ops, vec![("create".into(), id), ("update".into(), id), ("delete".into(), id)]);
    let seqs: Vec<i64> = got.iter().map(seq).collect();
    assert!(seqs[0] > watermark && seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?} after {watermark}");
    for change in &got {
        assert_eq!(change["entity"], "project");
        assert_eq!(change["owner_id"], ada.id.to_string());
        for key in ["origin", "origin_seq", "vclock", "data", "committed_at"] {
            assert!(!change[key].is_null(), "change without {key}: {change}");
        }
    }
    assert_eq!(got[0]["data"]["name"], "Apollo");
    assert_eq!(got[1]["data"]["name"], "Apollo 11");
    // Nothing private in a user change either: subscribe to users and rename.
    let mut users = connect(&node, &ada).await;
    subscribe(&mut users, &topics(&["users"]), None).await;
    let res = node
        .req(Method::PUT, &format!("/api/v1/users/{}", ada.id), &ada)
        .json(&json!({ "username": "ada2" }))
        .send()
        .await
        .expect("rename");
    assert_eq!(res.status(), 200);
    let change = expect(&mut users, "change").await;
    assert_eq!((change["entity"].as_str(), change["data"]["username"].as_str()), (Some("user"), Some("ada2")));
    let text = change.to_string();
    assert!(!text.contains("example.org") && !text.contains("password"), "private data in {text}");
}

#[tokio::test]
async fn filters_deliver_only_what_was_asked_for() {
    let node = Node::start(&[]).await;
    let (ada, bob) = (node.user("ada").await, node.user("bob").await);
    let mut everything = connect(&node, &ada).await;
    subscribe(&mut everything, &topics(&["all"]), None).await;
    let mut adas = connect(&node, &ada).await;
    subscribe(&mut adas, &[format!("user:{}", ada.id)], None).await;

    // Bob's changes first, then one of Ada's. Streams are in sequence order, so if Bob's
    // leaked into Ada's filter they would arrive before hers.
    let bobs_project = create_project(&node, &bob, "Bob's", "").await;
    update_bio(&node, &bob, "bob's bio").await;
    let adas_project = create_project(&node, &ada, "Ada's", "").await;
    update_bio(&node, &ada, "ada's bio").await;

    let all = changes(&mut everything, 4).await;
    assert_eq!(all.iter().map(|c| c["owner_id"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>(), {
        let (a, b) = (ada.id.to_string(), bob.id.to_string());
        vec![b.clone(), b, a.clone(), a]
    });
    let mine = changes(&mut adas, 2).await;
    assert_eq!(op_id(&mine[0]), ("create".into(), adas_project));
    assert_eq!(
        (mine[1]["entity"].as_str(), mine[1]["id"].as_str()),
        (Some("profile"), Some(&*ada.profile_id.to_string()))
    );
    assert_eq!(seq(&mine[0]), seq(&all[2]));

    // One project, by id, on a connection of Bob's.
    let mut one = connect(&node, &bob).await;
    subscribe(&mut one, &[format!("project:{bobs_project}")], None).await;
    update_project(&node, &ada, adas_project, "Ada's, renamed").await;
    update_project(&node, &bob, bobs_project, "Bob's, renamed").await;
    let got = expect(&mut one, "change").await;
    assert_eq!(op_id(&got), ("update".into(), bobs_project));
}

#[tokio::test]
async fn reconnecting_with_since_loses_and_repeats_nothing() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let topics = topics(&["projects"]);
    // A reference subscriber that never disconnects.
    let mut reference = connect(&node, &ada).await;
    subscribe(&mut reference, &topics, None).await;
    let mut a = connect(&node, &ada).await;
    subscribe(&mut a, &topics, None).await;

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create_project(&node, &ada, &format!("before {i}"), "").await);
    }
    let seen = changes(&mut a, 3).await;
    let last = seq(&seen[2]);
    a.close(None).await.expect("close");
    drop(a);

    // While A is away: creates, updates, a delete, a change A does not subscribe to, and
    // enough more that the history takes more than one page to read.
    let mut made = Vec::new();
    for i in 0..5 {
        let id = create_project(&node, &ada, &format!("away {i}"), "").await;
        made.push(("create".to_owned(), id));
        ids.push(id);
    }
    update_project(&node, &ada, ids[0], "renamed").await;
    made.push(("update".into(), ids[0]));
    update_bio(&node, &ada, "not a project").await;
    delete_project(&node, &ada, ids[4]).await;
    made.push(("delete".into(), ids[4]));
    let bulk: Vec<Uuid> = futures_util::stream::iter(0..700)
        .map(|i| {
            let (node, ada) = (&node, &ada);
            async move { create_project(node, ada, &format!("bulk {i}"), "").await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    made.extend(bulk.into_iter().map(|id| ("create".to_owned(), id)));

    // Reconnect from `last` while changes keep coming until the replay is over, so live
    // changes arrive while the history is read: they must join without a gap or overlap.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (api, client, ada, stop) = (node.url(""), node.client.clone(), ada.clone(), stop.clone());
        tokio::spawn(async move {
            let mut made = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let res = client
                    .post(format!("{api}/api/v1/projects"))
                    .bearer_auth(&ada.token)
                    .json(&json!({ "name": format!("during {}", made.len()) }))
                    .send()
                    .await
                    .expect("create during reconnect");
                assert_eq!(res.status(), 201);
                let body: Value = res.json().await.expect("project");
                made.push(("create".to_owned(), body["id"].as_str().and_then(|s| s.parse().ok()).expect("id")));
            }
            made
        })
    };
    let mut writer = Some(writer);
    let mut a = connect(&node, &ada).await;
    let watermark = subscribe(&mut a, &topics, Some(last)).await;

    // A gets exactly what it missed: up to `replay_complete` the history, then live.
    let mut got = Vec::new();
    let mut replayed = None;
    let mut sentinel = None;
    loop {
        let msg = recv(&mut a).await;
        match msg["type"].as_str() {
            Some("change") => {
                let done = sentinel.is_some_and(|s| op_id(&msg) == ("create".to_owned(), s));
                got.push(msg);
                if done {
                    break;
                }
            }
            Some("replay_complete") => {
                assert_eq!(msg["seq"], watermark);
                assert!(replayed.replace(got.len()).is_none(), "two replay_complete messages");
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                let writer = writer.take().expect("one writer");
                made.extend(writer.await.expect("writer"));
                let id = create_project(&node, &ada, "sentinel", "").await;
                made.push(("create".into(), id));
                sentinel = Some(id);
            }
            _ => panic!("unexpected {msg}"),
        }
    }
    let replayed = replayed.expect("a replay_complete message");
    let seqs: Vec<i64> = got.iter().map(seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order or repeated: {seqs:?}");
    assert!(seqs[0] > last, "already seen: {seqs:?} after {last}");
    assert!(seqs[..replayed].iter().all(|s| *s <= watermark) && seqs[replayed..].iter().all(|s| *s > watermark));
    // The history holds at least everything made while A was away (it had committed).
    assert!(replayed >= 707, "only {replayed} replayed");
    // Exactly the changes made since `last`: the first ones in the order they were made,
    // all of them (the bulk ones were concurrent, so their order is the node's).
    let got_ops: Vec<(String, Uuid)> = got.iter().map(op_id).collect();
    assert_eq!(got_ops[..7], made[..7]);
    let (mut got_sorted, mut made_sorted) = (got_ops.clone(), made.clone());
    got_sorted.sort();
    made_sorted.sort();
    assert_eq!(got_sorted, made_sorted);

    // The subscriber that never left saw the very same changes after `last`.
    let mut reference_seqs = Vec::new();
    while reference_seqs.last() != seqs.last() {
        let change = expect(&mut reference, "change").await;
        if seq(&change) > last {
            reference_seqs.push(seq(&change));
        }
    }
    assert_eq!(reference_seqs, seqs);

    // And A is live afterwards.
    let after = create_project(&node, &ada, "after", "").await;
    assert_eq!(op_id(&expect(&mut a, "change").await), ("create".into(), after));
}

#[tokio::test]
async fn a_client_that_does_not_read_is_dropped_with_a_reason() {
    let node = Node::start(&["--ws-queue", "16"]).await;
    let ada = node.user("ada").await;
    let mut slow = connect(&node, &ada).await;
    let watermark = subscribe(&mut slow, &topics(&["projects"]), None).await;

    // Never read while the changes pile up: large ones, so the socket buffers between
    // the node and this client fill and the node's queue for it overflows. Keep writing
    // until the node says it dropped the subscriber.
    let description = "x".repeat(9_000);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut made = 0;
    while !node.log().contains("WebSocket subscriber too slow") {
        assert!(Instant::now() < deadline, "the node never dropped the slow subscriber ({made} changes made)");
        let (node, ada, description) = (&node, &ada, &description);
        futures_util::stream::iter(0..64)
            .map(|i| {
                let name = format!("bulk {made}-{i}");
                async move { create_project(node, ada, &name, description).await }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        made += 64;
    }

    // Now read: what was already on its way, then the close frame with the reason.
    let (code, reason, got) = until_close(&mut slow).await;
    assert_eq!(code, 1008, "{reason}");
    let last = got.last().map(seq).unwrap_or(watermark);
    assert_eq!(reason, format!("client too slow: more than 16 events behind; reconnect with since={last}"));
    assert!((got.len() as i64) < made, "it was dropped before getting everything");
    let seqs: Vec<i64> = got.iter().map(seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));

    // It can resume from where it was told to.
    let mut again = connect(&node, &ada).await;
    subscribe(&mut again, &topics(&["projects"]), Some(last)).await;
    let first = expect(&mut again, "change").await;
    assert!(seq(&first) > last);
}

#[tokio::test]
async fn sessions_end_when_the_token_expires_or_auth_never_comes() {
    let node = Node::start(&["--token-ttl", "10"]).await;
    let ada = node.user("ada").await;
    let mut silent = node.ws(None).await;
    let mut authed = connect(&node, &ada).await;
    subscribe(&mut authed, &topics(&["all"]), None).await;
    let ((code, reason, _), (silent_code, silent_reason, _)) =
        tokio::join!(until_close(&mut authed), until_close(&mut silent));
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
    assert_eq!(silent_code, 1008);
    assert!(silent_reason.starts_with("authentication timed out"), "{silent_reason}");
}

#[tokio::test]
async fn a_replay_that_cannot_read_a_shard_says_so() {
    if !common::have_postgres() {
        return;
    }
    // Shards 0-2 on one server, shard 3 on a server of its own that the test stops.
    let dirs = tempfile::tempdir().expect("temp dir");
    let main_pg = common::PgGuard::start(&dirs.path().join("a"));
    let lone_pg = common::PgGuard::start(&dirs.path().join("b"));
    main_pg.ensure_databases(&["s0".into(), "s1".into(), "s2".into()]).expect("databases");
    lone_pg.ensure_databases(&["s3".into()]).expect("database");
    let urls = [main_pg.url("s0"), main_pg.url("s1"), main_pg.url("s2"), lone_pg.url("s3")];
    let args: Vec<&str> = urls.iter().flat_map(|u| ["--shard-url", u.as_str()]).collect();
    let node = Node::start(&args).await;
    let ada = node.user("ada").await;

    lone_pg.stop().expect("stop shard 3");
    wait_for("the node to notice shard 3 is down", WAIT, || async {
        let status = node.client.get(node.url("/readyz")).send().await.map(|r| r.status().as_u16());
        (status.ok() == Some(503)).then_some(())
    })
    .await;

    // A live subscription needs no history; a replay needs every shard and says which
    // one is missing.
    let mut live = connect(&node, &ada).await;
    subscribe(&mut live, &topics(&["all"]), None).await;
    let mut resuming = connect(&node, &ada).await;
    subscribe(&mut resuming, &topics(&["all"]), Some(0)).await;
    let error = expect(&mut resuming, "error").await;
    assert_eq!(error["message"], "replay unavailable: shard 3 is down; retry");
    let (code, reason, _) = until_close(&mut resuming).await;
    assert_eq!((code, reason.as_str()), (1013, "replay unavailable: shard 3 is down; retry"));
    // The live session is unaffected: it still answers.
    send(&mut live, json!({ "type": "still there?" })).await;
    expect(&mut live, "error").await;
}

/// Resuming from the node's current position has no history to send, but the client
/// is still told the history is done: `replay_complete` comes before any live change.
#[tokio::test]
async fn resuming_at_the_current_position_still_gets_replay_complete() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let topics = topics(&["projects"]);
    let mut first = connect(&node, &ada).await;
    subscribe(&mut first, &topics, None).await;
    create_project(&node, &ada, "seen", "").await;
    let last = seq(&expect(&mut first, "change").await);

    let mut again = connect(&node, &ada).await;
    let watermark = subscribe(&mut again, &topics, Some(last)).await;
    assert!(watermark >= last, "the position went backwards: {watermark} < {last}");
    let complete = expect(&mut again, "replay_complete").await;
    assert_eq!(complete["seq"], watermark);
    let live = create_project(&node, &ada, "live", "").await;
    assert_eq!(op_id(&expect(&mut again, "change").await), ("create".into(), live));
}

/// A position this node never issued (from another node, or from before its data was
/// reset) cannot be resumed: the client is told so, and may subscribe again.
#[tokio::test]
async fn resuming_from_beyond_what_the_node_issued_is_an_error() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let topics = topics(&["projects"]);
    let mut ws = connect(&node, &ada).await;
    let watermark = subscribe(&mut ws, &topics, None).await;
    drop(ws);

    let mut ws = connect(&node, &ada).await;
    let ahead = watermark + 1_000_000;
    send(&mut ws, json!({ "type": "subscribe", "topics": topics, "since": ahead })).await;
    let error = expect(&mut ws, "error").await;
    let message = error["message"].as_str().expect("message");
    assert!(message.contains(&format!("since={ahead} is ahead of this node")), "{message}");
    // Not subscribed: the same connection may subscribe from a valid position.
    let again = subscribe(&mut ws, &topics, Some(watermark)).await;
    assert_eq!(expect(&mut ws, "replay_complete").await["seq"], again);
    let live = create_project(&node, &ada, "live", "").await;
    assert_eq!(op_id(&expect(&mut ws, "change").await), ("create".into(), live));
}
