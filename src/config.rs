//! Node configuration in two stages.
//!
//! `NodeArgs` is the raw layer: what `cosmicsync start` accepts as flags or `COSMICSYNC_*`
//! environment variables (clap reads both; flags win), and `FileConfig` is what a TOML
//! file may set. `NodeConfig::resolve` merges them — flags > env > file > defaults —
//! and validates, so boot code only ever sees a complete, checked `NodeConfig`.
//! This module only parses and checks: it must never create files or start anything.

use std::net::SocketAddr;
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
    pub const PG_MAX_CONNECTIONS: u32 = 200;
    pub const BCRYPT_COST: u32 = 12;
    pub const TOKEN_TTL_SECS: u64 = 3600;
    pub const WS_QUEUE: usize = 1024;
    pub const LOG_LEVEL: &str = "info";
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
    /// PostgreSQL of its own and the shard count is the number of URLs
    #[arg(long = "shard-url", env = "COSMICSYNC_SHARD_URLS", value_delimiter = ',', value_name = "URL")]
    pub shard_urls: Vec<String>,

    /// Connections per shard pool [default: 16]
    #[arg(long, env = "COSMICSYNC_POOL_SIZE", value_name = "N")]
    pub pool_size: Option<usize>,

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
    pub pool_size: Option<usize>,
    pub pg_bin_dir: Option<PathBuf>,
    pub pg_max_connections: Option<u32>,
    pub bcrypt_cost: Option<u32>,
    pub token_ttl: Option<u64>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub ws_queue: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
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
    pub pool_size: usize,
    pub bcrypt_cost: u32,
    pub token_ttl_secs: u64,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub ws_queue: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    pub p2p: crate::p2p::config::P2pConfig,
}

/// A configuration that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// Options every command shares (they locate the node).
#[derive(Debug, Clone, Default)]
pub struct GlobalOptions {
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
}

impl FileConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
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
        let urls =
            if args.shard_urls.is_empty() { file.shard_urls.unwrap_or_default() } else { args.shard_urls.clone() };
        let urls: Vec<String> = urls.into_iter().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
        let shards = args.shards.or(file.shards);
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
            for url in &urls {
                url.parse::<tokio_postgres::Config>()
                    .map_err(|e| invalid("shard-url", format!("cannot parse a shard URL: {e}")))?;
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
        let log_format = global.log_format.or(file.log_format).unwrap_or_default();
        let log_level = global.log_level.clone().or(file.log_level).unwrap_or_else(|| defaults::LOG_LEVEL.into());
        crate::logging::parse_level(&log_level)
            .ok_or_else(|| invalid("log-level", "must be one of critical, error, warning, info, debug, trace"))?;
        let p2p = crate::p2p::config::P2pConfig::merge(&args.p2p, file.p2p)?;
        Ok(NodeConfig {
            data_dir,
            http_addr,
            storage,
            pool_size,
            bcrypt_cost,
            token_ttl_secs,
            tls,
            ws_queue,
            log_format,
            log_level,
            p2p,
        })
    }
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
            shard_urls: vec!["host=/tmp dbname=a".into(), "postgresql://u@localhost/b".into()],
            ..Default::default()
        };
        let c = NodeConfig::merge(&GlobalOptions::default(), &args, FileConfig::default()).unwrap();
        assert!(matches!(c.storage, Storage::Urls(ref u) if u.len() == 2));
        let bad = NodeArgs { shards: Some(3), ..args };
        assert!(NodeConfig::merge(&GlobalOptions::default(), &bad, FileConfig::default()).is_err());
    }

    #[test]
    fn rejects_bad_values_with_the_field_name() {
        for (args, field) in [
            (NodeArgs { bcrypt_cost: Some(3), ..Default::default() }, "bcrypt-cost"),
            (NodeArgs { shards: Some(0), ..Default::default() }, "shards"),
            (NodeArgs { pool_size: Some(0), ..Default::default() }, "pool-size"),
        ] {
            let err = NodeConfig::merge(&GlobalOptions::default(), &args, FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        assert!(toml::from_str::<FileConfig>("no_such_option = 1").is_err());
    }
}
