//! REST API end to end: the real binary, real PostgreSQL, HTTPS, as a client would.

mod common;

use common::{Node, PASSWORD, TestUser};
use reqwest::Method;
use serde_json::{Value, json};

async fn body(res: reqwest::Response) -> Value {
    res.json().await.expect("JSON body")
}

/// Asserts a problem+json error with this status.
async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status(), status, "unexpected status");
    let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(ct.starts_with("application/problem+json"), "content type {ct}");
    let p = body(res).await;
    assert_eq!(p["status"], status);
    assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()), "problem without detail: {p}");
    p
}

#[tokio::test]
async fn user_journey() {
    let node = Node::start(&[]).await;

    // Register: 201, Location, the profile id, the email shown to the user themself.
    let res = node.register("ada").await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let ada: Value = body(res).await;
    assert_eq!(location, format!("/api/v1/users/{}", ada["id"].as_str().unwrap()));
    assert_eq!(ada["email"], "ada@example.org");
    assert!(ada.get("password").is_none() && ada.get("password_hash").is_none());

    // Log in.
    let res = node.login("ada", PASSWORD).await;
    assert_eq!(res.status(), 200);
    let token: Value = body(res).await;
    assert_eq!(token["token_type"], "Bearer");
    assert!(token["expires_in"].as_u64().unwrap() > 0);
    let ada = TestUser {
        id: ada["id"].as_str().unwrap().parse().unwrap(),
        profile_id: ada["profile_id"].as_str().unwrap().parse().unwrap(),
        username: "ada".into(),
        token: token["access_token"].as_str().unwrap().into(),
    };
    let bob = node.user("bob").await;

    // Read: the email only for the user themself.
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(body(res).await["email"], "ada@example.org");
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &bob).send().await.unwrap();
    assert!(body(res).await.get("email").is_none());

    // Update the user with If-Match; the old tag is then stale.
    let res = node
        .req(Method::PUT, &format!("/api/v1/users/{}", ada.id), &ada)
        .header("If-Match", &etag)
        .json(&json!({ "email": "ada.lovelace@example.org" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(body(res).await["email"], "ada.lovelace@example.org");
    let res = node
        .req(Method::PUT, &format!("/api/v1/users/{}", ada.id), &ada)
        .header("If-Match", &etag)
        .json(&json!({ "email": "other@example.org" }))
        .send()
        .await
        .unwrap();
    problem(res, 412).await;

    // Profile: read, update (omitted fields kept), read back.
    let path = format!("/api/v1/profiles/{}", ada.profile_id);
    let res = node.req(Method::GET, &path, &ada).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let profile = body(res).await;
    assert_eq!(profile["user_id"], ada.id.to_string());
    assert_eq!(profile["skills"], json!([]));
    let res = node
        .req(Method::PUT, &path, &ada)
        .json(&json!({ "name": "Ada Lovelace", "skills": ["math", "engines"], "interests": ["poetry"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = node.req(Method::PUT, &path, &ada).json(&json!({ "bio": "First programmer." })).send().await.unwrap();
    let profile = body(res).await;
    assert_eq!(profile["name"], "Ada Lovelace");
    assert_eq!(profile["skills"], json!(["math", "engines"]));
    assert_eq!(profile["bio"], "First programmer.");

    // Projects: create, read, update, list, delete.
    let res = node
        .req(Method::POST, "/api/v1/projects", &ada)
        .json(&json!({ "name": "Analytical Engine", "description": "Notes", "tags": ["hardware"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let project = body(res).await;
    let pid = project["id"].as_str().unwrap().to_owned();
    assert_eq!(project["creator_id"], ada.id.to_string());
    let res = node.req(Method::GET, &format!("/api/v1/projects/{pid}"), &bob).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    let res = node
        .req(Method::PUT, &format!("/api/v1/projects/{pid}"), &ada)
        .header("If-Match", &etag)
        .json(&json!({ "description": "Notes on the engine" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let updated = body(res).await;
    assert_eq!(updated["name"], "Analytical Engine");
    assert_eq!(updated["description"], "Notes on the engine");
    let res = node.req(Method::GET, &format!("/api/v1/projects?creator_id={}", ada.id), &bob).send().await.unwrap();
    let page = body(res).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let res = node.req(Method::DELETE, &format!("/api/v1/projects/{pid}"), &ada).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let res = node.req(Method::GET, &format!("/api/v1/projects/{pid}"), &ada).send().await.unwrap();
    problem(res, 404).await;

    // Status.
    let res = node.req(Method::GET, "/api/v1/network/status", &ada).send().await.unwrap();
    let status = body(res).await;
    assert_eq!(status["shards"].as_array().unwrap().len(), 4);
    assert_eq!(status["ready"], true);

    // No password or token ever reaches the log.
    let log = node.log();
    assert!(log.contains("user registered") && log.contains("login"), "the log records the journey");
    assert!(!log.contains(PASSWORD), "a password in the log");
    assert!(!log.contains(&ada.token), "a token in the log");

    // Logout revokes the token, also after a restart.
    let res = node.req(Method::POST, "/api/v1/auth/logout", &ada).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada).send().await.unwrap();
    problem(res, 401).await;
    let dir = node.dir.clone();
    let mut node = node;
    let keep = node_keep_dir(&mut node);
    drop(node);
    let node = Node::start_in(&dir, &[]).await;
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada).send().await.unwrap();
    problem(res, 401).await;
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &bob).send().await.unwrap();
    assert_eq!(res.status(), 200, "other tokens stay valid across a restart");
    drop(node);
    drop(keep);
}

/// Takes the temp dir out of a node so the data survives the node being dropped.
fn node_keep_dir(node: &mut Node) -> Option<tempfile::TempDir> {
    node.take_temp()
}

#[tokio::test]
async fn only_owners_change_rows() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let eve = node.user("eve").await;
    let res = node.req(Method::POST, "/api/v1/projects", &ada).json(&json!({ "name": "Mine" })).send().await.unwrap();
    let pid = body(res).await["id"].as_str().unwrap().to_owned();

    let attempts = [
        (Method::PUT, format!("/api/v1/users/{}", ada.id), json!({ "username": "hijacked" })),
        (Method::PUT, format!("/api/v1/profiles/{}", ada.profile_id), json!({ "bio": "hijacked" })),
        (Method::PUT, format!("/api/v1/projects/{pid}"), json!({ "name": "hijacked" })),
        (Method::DELETE, format!("/api/v1/projects/{pid}"), json!(null)),
    ];
    for (method, path, payload) in attempts {
        let mut req = node.req(method.clone(), &path, &eve);
        if !payload.is_null() {
            req = req.json(&payload);
        }
        problem(req.send().await.unwrap(), 403).await;
        // Anonymous: 401.
        let mut req = node.client.request(method, node.url(&path));
        if !payload.is_null() {
            req = req.json(&payload);
        }
        problem(req.send().await.unwrap(), 401).await;
    }
    // Nothing changed.
    let res = node.req(Method::GET, &format!("/api/v1/projects/{pid}"), &ada).send().await.unwrap();
    assert_eq!(body(res).await["name"], "Mine");
    let res = node.req(Method::GET, &format!("/api/v1/users/{}", ada.id), &ada).send().await.unwrap();
    assert_eq!(body(res).await["username"], "ada");
    // Reads need a token; a forged one is refused.
    let res = node.client.get(node.url(&format!("/api/v1/projects/{pid}"))).send().await.unwrap();
    problem(res, 401).await;
    let forged = TestUser { token: format!("{}x", ada.token), ..ada.clone() };
    let res = node.req(Method::GET, &format!("/api/v1/projects/{pid}"), &forged).send().await.unwrap();
    problem(res, 401).await;
}

#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let post = |body: String, ct: &'static str| {
        node.client.post(node.url("/api/v1/users")).header("content-type", ct).body(body).send()
    };
    let valid = |u: &str| json!({ "username": u, "email": format!("{u}@example.org"), "password": PASSWORD });

    // Validation, duplicates (case-insensitive), body problems.
    let cases: Vec<(String, &str, u16)> = vec![
        (
            json!({ "username": "x", "email": "x@example.org", "password": PASSWORD }).to_string(),
            "application/json",
            400,
        ),
        (
            json!({ "username": "carl", "email": "not-an-email", "password": PASSWORD }).to_string(),
            "application/json",
            400,
        ),
        (
            json!({ "username": "carl", "email": "carl@example.org", "password": "short" }).to_string(),
            "application/json",
            400,
        ),
        (
            json!({ "username": "carl", "email": "carl@example.org", "password": "p".repeat(73) }).to_string(),
            "application/json",
            400,
        ),
        (
            json!({ "username": "carl", "email": "carl@example.org", "password": PASSWORD, "admin": true }).to_string(),
            "application/json",
            400,
        ),
        (
            json!({ "username": 5, "email": "carl@example.org", "password": PASSWORD }).to_string(),
            "application/json",
            400,
        ),
        (json!({ "username": "carl" }).to_string(), "application/json", 400),
        ("{\"username\": ".into(), "application/json", 400),
        ("[".repeat(10_000), "application/json", 400),
        (valid("carl").to_string(), "text/plain", 415),
        (
            json!({ "username": "carl", "email": "carl@example.org", "password": PASSWORD, "pad": "x".repeat(70_000) })
                .to_string(),
            "application/json",
            413,
        ),
        (valid("ADA").to_string(), "application/json", 409),
        (
            json!({ "username": "carl", "email": "ADA@example.org", "password": PASSWORD }).to_string(),
            "application/json",
            409,
        ),
        (
            json!({ "username": "robert'); DROP TABLE users;--", "email": "r@example.org", "password": PASSWORD })
                .to_string(),
            "application/json",
            400,
        ),
    ];
    for (payload, ct, status) in cases {
        let res = post(payload.clone(), ct).await.unwrap();
        assert_eq!(res.status(), status, "payload {:.80}", payload);
        problem(res, status).await;
    }
    // Invalid UTF-8.
    let res = node
        .client
        .post(node.url("/api/v1/users"))
        .header("content-type", "application/json")
        .body(vec![b'{', 0xff, 0xfe, b'}'])
        .send()
        .await
        .unwrap();
    problem(res, 400).await;
    // Malformed ids and queries.
    problem(node.req(Method::GET, "/api/v1/users/not-a-uuid", &ada).send().await.unwrap(), 400).await;
    problem(node.req(Method::GET, "/api/v1/projects?limit=0", &ada).send().await.unwrap(), 400).await;
    problem(node.req(Method::GET, "/api/v1/projects?cursor=zzz", &ada).send().await.unwrap(), 400).await;
    problem(node.req(Method::GET, "/api/v1/nope", &ada).send().await.unwrap(), 404).await;
    // Project validation: huge lists, control characters.
    let tags: Vec<String> = (0..51).map(|i| format!("t{i}")).collect();
    for payload in [json!({ "name": "" }), json!({ "name": "a\u{0}b" }), json!({ "name": "ok", "tags": tags })] {
        let res = node.req(Method::POST, "/api/v1/projects", &ada).json(&payload).send().await.unwrap();
        problem(res, 400).await;
    }
    // Nothing was written: carl does not exist, ada has no projects, SQL text is data.
    problem(node.login("carl", PASSWORD).await, 401).await;
    let res = node.req(Method::GET, &format!("/api/v1/projects?creator_id={}", ada.id), &ada).send().await.unwrap();
    assert_eq!(body(res).await["items"], json!([]));
    let res = node
        .req(Method::POST, "/api/v1/projects", &ada)
        .json(&json!({ "name": "x'); DROP TABLE projects;--" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(body(res).await["name"], "x'); DROP TABLE projects;--");
    // The node is still healthy.
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn usernames_move_atomically_across_shards() {
    let node = Node::start(&[]).await;
    // Enough users that directory entries land on other shards than their users.
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(node.user(&format!("user{i}")).await);
    }
    let ada = &users[0];
    let res = node
        .req(Method::PUT, &format!("/api/v1/users/{}", ada.id), ada)
        .json(&json!({ "username": "renamed", "email": "renamed@example.org" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(node.login("renamed", PASSWORD).await.status(), 200);
    assert_eq!(node.login("user0", PASSWORD).await.status(), 401);
    // The old name and email are free again; the new ones are taken.
    assert_eq!(node.register("user0").await.status(), 201);
    problem(node.register_as("Renamed", "x@example.org").await, 409).await;
    // Taking someone else's name is refused and changes nothing.
    let res = node
        .req(Method::PUT, &format!("/api/v1/users/{}", users[1].id), &users[1])
        .json(&json!({ "username": "user2" }))
        .send()
        .await
        .unwrap();
    problem(res, 409).await;
    assert_eq!(node.login("user1", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn concurrent_updates_are_serialised() {
    let node = Node::start(&[]).await;
    let ada = node.user("ada").await;
    let path = format!("/api/v1/profiles/{}", ada.profile_id);
    let res = node.req(Method::GET, &path, &ada).send().await.unwrap();
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();

    // All with the same If-Match: exactly one wins.
    let sends = (0..16).map(|i| {
        node.req(Method::PUT, &path, &ada).header("If-Match", &etag).json(&json!({ "bio": format!("v{i}") })).send()
    });
    let statuses: Vec<u16> =
        futures_util::future::join_all(sends).await.into_iter().map(|r| r.unwrap().status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 412).count(), 15, "{statuses:?}");

    // Without If-Match: every update applies, each to a distinct version.
    let sends = (0..16).map(|i| node.req(Method::PUT, &path, &ada).json(&json!({ "bio": format!("w{i}") })).send());
    let mut tags = std::collections::HashSet::new();
    for res in futures_util::future::join_all(sends).await {
        let res = res.unwrap();
        assert_eq!(res.status(), 200);
        tags.insert(res.headers()["etag"].to_str().unwrap().to_owned());
    }
    assert_eq!(tags.len(), 16, "two updates applied to the same version");
}

#[tokio::test]
async fn pages_through_projects_across_shards() {
    let node = Node::start(&[]).await;
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(node.user(&format!("maker{i}")).await);
    }
    let mut made = std::collections::BTreeSet::new();
    for (i, u) in users.iter().enumerate() {
        for j in 0..5 {
            let res = node
                .req(Method::POST, "/api/v1/projects", u)
                .json(&json!({ "name": format!("p{i}-{j}") }))
                .send()
                .await
                .unwrap();
            made.insert(body(res).await["id"].as_str().unwrap().to_owned());
        }
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/api/v1/projects?limit=6".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = body(node.req(Method::GET, &path, &users[0]).send().await.unwrap()).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "pages are newest first");
    assert_eq!(seen.into_iter().collect::<std::collections::BTreeSet<_>>(), made);
}

#[tokio::test]
async fn health_and_api_docs() {
    let node = Node::start(&[]).await;
    assert_eq!(node.client.get(node.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 200);
    let doc = body(node.client.get(node.url("/api/v1/openapi.json")).send().await.unwrap()).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    assert!(doc["paths"]["/api/v1/projects/{id}"].is_object());
    let res = node.client.get(node.url("/api/docs/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("swagger"), "docs UI");
    let res = node.client.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
}
