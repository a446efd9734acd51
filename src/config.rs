//! Node configuration in two stages.
//!
//! `NodeArgs` is the raw layer: what `cosmicsync start` accepts as flags or `COSMICSYNC_*`
//! environment variables (clap reads both; flags win), and `FileConfig` is what a TOML
//! file may set. `NodeConfig::resolve` merges them — flags > env > file > defaults —
//! and validates, so boot code only ever sees a complete, checked `NodeConfig`.
//! This module only parses and checks: it must never create files or start anything.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Deserialize;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for a terminal.
    #[default]
    Term,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Defaults, in one place so `--help`, the docs and the code agree.
pub mod defaults {
    pub const DATA_DIR: &str = "./cosmicsync-data";
    pub const HTTP_ADDR: &str = "127.0.0.1:8443";
    pub const SHARDS: usize = 4;
    pub const POOL_SIZE: usize = 16;
    pub const SHARD_TIMEOUT_SECS: u64 = 10;
    pub const PG_MAX_CONNECTIONS: u32 = 200;
    pub const BCRYPT_COST: u32 = 12;
    pub const TOKEN_TTL_SECS: u64 = 3600;
    pub const WS_QUEUE: usize = 1024;
    pub const KEY_FILE: &str = "keys.json";
    pub const RESEAL_BATCH: u32 = 500;
    pub const NETWORK_KEY_FILE: &str = "network.key";
    pub const SYNC_INTERVAL: &str = "30s";
    pub const CHANGE_LOG_RETENTION: &str = "7d";
    pub const LOGIN_FAILURES_PER_ADDRESS: u32 = 20;
    pub const LOGIN_FAILURES_PER_USERNAME: u32 = 5;
    pub const LOG_LEVEL: &str = "info";
    pub const RECOMMEND_INTERVAL: &str = "1h";
    pub const RECOMMEND_K: usize = crate::similarity::defaults::K;
    pub const RECOMMEND_MAX_DF: f64 = crate::similarity::defaults::MAX_DF_FRACTION;
}

/// Options of `cosmicsync start`. Every one may also come from a `COSMICSYNC_*`
/// variable or the TOML file given with `--config`.
#[derive(Debug, Clone, Args, Default)]
pub struct NodeArgs {
    /// TOML file with any of these options (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "COSMICSYNC_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// HTTPS listen address; port 0 picks a free port (see <data-dir>/node.json) [default: 127.0.0.1:8443]
    #[arg(long, env = "COSMICSYNC_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// Number of shards when the node runs its own PostgreSQL [default: 4]
    #[arg(long, env = "COSMICSYNC_SHARDS", value_name = "N")]
    pub shards: Option<usize>,

    /// PostgreSQL URL of a shard, once per shard in order; when given, the node runs no
    /// PostgreSQL of its own and the shard count is the number of URLs. TCP hosts are
    /// reached over TLS only: no sslmode means verify-full (needs a CA file), verify-ca
    /// checks the chain only, require encrypts without authenticating the server (it is
    /// verify-ca when a CA file is set), disable is refused; Unix sockets use no TLS
    #[arg(long = "shard-url", env = "COSMICSYNC_SHARD_URLS", value_delimiter = ',', value_name = "URL")]
    pub shard_urls: Vec<String>,

    /// CA certificates (PEM) that shard servers' certificates must chain to, for shard URLs
    /// without their own sslrootcert=
    #[arg(long, env = "COSMICSYNC_SHARD_CA_FILE", value_name = "FILE")]
    pub shard_ca_file: Option<PathBuf>,

    /// Connections per shard pool [default: 16]
    #[arg(long, env = "COSMICSYNC_POOL_SIZE", value_name = "N")]
    pub pool_size: Option<usize>,

    /// Longest a request to one shard may take, in seconds (1-3600): past it the request
    /// fails with 503 and the shard is checked, so a shard server that stops answering
    /// without closing its connections (black-holed) fails its own requests in bounded
    /// time and the others keep serving. Also each statement's statement_timeout, the
    /// limit on a transaction left idle, and the TCP user timeout (with keepalives) that
    /// closes a connection whose packets go unanswered [default: 10]
    #[arg(long, env = "COSMICSYNC_SHARD_TIMEOUT", value_name = "SECONDS")]
    pub shard_timeout: Option<u64>,

    /// Directory of the PostgreSQL server binaries [default: `pg_config --bindir`]
    #[arg(long, env = "COSMICSYNC_PG_BIN_DIR", value_name = "DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// max_connections of the node's own PostgreSQL [default: 200]
    #[arg(long, env = "COSMICSYNC_PG_MAX_CONNECTIONS", value_name = "N")]
    pub pg_max_connections: Option<u32>,

    /// bcrypt cost for new password hashes, 4-31 [default: 12]
    #[arg(long, env = "COSMICSYNC_BCRYPT_COST", value_name = "COST")]
    pub bcrypt_cost: Option<u32>,

    /// Access token lifetime in seconds [default: 3600]
    #[arg(long, env = "COSMICSYNC_TOKEN_TTL", value_name = "SECONDS")]
    pub token_ttl: Option<u64>,

    /// TLS certificate chain (PEM); with --tls-key. Default: a self-signed pair generated into <data-dir>/tls
    #[arg(long, env = "COSMICSYNC_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM); with --tls-cert
    #[arg(long, env = "COSMICSYNC_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Events a WebSocket client may fall behind by before it is disconnected [default: 1024]
    #[arg(long, env = "COSMICSYNC_WS_QUEUE", value_name = "N")]
    pub ws_queue: Option<usize>,

    /// Key file with the data keys that seal emails at rest and the blind-index key (JSON,
    /// mode 0600); created on first start. Losing it makes the sealed data unreadable:
    /// back it up [default: <data-dir>/keys.json]
    #[arg(long, env = "COSMICSYNC_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// Rows re-sealed per transaction during a key rotation: smaller batches hold row
    /// locks for less time, larger ones finish sooner [default: 500]
    #[arg(long, env = "COSMICSYNC_RESEAL_BATCH", value_name = "ROWS")]
    pub reseal_batch: Option<u32>,

    /// The network key (32 bytes, mode 0600) of the network to join: copy
    /// <data-dir>/network.key from any member. Without it the node uses its own
    /// <data-dir>/network.key, created on first start (a network of one)
    #[arg(long, env = "COSMICSYNC_NETWORK_KEY_FILE", value_name = "FILE")]
    pub network_key_file: Option<PathBuf>,

    /// Mean time between reconciliations with a few peers (jittered ±50 %), e.g. 10s, 5m;
    /// off reconciles only when a peer connects [default: 30s]
    #[arg(long, env = "COSMICSYNC_SYNC_INTERVAL", value_name = "DURATION")]
    pub sync_interval: Option<String>,

    /// How long the change log keeps entries a later change of the same row supersedes:
    /// a WebSocket client resuming from further back gets each row's latest change only.
    /// Replication never reads the log. e.g. 1h, 7d; off keeps everything [default: 7d]
    #[arg(long, env = "COSMICSYNC_CHANGE_LOG_RETENTION", value_name = "DURATION")]
    pub change_log_retention: Option<String>,

    /// A browser origin allowed to call the API cross-origin (repeatable); CORS is off
    /// when none is given
    #[arg(long = "cors-origin", env = "COSMICSYNC_CORS_ORIGINS", value_delimiter = ',', value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,

    /// Failed logins allowed per minute from one client address before 429 [default: 20]
    #[arg(long, env = "COSMICSYNC_LOGIN_FAILURES_PER_ADDRESS", value_name = "N")]
    pub login_failures_per_address: Option<u32>,

    /// Failed logins allowed per minute for one username before 429 [default: 5]
    #[arg(long, env = "COSMICSYNC_LOGIN_FAILURES_PER_USERNAME", value_name = "N")]
    pub login_failures_per_username: Option<u32>,
    /// Time between recommendation runs, e.g. 90s, 30m, 1h, 1d; 0 or off runs them only on demand [default: 1h]
    #[arg(long, env = "COSMICSYNC_RECOMMEND_INTERVAL", value_name = "DURATION")]
    pub recommend_interval: Option<String>,

    /// Neighbours kept per user and mode by a recommendation run, 1-100 [default: 20]
    #[arg(long, env = "COSMICSYNC_RECOMMEND_K", value_name = "K")]
    pub recommend_k: Option<usize>,

    /// Features held by more than this fraction of users (and more than 100 users) are ignored by recommendations, 0-1 [default: 0.02]
    #[arg(long, env = "COSMICSYNC_RECOMMEND_MAX_DF", value_name = "FRACTION")]
    pub recommend_max_df: Option<f64>,
    #[command(flatten)]
    pub p2p: Box<crate::p2p::config::P2pArgs>,
}

/// What a TOML config file may set (same names as the flags).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub http_addr: Option<SocketAddr>,
    pub shards: Option<usize>,
    pub shard_urls: Option<Vec<String>>,
    pub shard_ca_file: Option<PathBuf>,
    pub pool_size: Option<usize>,
    pub shard_timeout: Option<u64>,
    pub pg_bin_dir: Option<PathBuf>,
    pub pg_max_connections: Option<u32>,
    pub bcrypt_cost: Option<u32>,
    pub token_ttl: Option<u64>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub ws_queue: Option<usize>,
    pub key_file: Option<PathBuf>,
    pub reseal_batch: Option<u32>,
    pub network_key_file: Option<PathBuf>,
    pub sync_interval: Option<String>,
    pub change_log_retention: Option<String>,
    pub cors_origins: Option<Vec<String>>,
    pub login_failures_per_address: Option<u32>,
    pub login_failures_per_username: Option<u32>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub recommend_interval: Option<String>,
    pub recommend_k: Option<usize>,
    pub recommend_max_df: Option<f64>,

    /// The peer-to-peer network (`[p2p]` table).
    pub p2p: Option<crate::p2p::config::P2pFile>,
}

/// Where the shards live.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    /// The node runs its own PostgreSQL under `<data-dir>/pg` with this many shards.
    Embedded { shards: usize, bin_dir: Option<PathBuf>, max_connections: u32 },
    /// One PostgreSQL URL per shard.
    Urls(Vec<String>),
}

impl Storage {
    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        match self {
            Storage::Embedded { shards, .. } => *shards,
            Storage::Urls(urls) => urls.len(),
        }
    }
}

/// The checked configuration a node boots with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub storage: Storage,
    /// CA file for shard URLs without their own `sslrootcert` (see `shard_tls`).
    pub shard_ca_file: Option<PathBuf>,
    pub pool_size: usize,
    /// Bound on one shard request (see `--shard-timeout`).
    pub shard_timeout: std::time::Duration,
    pub bcrypt_cost: u32,
    pub token_ttl_secs: u64,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub ws_queue: usize,
    pub key_file: PathBuf,
    pub reseal_batch: u32,
    /// The network key file, and whether it was given (then it must exist).
    pub network_key_file: PathBuf,
    pub network_key_given: bool,
    /// Periodic reconciliation; `None`: only when peers connect.
    pub sync_interval: Option<std::time::Duration>,
    /// How long superseded change-log entries are kept; `None`: for ever.
    pub change_log_retention: Option<std::time::Duration>,
    pub cors_origins: Vec<String>,
    pub login_failures_per_address: NonZeroU32,
    pub login_failures_per_username: NonZeroU32,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Time between recommendation runs; `None`: on demand only.
    pub recommend_interval: Option<std::time::Duration>,
    pub recommend_k: usize,
    pub recommend_max_df: f64,
    pub p2p: crate::p2p::config::P2pConfig,
}

/// A configuration that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "config file {path} holds a secret (a password in a shard URL) but other users can read it \
         (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// A list option: the flags/env values if any were given, else the file's list, else
/// `default`; entries are trimmed and empty ones dropped.
pub(crate) fn list(flags: &[String], file: Option<Vec<String>>, default: &[&str]) -> Vec<String> {
    let chosen = if flags.is_empty() {
        file.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
    } else {
        flags.to_vec()
    };
    chosen.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

/// Options every command shares (they locate the node).
#[derive(Debug, Clone, Default)]
pub struct GlobalOptions {
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
}

impl FileConfig {
    /// Reads and parses a TOML config file; one that holds a secret must not be readable
    /// by other users.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let file: FileConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let mode = std::fs::metadata(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?
            .permissions()
            .mode();
        if file.holds_secrets() && mode & 0o077 != 0 {
            return Err(ConfigError::Exposed { path: path.to_owned(), mode: mode & 0o777 });
        }
        Ok(file)
    }

    /// Does any setting carry a secret (today: a password inside a shard URL)?
    fn holds_secrets(&self) -> bool {
        self.shard_urls
            .iter()
            .flatten()
            .any(|url| url.parse::<tokio_postgres::Config>().map(|c| c.get_password().is_some()).unwrap_or(true))
    }
}

impl NodeConfig {
    /// Merges flags/env (`args`, `global`) over the file (if any) over defaults, and checks.
    pub fn resolve(global: &GlobalOptions, args: &NodeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::merge(global, args, file)
    }

    fn merge(global: &GlobalOptions, args: &NodeArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let data_dir = global.data_dir.clone().or(file.data_dir).unwrap_or_else(|| defaults::DATA_DIR.into());
        let data_dir = std::path::absolute(&data_dir).map_err(|e| invalid("data-dir", e.to_string()))?;
        let http_addr = match args.http_addr.or(file.http_addr) {
            Some(a) => a,
            None => defaults::HTTP_ADDR.parse().map_err(|_| invalid("http-addr", "bad default"))?,
        };
        let urls = list(&args.shard_urls, file.shard_urls, &[]);
        let shards = args.shards.or(file.shards);
        let shard_ca_file = args.shard_ca_file.clone().or(file.shard_ca_file);
        let storage = if urls.is_empty() {
            let shards = shards.unwrap_or(defaults::SHARDS);
            if !(1..=64).contains(&shards) {
                return Err(invalid("shards", "must be 1-64"));
            }
            let max_connections =
                args.pg_max_connections.or(file.pg_max_connections).unwrap_or(defaults::PG_MAX_CONNECTIONS);
            Storage::Embedded { shards, bin_dir: args.pg_bin_dir.clone().or(file.pg_bin_dir), max_connections }
        } else {
            if let Some(n) = shards.filter(|n| *n != urls.len()) {
                return Err(invalid("shards", format!("{n} shards asked for but {} shard URLs given", urls.len())));
            }
            for (index, url) in urls.iter().enumerate() {
                crate::shard_tls::ShardUrl::parse(url, shard_ca_file.as_deref())
                    .map_err(|e| invalid("shard-url", format!("shard {index}: {e}")))?;
            }
            if urls.len() > 64 {
                return Err(invalid("shard-url", "at most 64 shards"));
            }
            Storage::Urls(urls)
        };
        let pool_size = args.pool_size.or(file.pool_size).unwrap_or(defaults::POOL_SIZE);
        if !(1..=1024).contains(&pool_size) {
            return Err(invalid("pool-size", "must be 1-1024"));
        }
        let shard_timeout = args.shard_timeout.or(file.shard_timeout).unwrap_or(defaults::SHARD_TIMEOUT_SECS);
        if !(1..=3600).contains(&shard_timeout) {
            return Err(invalid("shard-timeout", "must be 1-3600 seconds"));
        }
        let shard_timeout = std::time::Duration::from_secs(shard_timeout);
        let bcrypt_cost = args.bcrypt_cost.or(file.bcrypt_cost).unwrap_or(defaults::BCRYPT_COST);
        if !(4..=31).contains(&bcrypt_cost) {
            return Err(invalid("bcrypt-cost", "must be 4-31"));
        }
        let token_ttl_secs = args.token_ttl.or(file.token_ttl).unwrap_or(defaults::TOKEN_TTL_SECS);
        if !(10..=30 * 24 * 3600).contains(&token_ttl_secs) {
            return Err(invalid("token-ttl", "must be 10 seconds to 30 days"));
        }
        let tls = match (args.tls_cert.clone().or(file.tls_cert), args.tls_key.clone().or(file.tls_key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(invalid("tls-cert", "--tls-cert and --tls-key go together")),
        };
        let ws_queue = args.ws_queue.or(file.ws_queue).unwrap_or(defaults::WS_QUEUE);
        if !(16..=1_000_000).contains(&ws_queue) {
            return Err(invalid("ws-queue", "must be 16-1000000"));
        }
        let key_file = match args.key_file.clone().or(file.key_file) {
            Some(path) => std::path::absolute(path).map_err(|e| invalid("key-file", e.to_string()))?,
            None => data_dir.join(defaults::KEY_FILE),
        };
        let reseal_batch = args.reseal_batch.or(file.reseal_batch).unwrap_or(defaults::RESEAL_BATCH);
        if !(1..=100_000).contains(&reseal_batch) {
            return Err(invalid("reseal-batch", "must be 1-100000"));
        }
        let given = args.network_key_file.clone().or(file.network_key_file);
        let network_key_given = given.is_some();
        let network_key_file = match given {
            Some(path) => std::path::absolute(path).map_err(|e| invalid("network-key-file", e.to_string()))?,
            None => data_dir.join(defaults::NETWORK_KEY_FILE),
        };
        let interval = args.sync_interval.clone().or(file.sync_interval);
        let sync_interval = parse_interval(interval.as_deref().unwrap_or(defaults::SYNC_INTERVAL))
            .map_err(|m| invalid("sync-interval", m))?;
        let retention = args.change_log_retention.clone().or(file.change_log_retention);
        let change_log_retention = parse_interval(retention.as_deref().unwrap_or(defaults::CHANGE_LOG_RETENTION))
            .map_err(|m| invalid("change-log-retention", m))?;
        let cors_origins = list(&args.cors_origins, file.cors_origins, &[]);
        for origin in &cors_origins {
            let host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            let ok = host.is_some_and(|h| !h.is_empty() && !h.contains(['/', '*', ' ', '?', '#', '@']))
                && origin.parse::<actix_web::http::Uri>().is_ok();
            if !ok {
                return Err(invalid(
                    "cors-origin",
                    format!("{origin:?} is not an origin like https://app.example.org"),
                ));
            }
        }
        let limit = |field: &'static str, value: Option<u32>, default: u32| {
            NonZeroU32::new(value.unwrap_or(default)).ok_or_else(|| invalid(field, "must be at least 1"))
        };
        let login_failures_per_address = limit(
            "login-failures-per-address",
            args.login_failures_per_address.or(file.login_failures_per_address),
            defaults::LOGIN_FAILURES_PER_ADDRESS,
        )?;
        let login_failures_per_username = limit(
            "login-failures-per-username",
            args.login_failures_per_username.or(file.login_failures_per_username),
            defaults::LOGIN_FAILURES_PER_USERNAME,
        )?;
        let log_format = global.log_format.or(file.log_format).unwrap_or_default();
        let log_level = global.log_level.clone().or(file.log_level).unwrap_or_else(|| defaults::LOG_LEVEL.into());
        crate::logging::parse_level(&log_level)
            .ok_or_else(|| invalid("log-level", "must be one of critical, error, warning, info, debug, trace"))?;
        let interval = args.recommend_interval.clone().or(file.recommend_interval);
        let recommend_interval = parse_interval(interval.as_deref().unwrap_or(defaults::RECOMMEND_INTERVAL))
            .map_err(|m| invalid("recommend-interval", m))?;
        let recommend_k = args.recommend_k.or(file.recommend_k).unwrap_or(defaults::RECOMMEND_K);
        if !(1..=100).contains(&recommend_k) {
            return Err(invalid("recommend-k", "must be 1-100"));
        }
        let recommend_max_df = args.recommend_max_df.or(file.recommend_max_df).unwrap_or(defaults::RECOMMEND_MAX_DF);
        if !(recommend_max_df > 0.0 && recommend_max_df <= 1.0) {
            return Err(invalid("recommend-max-df", "must be a fraction above 0 and at most 1"));
        }
        let p2p = crate::p2p::config::P2pConfig::merge(&args.p2p, file.p2p)?;
        Ok(NodeConfig {
            data_dir,
            http_addr,
            storage,
            shard_ca_file,
            pool_size,
            shard_timeout,
            bcrypt_cost,
            token_ttl_secs,
            tls,
            ws_queue,
            key_file,
            reseal_batch,
            network_key_file,
            network_key_given,
            sync_interval,
            change_log_retention,
            cors_origins,
            login_failures_per_address,
            login_failures_per_username,
            log_format,
            log_level,
            recommend_interval,
            recommend_k,
            recommend_max_df,
            p2p,
        })
    }
}

/// A time between runs: `<n>` seconds or `<n>s|m|h|d`; `0` or `off` means never.
fn parse_interval(text: &str) -> Result<Option<std::time::Duration>, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a duration such as 90s, 30m, 1h or 1d (or 0/off)");
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = number.parse::<u64>().ok().and_then(|n| n.checked_mul(scale)).ok_or_else(bad)?;
    if secs > 365 * 86_400 {
        return Err("must be at most a year".into());
    }
    Ok((secs > 0).then(|| std::time::Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml: &str) -> FileConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn defaults_apply() {
        let c = NodeConfig::merge(&GlobalOptions::default(), &NodeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.http_addr.to_string(), defaults::HTTP_ADDR);
        assert_eq!(c.storage.shard_count(), 4);
        assert_eq!(c.bcrypt_cost, 12);
        assert!(c.data_dir.is_absolute());
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let args = NodeArgs { bcrypt_cost: Some(5), ..Default::default() };
        let c = NodeConfig::merge(
            &GlobalOptions::default(),
            &args,
            file("bcrypt_cost = 8\nshards = 2\nhttp_addr = \"127.0.0.1:0\""),
        )
        .unwrap();
        assert_eq!(c.bcrypt_cost, 5);
        assert_eq!(c.storage.shard_count(), 2);
        assert_eq!(c.http_addr.port(), 0);
    }

    #[test]
    fn shard_urls_set_the_count() {
        let args = NodeArgs {
            shard_urls: vec!["host=/tmp dbname=a".into(), "postgresql://u@localhost/b?sslmode=require".into()],
            ..Default::default()
        };
        let c = NodeConfig::merge(&GlobalOptions::default(), &args, FileConfig::default()).unwrap();
        assert!(matches!(c.storage, Storage::Urls(ref u) if u.len() == 2));
        let bad = NodeArgs { shards: Some(3), ..args };
        assert!(NodeConfig::merge(&GlobalOptions::default(), &bad, FileConfig::default()).is_err());
    }

    #[test]
    fn shard_urls_follow_the_tls_policy_with_the_ca_file_from_flag_or_file() {
        let tcp = |query: &str| NodeArgs {
            shard_urls: vec![format!("postgresql://u:pw-secret@db.internal/s0{query}")],
            ..Default::default()
        };
        let merge = |args: &NodeArgs, toml: &str| NodeConfig::merge(&GlobalOptions::default(), args, file(toml));
        let err = merge(&tcp("?sslmode=disable"), "").unwrap_err().to_string();
        assert!(err.contains("shard-url") && err.contains("shard 0") && err.contains("sslmode=disable"), "{err}");
        assert!(!err.contains("pw-secret"), "{err}");
        // verify-full (the default) needs a CA file: the flag wins over the file.
        let err = merge(&tcp(""), "").unwrap_err().to_string();
        assert!(err.contains("--shard-ca-file"), "{err}");
        let c = merge(&tcp(""), "shard_ca_file = \"/file-ca.pem\"").unwrap();
        assert_eq!(c.shard_ca_file.as_deref(), Some(Path::new("/file-ca.pem")));
        let flag = NodeArgs { shard_ca_file: Some("/flag-ca.pem".into()), ..tcp("") };
        let c = merge(&flag, "shard_ca_file = \"/file-ca.pem\"").unwrap();
        assert_eq!(c.shard_ca_file.as_deref(), Some(Path::new("/flag-ca.pem")));
    }

    #[test]
    fn rejects_bad_values_with_the_field_name() {
        for (args, field) in [
            (NodeArgs { bcrypt_cost: Some(3), ..Default::default() }, "bcrypt-cost"),
            (NodeArgs { shards: Some(0), ..Default::default() }, "shards"),
            (NodeArgs { pool_size: Some(0), ..Default::default() }, "pool-size"),
            (NodeArgs { shard_timeout: Some(0), ..Default::default() }, "shard-timeout"),
        ] {
            let err = NodeConfig::merge(&GlobalOptions::default(), &args, FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        assert!(toml::from_str::<FileConfig>("no_such_option = 1").is_err());
        for origin in ["*", "example.org", "https://*.example.org", "https://example.org/path", "https://"] {
            let args = NodeArgs { cors_origins: vec![origin.into()], ..Default::default() };
            let err = NodeConfig::merge(&GlobalOptions::default(), &args, FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains("cors-origin"), "{origin}: {err}");
        }
    }

    #[test]
    fn a_config_file_with_a_secret_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let set_mode = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::fs::write(&path, "shard_urls = [\"postgresql://u:hunter2@db.example.org/a\"]\n").unwrap();
        set_mode(0o644);
        let err = FileConfig::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Exposed { .. }), "{err}");
        assert!(!err.to_string().contains("hunter2"), "the secret is not repeated: {err}");
        set_mode(0o600);
        assert!(FileConfig::load(&path).is_ok());
        std::fs::write(&path, "shards = 2\n").unwrap();
        set_mode(0o644);
        assert!(FileConfig::load(&path).is_ok(), "no secret, no restriction");
    }

    #[test]
    fn recommendation_options_resolve_and_check() {
        let c = NodeConfig::merge(&GlobalOptions::default(), &NodeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.recommend_interval, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(c.recommend_k, 20);
        let args = NodeArgs { recommend_interval: Some("off".into()), ..Default::default() };
        let c = NodeConfig::merge(&GlobalOptions::default(), &args, file("recommend_k = 5")).unwrap();
        assert_eq!((c.recommend_interval, c.recommend_k), (None, 5));
        for (text, secs) in
            [("0", None), ("90", Some(90)), ("90s", Some(90)), ("30m", Some(1800)), ("2d", Some(172_800))]
        {
            assert_eq!(parse_interval(text).unwrap(), secs.map(std::time::Duration::from_secs), "{text}");
        }
        for text in ["", "1x", "-5s", "h", "99999999999999999999d", "400d"] {
            assert!(parse_interval(text).is_err(), "{text} was accepted");
        }
        for (args, field) in [
            (NodeArgs { recommend_k: Some(0), ..Default::default() }, "recommend-k"),
            (NodeArgs { recommend_max_df: Some(0.0), ..Default::default() }, "recommend-max-df"),
            (NodeArgs { recommend_interval: Some("soon".into()), ..Default::default() }, "recommend-interval"),
        ] {
            let err = NodeConfig::merge(&GlobalOptions::default(), &args, FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }
}
