//! The access-control matrix: every endpoint × every kind of caller, with the expected
//! answer of each cell in one table, checked against one real node over HTTPS.
//!
//! Principals (columns): no token at all; the owner of the rows under test; another
//! user; and four tokens that must never work — expired (signed with the node's own key,
//! so only its `exp` is wrong), tampered (another user's valid token with `sub` rewritten
//! to the owner, signature kept), `alg: none` (the owner's claims, no signature) and
//! revoked (logged out).
//!
//! Cells are statuses ("401"), or for the WebSocket what the session does after the
//! `101` upgrade ("101 ready", "101 close 1008"): the node upgrades first and then
//! authenticates, so a bad token is refused with a policy close rather than a status.
//!
//! Freshness, so no cell depends on another: every placeholder a cell changes is made
//! for that cell (`{fresh_project}` is a new project of the owner, `{n}` a new unique
//! number, `{fresh_user}` a new registered user), and the logout row is last because
//! the owner's and the other user's cells revoke their own tokens.

mod common;

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{Node, PASSWORD, TestUser};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};
use uuid::Uuid;

/// The columns, in table order.
const PRINCIPALS: [&str; 7] = ["anonymous", "owner", "other", "expired", "tampered", "alg-none", "revoked"];

/// One row: a request and the expected answer for each principal.
struct Row {
    method: &'static str,
    /// Placeholders: `{owner}`, `{owner_profile}`, `{project}` (a long-lived project of
    /// the owner), `{fresh_project}` (a new one per cell).
    path: &'static str,
    /// JSON with placeholders `{n}` (unique per cell) and `{fresh_user}`.
    body: Option<&'static str>,
    expect: [&'static str; 7],
}

const fn row(method: &'static str, path: &'static str, body: Option<&'static str>, expect: [&'static str; 7]) -> Row {
    Row { method, path, body, expect }
}

const PUBLIC: [&str; 7] = ["200"; 7];
/// Readable by any authenticated user.
const READ: [&str; 7] = ["401", "200", "200", "401", "401", "401", "401"];
/// Writable by the owner only.
const OWN: [&str; 7] = ["401", "200", "403", "401", "401", "401", "401"];

#[rustfmt::skip]
const MATRIX: &[Row] = &[
    row("GET", "/healthz", None, PUBLIC),
    row("GET", "/readyz", None, PUBLIC),
    row("GET", "/api/v1/openapi.json", None, PUBLIC),
    row("POST", "/api/v1/users", Some(r#"{"username":"reg{n}","email":"reg{n}@example.org","password":"correct horse battery"}"#),
        ["201"; 7]),
    row("POST", "/api/v1/auth/login", Some(r#"{"username":"{fresh_user}","password":"correct horse battery"}"#), PUBLIC),
    row("GET", "/api/v1/users/{owner}", None, READ),
    row("PUT", "/api/v1/users/{owner}", Some(r#"{"username":"owner{n}"}"#), OWN),
    row("GET", "/api/v1/profiles/{owner_profile}", None, READ),
    row("PUT", "/api/v1/profiles/{owner_profile}", Some(r#"{"bio":"bio {n}"}"#), OWN),
    row("GET", "/api/v1/projects", None, READ),
    row("POST", "/api/v1/projects", Some(r#"{"name":"project {n}"}"#),
        ["401", "201", "201", "401", "401", "401", "401"]),
    row("GET", "/api/v1/projects/{project}", None, READ),
    row("PUT", "/api/v1/projects/{project}", Some(r#"{"description":"edit {n}"}"#), OWN),
    row("DELETE", "/api/v1/projects/{fresh_project}", None,
        ["401", "204", "403", "401", "401", "401", "401"]),
    row("GET", "/api/v1/network/status", None, READ),
    row("GET", "/api/v1/sync/status", None, READ),
    // Each caller lists the conflicts of their own rows.
    row("GET", "/api/v1/conflicts", None, READ),
    row("WS", "/api/v1/ws", None,
        ["101 close 1008", "101 ready", "101 ready", "101 close 1008", "101 close 1008", "101 close 1008", "101 close 1008"]),
    // Last: the owner's and the other user's cells revoke their tokens.
    row("POST", "/api/v1/auth/logout", None, ["401", "204", "204", "401", "401", "401", "401"]),
];

/// What every cell can draw on.
struct Fixture {
    owner: TestUser,
    project: Uuid,
    /// Per principal, the bearer token (None: anonymous).
    tokens: [Option<String>; 7],
    next: u32,
}

/// The node's token-signing key, as the node reads it.
fn signing_key(node: &Node) -> Vec<u8> {
    std::fs::read(node.dir.join("jwt.key")).expect("read <data-dir>/jwt.key")
}

/// An HS256 token for `sub` signed with the node's key, valid from `from` to `until`
/// (Unix seconds) — the claims the node issues (`pwd`: the password's age in Unix
/// microseconds; these users never change theirs, so their issue time is recent enough).
fn signed_token(key: &[u8], sub: Uuid, from: i64, until: i64) -> String {
    let claims =
        json!({ "sub": sub, "iat": from, "nbf": from, "exp": until, "jti": Uuid::now_v7(), "pwd": from * 1_000_000 });
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(key)).expect("sign a token")
}

/// `token` with its payload's `sub` replaced by `sub`, the signature left as it was.
fn with_sub(token: &str, sub: Uuid) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).expect("payload")).expect("claims");
    claims["sub"] = json!(sub);
    let tampered = format!("{}.{}.{}", parts[0], B64.encode(claims.to_string()), parts[2]);
    assert_ne!(tampered, token);
    tampered
}

/// `token`'s claims under an `alg: none` header, with an empty signature.
fn unsigned(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("payload");
    format!("{}.{payload}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#))
}

async fn fixture(node: &Node) -> Fixture {
    let owner = node.user("owner").await;
    let other = node.user("other").await;
    let project = create_project(node, &owner).await;

    let now = chrono::Utc::now().timestamp();
    let key = signing_key(node);
    // The harness signs like the node: a token it signs with a valid lifetime works, so
    // the expired one below fails for its `exp` alone, not for a wrong key or claim.
    let control = signed_token(&key, owner.id, now - 10, now + 600);
    let res = node.client.get(node.url("/api/v1/network/status")).bearer_auth(&control).send().await.unwrap();
    assert_eq!(res.status(), 200, "a token signed with <data-dir>/jwt.key must be accepted");
    // Expired an hour ago: far beyond the node's leeway of a few seconds.
    let expired = signed_token(&key, owner.id, now - 7200, now - 3600);

    let revoked = node.token(&owner.username, PASSWORD).await;
    let res = node.client.post(node.url("/api/v1/auth/logout")).bearer_auth(&revoked).send().await.unwrap();
    assert_eq!(res.status(), 204, "log out the token to revoke");

    let tokens = [
        None,
        Some(owner.token.clone()),
        Some(other.token.clone()),
        Some(expired),
        Some(with_sub(&other.token, owner.id)),
        Some(unsigned(&owner.token)),
        Some(revoked),
    ];
    Fixture { owner, project, tokens, next: 0 }
}

async fn create_project(node: &Node, owner: &TestUser) -> Uuid {
    let res = node.req(Method::POST, "/api/v1/projects", owner).json(&json!({ "name": "matrix" })).send().await;
    let res = res.expect("create project");
    assert_eq!(res.status(), 201, "create a project for the matrix");
    res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap()
}

impl Fixture {
    /// The row's path and body for one cell, with fresh resources made where asked.
    async fn resolve(&mut self, node: &Node, row: &Row) -> (String, Option<String>) {
        self.next += 1;
        let n = self.next.to_string();
        let mut path = row
            .path
            .replace("{owner}", &self.owner.id.to_string())
            .replace("{owner_profile}", &self.owner.profile_id.to_string())
            .replace("{project}", &self.project.to_string());
        if path.contains("{fresh_project}") {
            path = path.replace("{fresh_project}", &create_project(node, &self.owner).await.to_string());
        }
        let mut body = row.body.map(|b| b.replace("{n}", &n));
        if let Some(b) = body.as_mut().filter(|b| b.contains("{fresh_user}")) {
            let name = format!("login{n}");
            assert_eq!(node.register(&name).await.status(), 201, "register {name}");
            *b = b.replace("{fresh_user}", &name);
        }
        (path, body)
    }
}

/// Runs one cell; returns what happened, in the table's notation.
async fn run_cell(node: &Node, method: &str, path: &str, body: Option<String>, token: Option<&str>) -> String {
    if method == "WS" {
        return ws_cell(node, path, token).await;
    }
    let method: Method = method.parse().expect("method");
    let mut req = node.client.request(method, node.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    if status >= 400 {
        let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        if !ct.starts_with("application/problem+json") {
            return format!("{status} (not problem+json)");
        }
    }
    status.to_string()
}

/// Upgrades (token in the `Authorization` header), asks to subscribe, and reports what
/// the session does: authenticates (`ready`) or closes with a code.
async fn ws_cell(node: &Node, path: &str, token: Option<&str>) -> String {
    use tungstenite::client::IntoClientRequest;
    let url = format!("{}{path}", node.api.replacen("https://", "wss://", 1));
    let mut request = url.into_client_request().expect("WebSocket request");
    if let Some(token) = token {
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    }
    let connector = tokio_tungstenite::Connector::Rustls(node.rustls_config());
    let mut ws = match tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector)).await {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(res)) => return res.status().as_u16().to_string(),
        Err(e) => panic!("WebSocket connect: {e}"),
    };
    // Without a header token the node waits for an auth message; anything else first must
    // be refused. With one, a subscribe after `ready` is simply the next message.
    let subscribe = json!({ "type": "subscribe", "topics": ["projects"] }).to_string();
    let _ = ws.send(Message::text(subscribe)).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next()).await.expect("a WebSocket frame in time");
        match frame {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).expect("JSON frame");
                if v["type"] == "ready" {
                    return "101 ready".into();
                }
                return format!("101 {}", v["type"].as_str().unwrap_or("?"));
            }
            Some(Ok(Message::Close(frame))) => {
                return format!("101 close {}", frame.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return format!("101 error {e}"),
            None => return "101 ended".into(),
        }
    }
}

/// The whole matrix as text, marking cells that differ from the expectation.
fn render(actual: &[Vec<String>]) -> String {
    let width = 16;
    let mut out = format!("{:<46}", "endpoint");
    for p in PRINCIPALS {
        let _ = write!(out, "{p:<width$}");
    }
    out.push('\n');
    for (row, cells) in MATRIX.iter().zip(actual) {
        let _ = write!(out, "{:<46}", format!("{} {}", row.method, row.path));
        for (cell, expected) in cells.iter().zip(row.expect) {
            let shown = if cell == expected { cell.clone() } else { format!("{cell}≠{expected}") };
            let _ = write!(out, "{shown:<width$}");
        }
        out.push('\n');
    }
    out
}

#[tokio::test]
async fn every_endpoint_answers_every_principal_as_specified() {
    let node = Node::start(&[]).await;
    let mut fx = fixture(&node).await;

    let mut actual = Vec::new();
    let mut differing = Vec::new();
    for row in MATRIX {
        let mut cells = Vec::new();
        for (col, expected) in row.expect.iter().enumerate() {
            let (path, body) = fx.resolve(&node, row).await;
            let cell = run_cell(&node, row.method, &path, body, fx.tokens[col].as_deref()).await;
            if cell != *expected {
                differing.push(format!(
                    "{} {} × {}: got {cell}, expected {expected}",
                    row.method, row.path, PRINCIPALS[col]
                ));
            }
            cells.push(cell);
        }
        actual.push(cells);
    }
    assert!(
        differing.is_empty(),
        "access matrix differs in {} cell(s):\n{}\n\nactual (got≠expected):\n{}",
        differing.len(),
        differing.join("\n"),
        render(&actual)
    );
    // The node stayed healthy through it all.
    assert_eq!(node.client.get(node.url("/readyz")).send().await.unwrap().status(), 200);
}
