//! Test harness: starts the real `cosmicsync` binary (with its own PostgreSQL in a temp
//! directory, on free ports) and talks to it over HTTPS like any client.
//!
//! One helper per layer: `Node` for a running node, `Node::user` for a registered and
//! logged-in user. Every wait is for an observable condition with a deadline.

#![allow(dead_code)]

pub mod cluster;
pub mod netlab;
pub mod p2p;
pub mod pg_tls;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

/// The password every test user gets.
pub const PASSWORD: &str = "correct horse battery";

/// Arguments every test node gets: free ports (HTTPS, and libp2p on TCP and QUIC).
pub const FAST: &[&str] = &[
    "--http-addr",
    "127.0.0.1:0",
    "--p2p-listen",
    "/ip4/127.0.0.1/tcp/0",
    "--p2p-listen",
    "/ip4/127.0.0.1/udp/0/quic-v1",
];

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a test may skip for: `Ok(value)` runs it; `Err(why)` (a missing privilege or
/// tool, never a lab or server that failed to come up) prints `SKIPPED: <why>` and
/// returns `None`, except under `CI=true`, where a skip is a failure: CI has to run it.
pub fn or_skip<T, E: std::fmt::Display>(ready: Result<T, E>) -> Option<T> {
    match ready {
        Ok(value) => Some(value),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true, so this test may not be skipped: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// Whether the machine has PostgreSQL's server binaries; otherwise prints why the test
/// skips (a failure under `CI=true`, see `or_skip`).
pub fn have_postgres() -> bool {
    or_skip(pg_tls::pg_installed()).is_some()
}

/// The path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_cosmicsync")
}

/// A registered, logged-in user.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: Uuid,
    pub profile_id: Uuid,
    pub username: String,
    pub token: String,
}

/// A running node.
pub struct Node {
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub child: Option<Child>,
    pub info: Value,
    pub api: String,
    pub client: reqwest::Client,
}

impl Node {
    /// Starts a node in a fresh temp data directory with `FAST` plus `args`.
    pub async fn start(args: &[&str]) -> Node {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_owned();
        let mut node = Node::start_in(&dir, args).await;
        node._temp = Some(temp);
        node
    }

    /// Starts a node on an existing data directory (e.g. to restart one).
    pub async fn start_in(dir: &Path, args: &[&str]) -> Node {
        let args: Vec<&str> = FAST.iter().chain(args).copied().collect();
        Node::start_wrapped(&[], dir, &args).await
    }

    /// Starts a node in a fresh temp data directory with `FAST` plus `args` and extra
    /// environment variables (e.g. `FAILPOINTS`).
    pub async fn start_env(args: &[&str], env: &[(&str, &str)]) -> Node {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_owned();
        let args: Vec<&str> = FAST.iter().chain(args).copied().collect();
        let mut node = Node::start_wrapped_env(&[], &dir, &args, env).await;
        node._temp = Some(temp);
        node
    }

    /// Starts a node in a fresh temp data directory through `wrapper` (e.g.
    /// `ip netns exec NS`, which execs the binary, so the child's pid is the node's),
    /// with exactly `args` (no `FAST`: the caller chooses every address).
    pub async fn start_wrapped_temp(wrapper: &[&str], args: &[&str]) -> Node {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_owned();
        let mut node = Node::start_wrapped(wrapper, &dir, args).await;
        node._temp = Some(temp);
        node
    }

    async fn start_wrapped(wrapper: &[&str], dir: &Path, args: &[&str]) -> Node {
        Node::start_wrapped_env(wrapper, dir, args, &[]).await
    }

    async fn start_wrapped_env(wrapper: &[&str], dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut child = Node::spawn_env(wrapper, dir, args, env);
        let pid = u64::from(child.id());
        let info = wait_for("node.json", Duration::from_secs(120), || {
            if let Some(status) = child.try_wait().ok().flatten() {
                panic!("node exited early ({status}); log:\n{}", read_log(dir));
            }
            let info = read_info(dir).filter(|v| v["pid"].as_u64() == Some(pid));
            async move { info }
        })
        .await;
        Node::from_info(dir, info, Some(child))
    }

    /// Spawns `cosmicsync start` on `dir` with `FAST` plus `args`, logging into the
    /// directory, without waiting for it (see `start_in` for that).
    pub fn spawn(dir: &Path, args: &[&str]) -> Child {
        let args: Vec<&str> = FAST.iter().chain(args).copied().collect();
        Node::spawn_env(&[], dir, &args, &[])
    }

    /// Spawns `cosmicsync start` on `dir` through `wrapper` with exactly `args` and the
    /// extra environment `env`.
    pub fn spawn_env(wrapper: &[&str], dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("test-node.log")).expect("log file");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(binary());
                cmd
            }
            None => Command::new(binary()),
        };
        cmd.arg("--data-dir").arg(dir).arg("start").args(args);
        // Cheap bcrypt through the environment, so a test can still override it with a flag.
        cmd.env("COSMICSYNC_BCRYPT_COST", "4");
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        cmd.spawn().expect("start cosmicsync")
    }

    /// A handle on a node this test did not spawn (e.g. `cosmicsync start --detach`),
    /// found through `<dir>/node.json`. Dropping it stops the node's PostgreSQL if it
    /// still runs, but not the node process: the caller stops that.
    pub fn attach(dir: &Path) -> Node {
        Node::from_info(dir, read_info(dir).expect("node.json"), None)
    }

    /// A handle on the node described by `info` (node.json's fields), stopping `child` on drop.
    pub fn from_info(dir: &Path, info: Value, child: Option<Child>) -> Node {
        Node {
            dir: dir.to_owned(),
            _temp: None,
            child,
            api: info["api_url"].as_str().expect("api_url").to_owned(),
            client: client_trusting(Path::new(info["tls_cert"].as_str().expect("tls_cert"))),
            info,
        }
    }

    /// Takes the temp directory out, so the data outlives this node (for restarts).
    pub fn take_temp(&mut self) -> Option<tempfile::TempDir> {
        self._temp.take()
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// Waits until a line of the log satisfies `matches` and returns it. The node's logger
    /// writes asynchronously: a test waits for a line, it never reads the log once.
    pub async fn wait_log(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        // Generous: in the namespace tests a line may follow a slow AutoNAT verdict.
        wait_for(what, Duration::from_secs(180), || {
            let line = self.log().lines().find(|l| matches(l)).map(str::to_owned);
            async move { line }
        })
        .await
    }

    /// `api_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.api, path)
    }

    /// Registers `username` (email `<username>@example.org`); returns the response body.
    pub async fn register(&self, username: &str) -> reqwest::Response {
        self.register_as(username, &format!("{username}@example.org")).await
    }

    /// Registers `username` with `email`; returns the response.
    pub async fn register_as(&self, username: &str, email: &str) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/users"))
            .json(&json!({ "username": username, "email": email, "password": PASSWORD }))
            .send()
            .await
            .expect("register request")
    }

    /// Logs in; returns the access token.
    pub async fn login(&self, username: &str, password: &str) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({ "username": username, "password": password }))
            .send()
            .await
            .expect("login request")
    }

    /// Logs in, expecting success; returns the access token.
    pub async fn token(&self, username: &str, password: &str) -> String {
        let res = self.login(username, password).await;
        assert_eq!(res.status(), 200, "login {username}");
        let token: Value = res.json().await.expect("token body");
        token["access_token"].as_str().expect("token").to_owned()
    }

    /// Registers and logs in a user.
    pub async fn user(&self, username: &str) -> TestUser {
        let res = self.register(username).await;
        assert_eq!(res.status(), 201, "register {username}: {}", res.text().await.unwrap_or_default());
        let body: Value = res.json().await.expect("user body");
        TestUser {
            id: body["id"].as_str().and_then(|s| s.parse().ok()).expect("user id"),
            profile_id: body["profile_id"].as_str().and_then(|s| s.parse().ok()).expect("profile id"),
            username: username.to_owned(),
            token: self.token(username, PASSWORD).await,
        }
    }

    /// Registers users until one lives on `shard` (of `shards`) and one elsewhere:
    /// (the one on it, the other).
    pub async fn users_on_and_off(&self, shards: usize, shard: usize) -> (TestUser, TestUser) {
        let router = cosmicsync::placement::Router::new(shards as u32);
        let (mut on, mut off) = (None, None);
        for i in 0..64 {
            let user = self.user(&format!("user{i}")).await;
            let slot = if router.shard_of(&user.id) == shard { &mut on } else { &mut off };
            slot.get_or_insert(user);
            if let (Some(on), Some(off)) = (&on, &off) {
                return (on.clone(), off.clone());
            }
        }
        panic!("64 users and none on shard {shard}, or all on it");
    }

    /// Creates a project as `user`; the answer's status.
    pub async fn create_project(&self, user: &TestUser, name: &str) -> u16 {
        let res = self.req(reqwest::Method::POST, "/api/v1/projects", user).json(&json!({ "name": name })).send().await;
        res.map(|r| r.status().as_u16()).unwrap_or(0)
    }

    /// A request with the user's token.
    pub fn req(&self, method: reqwest::Method, path: &str, user: &TestUser) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(&user.token)
    }

    /// Opens `wss://…/api/v1/ws`, trusting the node's certificate; with `token`, it goes
    /// in an `Authorization: Bearer` header on the upgrade request.
    pub async fn ws(&self, token: Option<&str>) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}/api/v1/ws", self.api.replacen("https://", "wss://", 1));
        let mut request = url.into_client_request().expect("WebSocket request");
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("header value");
            request.headers_mut().insert("authorization", value);
        }
        let connector = tokio_tungstenite::Connector::Rustls(self.rustls_config());
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
            .await
            .expect("WebSocket connect");
        ws
    }

    /// A rustls client configuration trusting only the node's certificate.
    pub fn rustls_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let cert = Path::new(self.info["tls_cert"].as_str().expect("tls_cert"));
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_file_iter(cert).expect("read node certificate") {
            roots.add(der.expect("certificate")).expect("trust the node certificate");
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        std::sync::Arc::new(config)
    }

    /// Stops the node with SIGTERM and waits for it to exit; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().ok();
                stop_cluster(&self.dir);
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        // A node killed without a graceful stop leaves its PostgreSQL running.
        stop_cluster(&self.dir);
    }
}

/// A PostgreSQL server a test started itself, stopped when the guard is dropped — also
/// when the test panics, so no server outlives its test.
pub struct PgGuard(pub cosmicsync::embedded_pg::EmbeddedPostgres);

impl PgGuard {
    /// Starts (or reuses) a cluster in `dir`.
    pub fn start(dir: &Path) -> PgGuard {
        let opts = cosmicsync::embedded_pg::EmbeddedOptions::new(dir);
        PgGuard(cosmicsync::embedded_pg::EmbeddedPostgres::start(&opts).expect("start PostgreSQL"))
    }
}

impl std::ops::Deref for PgGuard {
    type Target = cosmicsync::embedded_pg::EmbeddedPostgres;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for PgGuard {
    fn drop(&mut self) {
        let _ = self.0.stop();
    }
}

/// `<dir>/node.json`, if present and parseable.
fn read_info(dir: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("node.json")).ok()?).ok()
}

/// The log a test node writes into its data directory.
fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("test-node.log")).unwrap_or_default()
}

/// Stops a cluster under `<dir>/pg` if one runs.
pub fn stop_cluster(dir: &Path) {
    let pg = dir.join("pg");
    if !pg.join("postmaster.pid").exists() {
        return;
    }
    let Ok(bin) = cosmicsync::embedded_pg::EmbeddedPostgres::find_bin_dir(None) else { return };
    let pg_ctl = bin.join("pg_ctl");
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
        c
    } else {
        Command::new(&pg_ctl)
    };
    let _ = cmd.arg("-D").arg(&pg).args(["stop", "-m", "immediate", "-w"]).output();
}

/// A direct connection to shard `shard` of a node's own PostgreSQL (data directory `dir`).
pub async fn shard_db(dir: &Path, shard: usize) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config.host_path(dir.join("pg")).port(5432).user("postgres").dbname(format!("shard_{shard}"));
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect to the node's PostgreSQL");
    tokio::spawn(conn);
    client
}

/// An HTTPS client that trusts the node's certificate and reaches `name` at `addr`.
pub fn client_trusting_at(cert: &Path, name: &str, addr: std::net::SocketAddr) -> reqwest::Client {
    let pem = std::fs::read(cert).expect("read node certificate");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("certificate"))
        .resolve(name, addr)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// An HTTPS client that trusts the node's certificate.
pub fn client_trusting(cert: &Path) -> reqwest::Client {
    let pem = std::fs::read(cert).expect("read node certificate");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("certificate"))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A client WebSocket to a node.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The longest any one CLI invocation may take (a detached start waits up to 120 s).
const CLI_DEADLINE: Duration = Duration::from_secs(180);

/// What a CLI run produced.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts the exit code, showing the output when it differs.
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "unexpected exit code; output: {self:#?}");
        self
    }

    /// stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// One helper for every CLI call: runs `cosmicsync --data-dir <dir> <args>` with no
/// `COSMICSYNC_*` variables but `env`, and a deadline.
pub fn cli_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(binary());
    cmd.arg("--data-dir").arg(dir).args(args);
    for (name, _) in std::env::vars_os().filter(|(n, _)| n.to_string_lossy().starts_with("COSMICSYNC_")) {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run cosmicsync");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + CLI_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for cosmicsync") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`cosmicsync {}` did not finish within {CLI_DEADLINE:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run { code: status.code(), stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() }
}

pub fn cli(dir: &Path, args: &[&str]) -> Run {
    cli_env(dir, args, &[])
}

/// `cosmicsync start` in the foreground on `dir` with exactly `args`, for a start that
/// must fail: returns once the process has exited, with all it printed.
pub fn start_foreground(dir: &Path, args: &[&str]) -> Run {
    let all: Vec<&str> = ["start"].iter().chain(args).copied().collect();
    cli_env(dir, &all, &[("COSMICSYNC_BCRYPT_COST", "4")])
}

/// The keyring a node keeps in its data directory (to check what it stored).
pub fn keyring(dir: &Path) -> cosmicsync::sealing::Keyring {
    let text = std::fs::read_to_string(dir.join("keys.json")).expect("read keys.json");
    cosmicsync::sealing::Keyring::parse(&text).expect("parse keys.json")
}
