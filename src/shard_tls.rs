//! Shard URLs and the TLS policy for reaching them.
//!
//! A shard URL comes in either form tokio-postgres accepts — `postgresql://…?k=v&…` or
//! `key=value …` — but tokio-postgres 0.7 knows only `sslmode=disable|prefer|require`
//! and nothing of `verify-ca`, `verify-full` or `sslrootcert`. [`ShardUrl::parse`] takes
//! those two parameters out, hands the rest to tokio-postgres, and decides how the shard
//! is reached:
//!
//! - Unix-socket hosts: no network, so no TLS; any `sslmode` is accepted.
//! - TCP hosts: never in clear text. `disable` is refused; `allow` and `prefer` mean
//!   `require`; no `sslmode` means `verify-full`.
//! - `verify-full`: chain checked against the CA file and the host name checked;
//!   `verify-ca`: chain only. Both need a CA file (`sslrootcert=` in the URL, else the
//!   node's `--shard-ca-file`).
//! - `require`: encrypted, server not authenticated (libpq's meaning) — unless a CA file
//!   is configured, when it is `verify-ca` (libpq does the same).
//!
//! This module is pure: no I/O, no logging. Its errors never contain a password, nor the
//! URL they came from. `connector` turns the policy into a rustls connector.

mod connector;

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

use tokio_postgres::config::Host;

pub use connector::{CaFileError, connector};

/// The `sslmode` values libpq knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 6] =
        [SslMode::Disable, SslMode::Allow, SslMode::Prefer, SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull];

    /// The name libpq uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == value)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the node's connections to one shard are secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Unix socket: nothing leaves the machine, TLS is not used.
    Off,
    /// Encrypted, but the server is not authenticated.
    Require,
    /// The server's certificate chain is checked against the CA; its host name is not.
    VerifyCa,
    /// The chain and the host name are checked.
    VerifyFull,
}

/// The TLS side of a shard URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTls {
    /// What is checked.
    pub mode: TlsMode,
    /// The CA certificates (PEM) the server's chain must lead to, for `VerifyCa`/`VerifyFull`.
    pub ca_file: Option<PathBuf>,
}

/// A parsed, checked shard URL.
#[derive(Debug, Clone)]
pub struct ShardUrl {
    /// What tokio-postgres connects with: `ssl_mode` is `Require` for every TLS mode (the
    /// checks themselves are the connector's) and `Disable` for a Unix socket.
    pub pg: tokio_postgres::Config,
    pub tls: ShardTls,
    /// `host:port` list for logs and errors (never the user or password).
    pub endpoint: String,
}

/// A shard URL that cannot be used. Never carries the URL or its password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardUrlError {
    #[error("cannot parse it: {0}")]
    Syntax(String),
    #[error("sslmode has an unknown value; use verify-full, verify-ca or require (or disable for a Unix socket)")]
    UnknownSslMode,
    #[error("it names no host: give host=… or postgresql://HOST/…")]
    NoHost,
    #[error("it mixes Unix-socket and TCP hosts; give one shard URL per kind of host")]
    MixedHosts,
    #[error(
        "sslmode=disable would send data and passwords unencrypted over TCP to {endpoint}; remove sslmode \
         (verify-full is the default) and give the server's CA with sslrootcert=FILE or --shard-ca-file FILE, \
         or use sslmode=require to encrypt without authenticating the server"
    )]
    Plaintext { endpoint: String },
    #[error(
        "{requested} checks the certificate of {endpoint} against a CA, but no CA file is given: add \
         sslrootcert=FILE to the URL or set --shard-ca-file FILE (COSMICSYNC_SHARD_CA_FILE, shard_ca_file), \
         or use sslmode=require to encrypt without authenticating the server"
    )]
    NoCaFile { requested: String, endpoint: String },
    #[error("sslrootcert=system (the operating system's CAs) is not supported: give the CA file itself")]
    SystemRoots,
}

impl ShardUrl {
    /// Parses `url` and applies the TLS policy; `default_ca` is the node's `--shard-ca-file`,
    /// used when the URL has no `sslrootcert`.
    pub fn parse(url: &str, default_ca: Option<&Path>) -> Result<ShardUrl, ShardUrlError> {
        let (rest, params) = split_tls_params(url)?;
        let mut pg: tokio_postgres::Config =
            rest.parse().map_err(|e: tokio_postgres::Error| ShardUrlError::Syntax(crate::errors::chain(&e)))?;
        // libpq lets a later parameter override an earlier one.
        let last = |key: &str| params.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let requested = match last("sslmode") {
            Some(value) => Some(SslMode::parse(value).ok_or(ShardUrlError::UnknownSslMode)?),
            None => None,
        };
        let ca_file = match last("sslrootcert").filter(|v| !v.is_empty()) {
            Some("system") => return Err(ShardUrlError::SystemRoots),
            Some(path) => Some(PathBuf::from(path)),
            None => default_ca.map(Path::to_path_buf),
        };
        let endpoint = endpoint(&pg);

        let hosts = pg.get_hosts();
        let unix = hosts.iter().filter(|h| matches!(h, Host::Unix(_))).count();
        let tcp = hosts.len() - unix + pg.get_hostaddrs().len();
        if unix + tcp == 0 {
            return Err(ShardUrlError::NoHost);
        }
        if unix > 0 && tcp > 0 {
            return Err(ShardUrlError::MixedHosts);
        }
        if tcp == 0 {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            return Ok(ShardUrl { pg, tls: ShardTls { mode: TlsMode::Off, ca_file: None }, endpoint });
        }

        let requested = requested.unwrap_or(SslMode::VerifyFull);
        let mode = match (requested, &ca_file) {
            (SslMode::Disable, _) => return Err(ShardUrlError::Plaintext { endpoint }),
            (SslMode::Allow | SslMode::Prefer | SslMode::Require, None) => TlsMode::Require,
            (SslMode::Allow | SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(_)) => TlsMode::VerifyCa,
            (SslMode::VerifyFull, Some(_)) => TlsMode::VerifyFull,
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                let requested = match last("sslmode") {
                    Some(_) => format!("sslmode={requested}"),
                    None => "with no sslmode given, verify-full applies and".to_owned(),
                };
                return Err(ShardUrlError::NoCaFile { requested, endpoint });
            }
        };
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
        let ca_file = if mode == TlsMode::Require { None } else { ca_file };
        Ok(ShardUrl { pg, tls: ShardTls { mode, ca_file }, endpoint })
    }
}

/// `host:port[,host:port…]` of a config, for messages; Unix sockets show their directory.
pub fn endpoint(pg: &tokio_postgres::Config) -> String {
    let ports = pg.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let mut names: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(dir) => dir.display().to_string(),
        })
        .collect();
    if names.is_empty() {
        names = pg.get_hostaddrs().iter().map(|a| a.to_string()).collect();
    }
    names.iter().enumerate().map(|(i, n)| format!("{n}:{}", port(i))).collect::<Vec<_>>().join(",")
}

/// A connection error as the shard reports it: a refused certificate reads
/// "certificate verify failed: …" whatever layer wrapped it; anything else is unchanged.
pub fn describe_connect_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut next = Some(err);
    while let Some(e) = next {
        let tls = e
            .downcast_ref::<rustls::Error>()
            .or_else(|| e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref()));
        if let Some(rustls::Error::InvalidCertificate(cert)) = tls {
            let hint = match cert {
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature => {
                    " (is the CA file the one that signed the server's certificate?)"
                }
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. } => {
                    " (the host in the shard URL must be a name in the server's certificate; \
                     sslmode=verify-ca skips this check)"
                }
                _ => "",
            };
            return format!("certificate verify failed: {}{hint}", rustls::Error::InvalidCertificate(cert.clone()));
        }
        next = e.source();
    }
    crate::errors::chain(err)
}

/// The URL without `sslmode` and `sslrootcert`, and those parameters (decoded) in order.
fn split_tls_params(url: &str) -> Result<(String, Vec<(String, String)>), ShardUrlError> {
    let prefix = ["postgres://", "postgresql://"].into_iter().find(|p| url.starts_with(p));
    let (spans, base): (Vec<Param>, Range<usize>) = match prefix {
        Some(prefix) => url_params(url, prefix.len())?,
        None => (key_value_params(url)?, 0..0),
    };
    let (tls, kept): (Vec<Param>, Vec<Param>) = spans.into_iter().partition(|p| TLS_KEYS.contains(&p.key.as_str()));
    let rest = match prefix {
        // The query's separator stays with the base even when every parameter goes.
        Some(_) => {
            let query: Vec<&str> = kept.iter().map(|p| &url[p.span.clone()]).collect();
            format!("{}{}", &url[base], query.join("&"))
        }
        None => kept.iter().map(|p| &url[p.span.clone()]).collect::<Vec<_>>().join(" "),
    };
    Ok((rest, tls.into_iter().map(|p| (p.key, p.value)).collect()))
}

/// The parameters tokio-postgres does not understand and this module handles.
const TLS_KEYS: [&str; 2] = ["sslmode", "sslrootcert"];

/// One parameter: decoded key and value, and where it sits in the URL.
struct Param {
    key: String,
    value: String,
    span: Range<usize>,
}

/// The query parameters of a `postgresql://` URL, split exactly as tokio-postgres does
/// (credentials end at the first `@`, the query starts at the next `?`), with the span of
/// everything before them.
fn url_params(url: &str, prefix_len: usize) -> Result<(Vec<Param>, Range<usize>), ShardUrlError> {
    let after_creds = url[prefix_len..].find('@').map_or(prefix_len, |at| prefix_len + at + 1);
    let Some(q) = url[after_creds..].find('?').map(|q| after_creds + q) else {
        return Ok((Vec::new(), 0..url.len()));
    };
    let mut params = Vec::new();
    let mut pos = q + 1;
    while pos < url.len() {
        let Some(eq) = url[pos..].find('=').map(|e| pos + e) else {
            return Err(ShardUrlError::Syntax("unterminated parameter".into()));
        };
        let end = url[eq + 1..].find('&').map_or(url.len(), |a| eq + 1 + a);
        params.push(Param { key: decode(&url[pos..eq])?, value: decode(&url[eq + 1..end])?, span: pos..end });
        pos = end + 1;
    }
    Ok((params, 0..q + 1))
}

fn decode(s: &str) -> Result<String, ShardUrlError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| ShardUrlError::Syntax("a parameter is not valid UTF-8 once percent-decoded".into()))
}

/// The parameters of a `key=value …` string, tokenised exactly as tokio-postgres does
/// (whitespace around `=`, values optionally single-quoted, `\` escapes).
fn key_value_params(s: &str) -> Result<Vec<Param>, ShardUrlError> {
    let mut it = s.char_indices().peekable();
    let mut params = Vec::new();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else { break };
        while it.next_if(|(_, c)| !c.is_whitespace() && *c != '=').is_some() {}
        let key_end = it.peek().map_or(s.len(), |(i, _)| *i);
        let key = s[start..key_end].to_owned();
        if key.is_empty() {
            return Err(ShardUrlError::Syntax("a parameter has no name before its `=`".into()));
        }
        skip_ws(&mut it);
        if it.next_if(|(_, c)| *c == '=').is_none() {
            return Err(ShardUrlError::Syntax(format!("expected `=` after `{key}`")));
        }
        skip_ws(&mut it);
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut closed = false;
        while let Some((_, c)) = it.next_if(|(_, c)| quoted || !c.is_whitespace()) {
            match c {
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                '\\' => value.extend(it.next().map(|(_, c)| c)),
                c => value.push(c),
            }
        }
        if quoted && !closed {
            return Err(ShardUrlError::Syntax(format!("unterminated quoted value of `{key}`")));
        }
        if !quoted && value.is_empty() {
            return Err(ShardUrlError::Syntax(format!("`{key}` has no value")));
        }
        let end = it.peek().map_or(s.len(), |(i, _)| *i);
        params.push(Param { key, value, span: start..end });
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "s3cr3t-Pa55";

    /// Parses with an optional node-wide CA file; the one helper every case goes through.
    fn check(url: &str, default_ca: Option<&str>) -> Result<ShardUrl, ShardUrlError> {
        let parsed = ShardUrl::parse(url, default_ca.map(Path::new));
        if let Err(e) = &parsed {
            assert!(!e.to_string().contains(PASSWORD), "password leaked into {e}");
            assert!(!format!("{e:?}").contains(PASSWORD), "password leaked into {e:?}");
        }
        parsed
    }

    fn mode(url: &str, default_ca: Option<&str>) -> (TlsMode, Option<PathBuf>) {
        let parsed = check(url, default_ca).unwrap_or_else(|e| panic!("{url}: {e}"));
        (parsed.tls.mode, parsed.tls.ca_file)
    }

    fn ssl(parsed: &ShardUrl) -> tokio_postgres::config::SslMode {
        parsed.pg.get_ssl_mode()
    }

    #[test]
    fn tcp_modes_in_url_form() {
        let url = |q: &str| format!("postgresql://cs:{PASSWORD}@db.internal:6432/shard_0{q}");
        let ca = Some(PathBuf::from("/etc/ca.pem"));
        assert_eq!(mode(&url("?sslmode=verify-full&sslrootcert=/etc/ca.pem"), None), (TlsMode::VerifyFull, ca.clone()));
        assert_eq!(mode(&url("?sslmode=verify-ca&sslrootcert=/etc/ca.pem"), None), (TlsMode::VerifyCa, ca.clone()));
        assert_eq!(mode(&url("?sslmode=require"), None), (TlsMode::Require, None));
        assert_eq!(mode(&url("?sslmode=prefer"), None), (TlsMode::Require, None));
        assert_eq!(mode(&url("?sslmode=allow"), None), (TlsMode::Require, None));
        // require with a CA behaves as verify-ca, as in libpq.
        assert_eq!(mode(&url("?sslmode=require"), Some("/etc/ca.pem")), (TlsMode::VerifyCa, ca.clone()));
        // No sslmode: verify-full.
        assert_eq!(mode(&url(""), Some("/etc/ca.pem")), (TlsMode::VerifyFull, ca.clone()));
        // The URL's sslrootcert wins over the node's CA file.
        assert_eq!(
            mode(&url("?sslrootcert=/srv/db-ca.pem"), Some("/etc/ca.pem")),
            (TlsMode::VerifyFull, Some(PathBuf::from("/srv/db-ca.pem")))
        );
        let parsed = check(&url("?sslmode=verify-full&sslrootcert=/etc/ca.pem"), None).unwrap();
        assert_eq!(ssl(&parsed), tokio_postgres::config::SslMode::Require);
        assert_eq!(parsed.endpoint, "db.internal:6432");
    }

    #[test]
    fn tcp_modes_in_key_value_form() {
        let kv = |extra: &str| format!("host=db.internal port=6432 user=cs password='{PASSWORD}' dbname=s0 {extra}");
        let ca = Some(PathBuf::from("/etc/my ca.pem"));
        assert_eq!(
            mode(&kv("sslmode=verify-full sslrootcert='/etc/my ca.pem'"), None),
            (TlsMode::VerifyFull, ca.clone())
        );
        assert_eq!(
            mode(&kv("sslmode = verify-ca sslrootcert=/etc/my\\ ca.pem"), None),
            (TlsMode::VerifyCa, ca.clone())
        );
        assert_eq!(mode(&kv("sslmode=require"), None), (TlsMode::Require, None));
        assert_eq!(mode(&kv("sslmode=prefer"), Some("/etc/my ca.pem")), (TlsMode::VerifyCa, ca.clone()));
        assert_eq!(mode(&kv(""), Some("/etc/my ca.pem")), (TlsMode::VerifyFull, ca));
    }

    #[test]
    fn everything_else_reaches_tokio_postgres_intact() {
        let parsed =
            check(&format!("postgresql://cs:{PASSWORD}@db:7000/shard_1?sslmode=require&connect_timeout=7"), None)
                .unwrap();
        assert_eq!(parsed.pg.get_password(), Some(PASSWORD.as_bytes()));
        assert_eq!(parsed.pg.get_dbname(), Some("shard_1"));
        assert_eq!(parsed.pg.get_connect_timeout(), Some(&std::time::Duration::from_secs(7)));
        let parsed = check(&format!("sslmode=require host=db password='{PASSWORD} x' dbname='a b'"), None).unwrap();
        assert_eq!(parsed.pg.get_password(), Some(format!("{PASSWORD} x").as_bytes()));
        assert_eq!(parsed.pg.get_dbname(), Some("a b"));
        // Percent-encoded parameters are decoded like tokio-postgres decodes them.
        let parsed = check("postgresql://db/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20file.pem", None).unwrap();
        assert_eq!(parsed.tls.ca_file, Some(PathBuf::from("/etc/ca file.pem")));
        // A URL whose only parameters are TLS ones still parses.
        let parsed = check("postgresql://u@db/x?sslmode=require", None).unwrap();
        assert_eq!(parsed.pg.get_user(), Some("u"));
    }

    #[test]
    fn unix_sockets_take_no_tls_and_any_sslmode() {
        for url in [
            "postgresql://postgres@%2Frun%2Fpg:5432/shard_0",
            "postgresql://postgres@%2Frun%2Fpg:5432/shard_0?sslmode=disable",
            "postgresql://postgres@%2Frun%2Fpg/shard_0?sslmode=verify-full",
            "host=/run/pg dbname=shard_0 sslmode=disable",
            "host=/run/pg dbname=shard_0",
        ] {
            let parsed = check(url, None).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed.tls, ShardTls { mode: TlsMode::Off, ca_file: None }, "{url}");
            assert_eq!(ssl(&parsed), tokio_postgres::config::SslMode::Disable, "{url}");
        }
    }

    #[test]
    fn plaintext_over_tcp_is_refused_and_says_what_to_write() {
        for url in [
            format!("postgresql://cs:{PASSWORD}@db.internal/s0?sslmode=disable"),
            format!("host=db.internal password={PASSWORD} sslmode=disable"),
            format!("postgresql://cs:{PASSWORD}@127.0.0.1:5432/s0?sslmode=verify-full&sslmode=disable"),
        ] {
            let err = check(&url, Some("/etc/ca.pem")).unwrap_err();
            assert!(matches!(err, ShardUrlError::Plaintext { .. }), "{url}: {err}");
            let text = err.to_string();
            assert!(text.contains("sslmode=disable") && text.contains("verify-full"), "{text}");
        }
    }

    #[test]
    fn verification_without_a_ca_file_is_refused() {
        for (url, says) in [
            (format!("postgresql://cs:{PASSWORD}@db/s0"), "no sslmode given"),
            (format!("postgresql://cs:{PASSWORD}@db/s0?sslmode=verify-full"), "sslmode=verify-full"),
            (format!("host=db password={PASSWORD} sslmode=verify-ca"), "sslmode=verify-ca"),
            (format!("postgresql://cs:{PASSWORD}@db/s0?sslmode=verify-ca&sslrootcert="), "sslmode=verify-ca"),
        ] {
            let err = check(&url, None).unwrap_err();
            assert!(matches!(err, ShardUrlError::NoCaFile { .. }), "{url}: {err}");
            let text = err.to_string();
            assert!(text.contains(says) && text.contains("--shard-ca-file") && text.contains("sslrootcert"), "{text}");
        }
    }

    #[test]
    fn bad_urls_get_clear_errors_without_the_password() {
        let cases = [
            (format!("postgresql://cs:{PASSWORD}@db/s0?sslmode=verify-everything"), "sslmode"),
            (format!("postgresql://cs:{PASSWORD}@db/s0?sslrootcert=system"), "system"),
            (format!("postgresql://cs:{PASSWORD}@db:notaport/s0?sslmode=require"), "port"),
            (format!("postgresql://cs:{PASSWORD}@db/s0?sslmode=require&bogus"), "parameter"),
            (format!("postgresql://cs:{PASSWORD}@db/s0?sslmode=require&no_such_option=1"), "no_such_option"),
            (format!("host=db password='{PASSWORD}"), "unterminated"),
            (format!("host=db password {PASSWORD}"), "password"),
            (format!("password={PASSWORD} dbname=x"), "no host"),
            (format!("host=/run/pg,db password={PASSWORD}"), "mixes"),
            (format!("host=db sslmode={PASSWORD}"), "sslmode"),
        ];
        for (url, says) in cases {
            let err = check(&url, Some("/etc/ca.pem")).unwrap_err();
            assert!(err.to_string().contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn endpoints_name_hosts_and_ports_only() {
        let parsed = check(&format!("postgresql://cs:{PASSWORD}@a:1,b:2/s0?sslmode=require"), None).unwrap();
        assert_eq!(parsed.endpoint, "a:1,b:2");
        let parsed = check(&format!("hostaddr=10.0.0.7 password={PASSWORD} sslmode=require"), None).unwrap();
        assert_eq!(parsed.endpoint, "10.0.0.7:5432");
        assert_eq!(parsed.tls.mode, TlsMode::Require);
    }

    #[test]
    fn certificate_errors_read_as_such_through_every_wrapper() {
        let cert = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, cert);
        #[derive(Debug, thiserror::Error)]
        #[error("error performing TLS handshake")]
        struct Outer(#[source] std::io::Error);
        let text = describe_connect_error(&Outer(io));
        assert!(text.starts_with("certificate verify failed: "), "{text}");
        assert!(text.contains("UnknownIssuer"), "{text}");
        // Anything else keeps its whole chain of causes.
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(describe_connect_error(&Outer(refused)), "error performing TLS handshake: connection refused");
    }
}
