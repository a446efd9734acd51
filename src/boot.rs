//! Starting and stopping a node: the boot order of the actor tree.
//!
//! 1. resolve the config, start logging, lock the data directory by binding the CLI's
//!    control socket (a second node on the same directory fails here);
//! 2. start the node's own PostgreSQL (embedded mode) and create the shard databases;
//! 3. inside the actix System: first everything a start can fail on (shard URLs, secrets,
//!    the TLS certificate, the HTTPS listener, the p2p listeners), then the actors:
//!    EventHub, one supervised ShardActor per shard, AuthActor, RecommendActor,
//!    PeerActor, NodeSupervisor, the HTTPS server in its HttpActor, KeyActor,
//!    ControlActor, signal handlers;
//! 4. once every shard is up (or a deadline passes), write `<data-dir>/node.json`;
//! 5. after the System stops: stop PostgreSQL, remove node.json and the socket.
//!
//! Boot code wires things together; it must never hold request logic.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use slog_scope::{info, warn};

use crate::actors::auth::{AuthActor, AuthConfig};
use crate::actors::control::ControlActor;
use crate::actors::event_hub::EventHub;
use crate::actors::http::HttpActor;
use crate::actors::keys::KeyActor;
use crate::actors::peer::{GetNetwork, PeerActor};
use crate::actors::recommend::{RecommendActor, RecommendSettings};
use crate::actors::shard::{KEY_CHECK_FAILED, ShardActor, ShardEnv, ShardState};
use crate::actors::shards::Shards;
use crate::actors::supervisor::{AttachHttp, IsStopping, NodeFacts, NodeSupervisor, Shutdown};
use crate::actors::sync::{SyncActor, SyncSettings};
use crate::api::AppState;
use crate::config::{GlobalOptions, NodeArgs, NodeConfig, Storage};
use crate::embedded_pg::{EmbeddedOptions, EmbeddedPostgres};
use crate::sealing::{Keyring, SharedKeyring};
use crate::sequencer::Sequencer;

/// How long a starting node waits for every shard before it reports ready anyway.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// `<data-dir>/node.json`: how scripts, tests and the CLI find a running node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub pid: u32,
    pub node_id: String,
    pub version: String,
    pub api_url: String,
    /// Path of the HTTPS certificate (PEM) clients should trust.
    pub tls_cert: PathBuf,
    pub data_dir: PathBuf,
    pub control_socket: PathBuf,
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// The libp2p peer id (from `<data-dir>/p2p.key`).
    #[serde(default)]
    pub peer_id: String,
    /// The multiaddrs the node's network actually listens on.
    #[serde(default)]
    pub p2p_addrs: Vec<String>,
}

/// The path of node.json in a data directory.
pub fn node_info_path(data_dir: &Path) -> PathBuf {
    data_dir.join("node.json")
}

/// Reads node.json, if present and well-formed.
pub fn read_node_info(data_dir: &Path) -> Option<NodeInfo> {
    let text = std::fs::read_to_string(node_info_path(data_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Runs a node in the foreground until it is stopped (CLI `stop`, SIGTERM or SIGINT).
pub fn run_node(global: GlobalOptions, args: NodeArgs) -> anyhow::Result<()> {
    let config = NodeConfig::resolve(&global, &args)?;
    let level = crate::logging::parse_level(&config.log_level).unwrap_or(slog::Level::Info);
    let _log = crate::logging::init(config.log_format, level);
    crate::tls::install_crypto_provider();
    let result = run(config);
    if let Err(e) = &result {
        slog_scope::crit!("node failed"; "error" => format!("{e:#}"));
    }
    result
}

fn run(config: NodeConfig) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let socket_path = crate::control::socket_path(&data_dir);
    let control = crate::control::bind(&socket_path)
        .with_context(|| format!("cannot open the control socket {}", socket_path.display()))?;
    info!("node starting"; "data_dir" => %data_dir.display(), "pid" => std::process::id());

    let (pg, urls) = match &config.storage {
        Storage::Embedded { shards, bin_dir, max_connections } => {
            let mut opts = EmbeddedOptions::new(data_dir.join("pg"));
            opts.bin_dir = bin_dir.clone();
            opts.max_connections = *max_connections;
            let pg = EmbeddedPostgres::start(&opts).context("cannot start the node's PostgreSQL")?;
            info!("PostgreSQL running"; "dir" => %pg.data_dir().display(), "reused" => pg.reused());
            let names: Vec<String> = (0..*shards).map(|i| format!("shard_{i}")).collect();
            let created = pg
                .databases()
                .context("cannot list the shard databases")
                .and_then(|found| {
                    let found = crate::shard_count::count_from_databases(&found);
                    Ok(crate::shard_count::check(&data_dir, *shards, found)?)
                })
                .and_then(|()| pg.ensure_databases(&names).context("cannot create the shard databases"))
                // Only once the shards exist: a start that failed before leaves no count.
                .and_then(|()| Ok(crate::shard_count::record(&data_dir, *shards)?));
            if let Err(e) = created {
                let _ = pg.stop();
                return Err(e);
            }
            let urls = names.iter().map(|n| pg.url(n)).collect();
            (Some(pg), urls)
        }
        Storage::Urls(urls) => {
            crate::shard_count::check(&data_dir, urls.len(), None)?;
            crate::shard_count::record(&data_dir, urls.len())?;
            (None, urls.clone())
        }
    };

    let system = System::new();
    let result = match system.block_on(start(&config, urls, control)) {
        Ok(()) => system.run().context("actor system failed"),
        Err(e) => {
            // A failure after actors started (a key check, say): stop the System and let
            // it run to that stop, so they stop inside the runtime rather than in its drop.
            System::current().stop_with_code(1);
            let _ = system.run();
            Err(e)
        }
    };

    if let Some(pg) = pg {
        match pg.stop() {
            Ok(()) => info!("PostgreSQL stopped"),
            Err(e) => warn!("cannot stop PostgreSQL"; "error" => %e),
        }
    }
    let _ = std::fs::remove_file(node_info_path(&data_dir));
    let _ = std::fs::remove_file(&socket_path);
    info!("node stopped");
    result
}

/// The loopback-friendly URL for a bound address (an unspecified IP becomes loopback).
fn api_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("https://{}", SocketAddr::new(ip, addr.port()))
}

/// The node's keyring from its key file, created (mode 0600) if there is none yet. A
/// newly created one is useless for data sealed before: the shards' key checks catch that.
fn load_keyring(path: &Path) -> anyhow::Result<(Keyring, bool)> {
    let text =
        crate::secrets::read_private(path).with_context(|| format!("cannot read the key file {}", path.display()))?;
    match text {
        Some(text) => {
            Ok((Keyring::parse(&text).with_context(|| format!("cannot use the key file {}", path.display()))?, false))
        }
        None => {
            let ring = Keyring::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            crate::secrets::write_private(path, &ring.to_file())
                .with_context(|| format!("cannot write the key file {}", path.display()))?;
            warn!("new key file created: back it up, sealed data cannot be read without it"; "path" => %path.display());
            Ok((ring, true))
        }
    }
}

fn node_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} is empty; remove it to make a new node id", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::now_v7().simple().to_string();
            std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

async fn start(
    config: &NodeConfig,
    urls: Vec<String>,
    control: std::os::unix::net::UnixListener,
) -> anyhow::Result<()> {
    let data_dir = &config.data_dir;
    let node_id = node_id(data_dir)?;
    let sequencer = Arc::new(Sequencer::open(&data_dir.join("seq")).context("cannot open the sequence file")?);
    let (keyring, key_file_created) = load_keyring(&config.key_file)?;
    let keys = Arc::new(SharedKeyring::new(keyring));
    let (network_keys, network_key_created) =
        crate::replication::netkey::load(&config.network_key_file, !config.network_key_given)
            .with_context(|| format!("cannot load the network key {}", config.network_key_file.display()))?;
    if network_key_created {
        info!("new network key created: this node is a network of one; give this file to nodes that join \
               (--network-key-file)"; "path" => %config.network_key_file.display());
    }

    // Everything a start can fail on is acquired before the first actor starts: an actor
    // that never ran would be started by its drop after the runtime is gone, and panic
    // (actix makes its timers in `started`). Shard URLs and their TLS first.
    let mut shard_configs = Vec::with_capacity(urls.len());
    for (index, url) in urls.iter().enumerate() {
        let shard = crate::shard_tls::ShardUrl::parse(url, config.shard_ca_file.as_deref())
            .with_context(|| format!("shard {index}: bad PostgreSQL URL"))?;
        let tls = crate::shard_tls::connector(&shard.tls).with_context(|| format!("shard {index}"))?;
        if shard.tls.mode == crate::shard_tls::TlsMode::Require {
            warn!("shard connection is encrypted but the server is not authenticated: anyone on the path \
                   could pose as it; give its CA (sslrootcert= or --shard-ca-file) to verify it";
                  "shard" => index, "endpoint" => &shard.endpoint);
        }
        shard_configs.push((shard, tls));
    }
    let secret = crate::secrets::load_or_create(&data_dir.join("jwt.key"), 64).context("cannot load the JWT key")?;
    let tls_files = crate::tls::ensure_files(config.tls.clone(), &data_dir.join("tls"))?;
    let tls = crate::tls::load(&tls_files)?;
    let listener = TcpListener::bind(config.http_addr)
        .with_context(|| format!("cannot listen on {} (is the port in use?)", config.http_addr))?;
    let api_url = api_url(listener.local_addr()?);

    // The hub, the sync actor, the network and the shards need each other's addresses:
    // make the mailboxes first (a mailbox is no actor: nothing starts until `run`).
    let hub_ctx = Context::<EventHub>::new();
    let sync_ctx = Context::<SyncActor>::new();
    let key = crate::actors::peer::load_key(&data_dir.join("p2p.key"))?;
    let replication =
        crate::actors::peer::Replication { keys: network_keys.clone(), sync: sync_ctx.address().recipient() };
    let peer = PeerActor::new(key, config.p2p.clone(), replication).context("cannot start the peer-to-peer network")?;
    let peer_id = peer.peer_id().to_string();

    let env = Arc::new(ShardEnv {
        node_id: node_id.clone(),
        sequencer: sequencer.clone(),
        hub: hub_ctx.address().recipient(),
        keys: keys.clone(),
        hlc: Arc::new(crate::replication::hlc(&node_id)),
        outbox: sync_ctx.address().recipient(),
    });
    let mut addrs = Vec::with_capacity(shard_configs.len());
    for (index, (shard, tls)) in shard_configs.into_iter().enumerate() {
        let (env, pool, timeout) = (env.clone(), config.pool_size, config.shard_timeout);
        addrs.push(Supervisor::start(move |_| ShardActor::new(index, shard.pg, tls, pool, timeout, env)));
    }
    let shards = Shards::new(addrs, keys.clone());
    let hub = hub_ctx.run(EventHub::new(sequencer.clone(), shards.clone()));

    let auth_config = AuthConfig {
        ttl_secs: config.token_ttl_secs,
        cost: config.bcrypt_cost,
        failures_per_address: config.login_failures_per_address,
        failures_per_username: config.login_failures_per_username,
    };
    let auth = AuthActor::new(&secret, auth_config, shards.clone()).context("cannot prepare password hashing")?;
    let tokens = auth.verifier();
    let auth = Supervisor::start(move |_| auth);

    let storage = match config.storage {
        Storage::Embedded { .. } => "embedded",
        Storage::Urls(_) => "external",
    };
    let facts = NodeFacts { node_id: node_id.clone(), api_url: api_url.clone(), storage: storage.into() };
    let recommend_settings = RecommendSettings {
        interval: config.recommend_interval,
        k: config.recommend_k,
        params: crate::similarity::Params {
            max_df_fraction: config.recommend_max_df,
            ..crate::similarity::Params::default()
        },
    };
    let recommender = RecommendActor::new(shards.clone(), recommend_settings).start();
    let peer = Supervisor::start(move |_| peer);
    let sync_settings = SyncSettings {
        interval: config.sync_interval.unwrap_or(Duration::from_secs(86_400 * 365)),
        ..SyncSettings::default()
    };
    let sync = sync_ctx.run(SyncActor::new(node_id.clone(), network_keys, shards.clone(), peer.clone(), sync_settings));
    let supervisor = NodeSupervisor::new(
        facts,
        shards.clone(),
        hub.clone(),
        recommender.clone(),
        peer.clone(),
        config.change_log_retention,
    )
    .start();
    let state = AppState {
        shards: shards.clone(),
        auth,
        tokens: tokens.clone(),
        hub,
        supervisor: supervisor.clone(),
        sync: sync.clone(),
        ws_queue: config.ws_queue,
        recommend_k: config.recommend_k,
    };
    let cors_origins = config.cors_origins.clone();
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(actix_web::web::Data::new(state.clone()))
            .wrap(crate::api::cors(&cors_origins))
            .wrap(crate::api::security_headers())
            .configure(crate::api::configure)
    })
    .workers(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
    .disable_signals()
    .shutdown_timeout(10)
    .listen_rustls_0_23(listener, (*tls).clone())
    .context("cannot start the HTTPS server")?
    .run();
    supervisor.do_send(AttachHttp(HttpActor::new(server).start()));
    let key_actor = KeyActor::new(keys.clone(), config.key_file.clone(), shards.clone(), config.reseal_batch).start();
    ControlActor::new(control, supervisor.clone(), shards.clone(), key_actor, peer.clone(), recommender, sync).start();
    watch_signals(supervisor.clone());

    // Ready: wait for the shards, then tell the world where we are.
    let deadline = Instant::now() + READY_DEADLINE;
    let mut network;
    loop {
        let health = shards.health().await;
        if let Some(fatal) =
            health.iter().filter_map(|h| h.last_error.as_deref()).find(|e| e.starts_with(KEY_CHECK_FAILED))
        {
            if key_file_created {
                // It was made by this run and never sealed anything: do not leave a decoy behind.
                let _ = std::fs::remove_file(&config.key_file);
            }
            anyhow::bail!("{fatal} (key file: {})", config.key_file.display());
        }
        let auth_ready = tokens.is_ready();
        network = peer.send(GetNetwork).await.ok().and_then(Result::ok);
        let listening = network.as_ref().is_some_and(|n| n.listening);
        if auth_ready && listening && health.iter().all(|h| h.state == ShardState::Up) {
            // A prepared transaction found now was almost surely left by an earlier run:
            // this one has not announced itself (node.json comes next). Settle it at once
            // rather than after 30 s; were a write of this run caught, `Decide` makes it
            // abort cleanly, never half-apply.
            let recovered = shards.recover_in_doubt(0).await;
            if recovered > 0 {
                info!("settled cross-shard transactions left by the previous run"; "count" => recovered);
            }
            break;
        }
        // A stop asked for while waiting (a node whose shards never come up) is acted on
        // now; the node never announces itself.
        if supervisor.send(IsStopping).await.unwrap_or(true) {
            info!("stopped before it was ready"; "shards" => format!("{health:?}"), "network_listening" => listening);
            return Ok(());
        }
        if Instant::now() > deadline {
            warn!("not every shard is up, or the network not listening; reporting ready anyway";
                  "shards" => format!("{health:?}"), "network_listening" => listening);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p2p_addrs = network.map(|n| n.listen_addrs).unwrap_or_default();
    let info = NodeInfo {
        pid: std::process::id(),
        node_id,
        version: env!("CARGO_PKG_VERSION").into(),
        api_url: api_url.clone(),
        tls_cert: tls_files.cert.clone(),
        data_dir: data_dir.clone(),
        control_socket: crate::control::socket_path(data_dir),
        started_at: chrono::Utc::now(),
        peer_id: peer_id.clone(),
        p2p_addrs,
    };
    write_node_info(data_dir, &info)?;
    info!("node ready"; "api_url" => &api_url, "shards" => shards.len(), "tls_cert" => %tls_files.cert.display(),
          "peer_id" => &peer_id);
    Ok(())
}

fn write_node_info(data_dir: &Path, info: &NodeInfo) -> anyhow::Result<()> {
    let path = node_info_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// SIGTERM and SIGINT stop the node gracefully.
fn watch_signals(supervisor: Addr<NodeSupervisor>) {
    use tokio::signal::unix::{SignalKind, signal};
    actix_web::rt::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            warn!("cannot install signal handlers; stop the node with `cosmicsync stop`");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        supervisor.do_send(Shutdown);
    });
}
