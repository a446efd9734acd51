//! A PostgreSQL server with TLS over TCP, for the tests whose shards are reached over the
//! network (`tests/shard_tls.rs`, `tests/shard_stall.rs`): a CA generated here signs the
//! server's certificate; the server is real and stopped when the test ends.

use std::path::{Path, PathBuf};
use std::process::Command;

use cosmicsync::embedded_pg::{EmbeddedOptions, EmbeddedPostgres};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use super::PgGuard;

/// A PostgreSQL server with TLS on a free TCP port, its CA, and a CA that did not sign it.
pub struct TlsServer {
    /// First field, so the server stops before its directory goes.
    pub pg: PgGuard,
    pub port: u16,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    /// Starts the server on 127.0.0.1 (certificate for `localhost` only) with databases
    /// `s0` and `s1`; `None` (and a note why) when the machine has no PostgreSQL.
    pub fn start() -> Option<TlsServer> {
        super::or_skip(pg_installed())?;
        let server = TlsServer::start_at("127.0.0.1", "localhost", None, &["s0", "s1"], EmbeddedPostgres::start);
        // initdb -A trust lets local TCP clients in; the node's connections must match it.
        let hba = std::fs::read_to_string(server.pg.data_dir().join("pg_hba.conf")).unwrap();
        assert!(hba.lines().any(|l| l.starts_with("host") && l.contains("127.0.0.1/32")), "pg_hba.conf:\n{hba}");
        Some(server)
    }

    /// Starts a server listening on `listen` with a certificate for `name`, with
    /// databases `dbs`, started by `launch` (e.g. inside a network namespace). With
    /// `trust_from` (an address) the server uses an hba file of its own that trusts TLS
    /// connections from that address, besides the socket and 127.0.0.1.
    pub fn start_at(
        listen: &str,
        name: &str,
        trust_from: Option<&str>,
        dbs: &[&str],
        launch: impl FnOnce(&EmbeddedOptions) -> Result<EmbeddedPostgres, cosmicsync::embedded_pg::PgError>,
    ) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("CosmicSync test shard CA");
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&server_key, &ca).unwrap();

        // The server's files: its key must be private to the account PostgreSQL runs as.
        let certs = dir.path().join("server-tls");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("server.crt"), server_cert.pem()).unwrap();
        write_private(&certs.join("server.key"), &server_key.serialize_pem());
        if let Some(client) = trust_from {
            let hba =
                format!("local all all trust\nhost all all 127.0.0.1/32 trust\nhostssl all all {client}/32 trust\n");
            std::fs::write(certs.join("pg_hba.conf"), hba).unwrap();
        }
        give_to_postgres(&certs);

        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&other_ca, self::ca("Some other CA").pem()).unwrap();

        let port = free_port();
        let mut opts = EmbeddedOptions::new(dir.path().join("pg"));
        opts.port = port;
        opts.extra_settings = [
            ("listen_addresses", listen.to_owned()),
            ("ssl", "on".to_owned()),
            ("ssl_cert_file", certs.join("server.crt").display().to_string()),
            ("ssl_key_file", certs.join("server.key").display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if trust_from.is_some() {
            opts.extra_settings.push(("hba_file".into(), certs.join("pg_hba.conf").display().to_string()));
        }
        let pg = PgGuard(launch(&opts).expect("start PostgreSQL with TLS"));
        pg.ensure_databases(&dbs.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        TlsServer { pg, port, ca: ca_file, other_ca, _dir: dir }
    }

    /// `postgresql://postgres@HOST:PORT/DB?QUERY`.
    pub fn url(&self, host: &str, db: &str, query: &str) -> String {
        format!("postgresql://postgres@{host}:{}/{db}?{query}", self.port)
    }

    /// The node's connections to this server: (encrypted, plain, TLS versions in use).
    pub async fn node_connections(&self) -> (i64, i64, Vec<String>) {
        let (client, conn) = tokio_postgres::connect(&self.pg.url("postgres"), tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE ssl), count(*) FILTER (WHERE NOT ssl), \
                        coalesce(array_agg(DISTINCT version) FILTER (WHERE ssl), '{}') \
                 FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'cosmicsync'",
                &[],
            )
            .await
            .unwrap();
        drop(client);
        let _ = conn.await;
        (row.get(0), row.get(1), row.get(2))
    }
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// As root the server runs as `postgres`, which must own its key (PostgreSQL refuses a
/// key others can read, and root's 0600 file is unreadable to it).
fn give_to_postgres(path: &Path) {
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let out = Command::new("chown").arg("-R").arg("postgres:").arg(path).output().expect("run chown");
    assert!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Ok when the PostgreSQL server binaries are installed; else why not.
pub fn pg_installed() -> Result<(), String> {
    EmbeddedPostgres::find_bin_dir(None)
        .map(|_| ())
        .map_err(|_| "PostgreSQL server binaries not found (install the postgresql package)".to_owned())
}
