//! Embedded PostgreSQL: the node's own cluster, living under its data directory.
//!
//! A node stores its shards in a PostgreSQL cluster it runs itself by default, so a
//! fresh machine needs nothing but the PostgreSQL binaries. This module creates that
//! cluster (`initdb`), starts it listening only on a Unix socket inside the cluster
//! directory, reuses a server a crashed node left running, creates databases, and
//! stops and restarts the server. It is synchronous (`std::process::Command`) because
//! it runs at boot before the actor system, and from integration tests.
//!
//! What it must never do:
//! - run `initdb` over a directory that already holds a cluster, or delete anything in it
//!   (not even a stale `postmaster.pid`: guessing wrong lets two servers share one cluster);
//! - stop a server implicitly (no `Drop`): the node stops it on shutdown, tests call
//!   [`EmbeddedPostgres::stop`]; a node that crashes leaves it running for the next boot;
//! - open a TCP listener (`listen_addresses=''`) unless the caller asks for one through
//!   `extra_settings` (tests do, to serve shards over TLS), or loosen the socket's 0700 mode;
//! - change permissions above the node's data directory: when running as root it adds
//!   `o+x` to the cluster directory's direct parent only, and reports anything higher.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `sizeof(sockaddr_un.sun_path)` is 108 on Linux and PostgreSQL needs the trailing NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// The database superuser `initdb -U` creates; connections use it over the trusted socket.
const SUPERUSER: &str = "postgres";
/// The OS account PostgreSQL runs as when we are root (PostgreSQL refuses to run as root).
const OS_USER: &str = "postgres";
/// PostgreSQL truncates longer identifiers silently, which would defeat the existence check.
const MAX_IDENT_BYTES: usize = 63;
/// Long enough for crash recovery of a node that died under load.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const READY_POLL: Duration = Duration::from_millis(50);
/// An init reaps orphans in milliseconds; much longer means nobody will.
const REAP_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 30;
/// PostgreSQL's complaint when a crashed server's children still hold its shared memory;
/// the cluster's lc_messages is C, so the text is stable.
const SHMEM_IN_USE: &str = "pre-existing shared memory block";
/// Tools the module runs; a directory missing any of them is not a usable installation.
const REQUIRED_TOOLS: [&str; 5] = ["initdb", "pg_ctl", "postgres", "psql", "pg_isready"];
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// How to run the node's cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Cluster directory, e.g. `<data-dir>/pg`; created if missing. Also holds the socket.
    pub dir: PathBuf,
    /// Directory with `initdb`, `pg_ctl`, …; `None` searches like [`EmbeddedPostgres::find_bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// Also used for `max_prepared_transactions`, so every connection can hold a prepared transaction.
    pub max_connections: u32,
    /// Names the socket file `.s.PGSQL.<port>` (and the TCP port, if `extra_settings` opens one).
    pub port: u16,
    /// Server settings passed as `-c name=value` after the defaults, so they win (e.g.
    /// `listen_addresses`, `ssl`). Empty for a node; tests use it for a TCP server with TLS.
    pub extra_settings: Vec<(String, String)>,
}

impl EmbeddedOptions {
    /// Options with the defaults a node uses: 200 connections, socket `.s.PGSQL.5432`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), bin_dir: None, max_connections: 200, port: 5432, extra_settings: Vec::new() }
    }
}

/// Everything that can go wrong; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL server binaries ({tools}) not found; looked in: {searched}. \
         Install the Debian package `postgresql` (apt-get install postgresql) \
         or point bin_dir at a directory holding them",
        tools = REQUIRED_TOOLS.join(", ")
    )]
    BinariesNotFound { searched: String },

    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },

    #[error("cluster directory {} cannot be used: {reason}", path.display())]
    UnusablePath { path: PathBuf, reason: String },

    #[error(
        "Unix socket path {} is {len} bytes but Unix sockets allow at most {max}; \
         use a shorter --data-dir",
        path.display(),
        max = MAX_SOCKET_PATH_BYTES
    )]
    SocketPathTooLong { path: PathBuf, len: usize },

    #[error(
        "running as root but there is no `{OS_USER}` user to run PostgreSQL as \
         (PostgreSQL refuses to run as root); install the Debian package `postgresql`, \
         which creates it, or create the user"
    )]
    NoPostgresUser,

    #[error(
        "the `{OS_USER}` user cannot traverse {} (mode {mode:o}), an ancestor of the cluster \
         directory {}; run `chmod o+x {}` or choose a --data-dir the `{OS_USER}` user can reach",
        path.display(),
        dir.display(),
        path.display()
    )]
    NotTraversable { path: PathBuf, mode: u32, dir: PathBuf },

    #[error(
        "the cluster in {} was created by PostgreSQL {data_version} but the binaries in {} \
         are PostgreSQL {bin_version}; install PostgreSQL {data_version} or point bin_dir at it",
        dir.display(),
        bin_dir.display()
    )]
    VersionMismatch { dir: PathBuf, data_version: String, bin_dir: PathBuf, bin_version: String },

    #[error("initdb failed for {} ({status}):\n{stderr}", dir.display())]
    InitdbFailed { dir: PathBuf, status: String, stderr: String },

    #[error(
        "PostgreSQL failed to start on {}: {detail}\n--- last lines of {} ---\n{log_tail}",
        dir.display(),
        log.display()
    )]
    StartFailed { dir: PathBuf, detail: String, log: PathBuf, log_tail: String },

    #[error(
        "a PostgreSQL server is already running on {} but {detail}; stop it \
         (pg_ctl -D {} stop -m fast) or start with matching settings",
        dir.display(),
        dir.display()
    )]
    RunningWithOtherSettings { dir: PathBuf, detail: String },

    #[error(
        "PostgreSQL on {} did not accept connections within {waited:?}\n--- last lines of {} ---\n{log_tail}",
        dir.display(),
        log.display()
    )]
    NotReady { dir: PathBuf, waited: Duration, log: PathBuf, log_tail: String },

    #[error("invalid database name {name:?}: {reason}")]
    InvalidDatabaseName { name: String, reason: &'static str },

    #[error("creating databases {names:?} failed ({status}):\n{stderr}")]
    CreateDatabasesFailed { names: Vec<String>, status: String, stderr: String },

    #[error("stopping PostgreSQL on {} failed ({status}):\n{stderr}", dir.display())]
    StopFailed { dir: PathBuf, status: String, stderr: String },

    #[error("{program} failed ({status}):\n{output}")]
    CommandFailed { program: String, status: String, output: String },
}

/// The account PostgreSQL runs as when the node runs as root.
#[derive(Debug, Clone)]
struct PgUser {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// A running cluster. Not stopped on drop: see the module documentation.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    max_connections: u32,
    /// Appended to the server's options (see [`EmbeddedOptions::extra_settings`]).
    extra_settings: Vec<(String, String)>,
    /// `Some` when we are root and must drop to the `postgres` account.
    run_as: Option<PgUser>,
    reused: bool,
}

impl EmbeddedPostgres {
    /// Finds a directory holding the PostgreSQL server binaries.
    ///
    /// An override is used as given or rejected (falling back would silently run other
    /// binaries than the operator asked for); otherwise `pg_config --bindir`, then the
    /// newest `/usr/lib/postgresql/*/bin`.
    pub fn find_bin_dir(override_dir: Option<&Path>) -> Result<PathBuf, PgError> {
        if let Some(dir) = override_dir {
            if has_server_binaries(dir) {
                return Ok(dir.to_path_buf());
            }
            return Err(PgError::BinariesNotFound { searched: format!("{} (given explicitly)", dir.display()) });
        }

        let mut searched = Vec::new();
        // pg_config may come from libpq-dev alone, whose bindir lacks the server: check it.
        match Command::new("pg_config").arg("--bindir").output() {
            Ok(out) if out.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_server_binaries(&dir) {
                    return Ok(dir);
                }
                searched.push(format!("{} (from pg_config --bindir)", dir.display()));
            }
            _ => searched.push("pg_config --bindir (no usable pg_config)".to_owned()),
        }

        let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(DEBIAN_PG_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = parse_version(&entry.file_name().to_string_lossy())?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        versions.sort_by(|a, b| b.0.cmp(&a.0));
        if let Some((_, dir)) = versions.into_iter().find(|(_, d)| has_server_binaries(d)) {
            return Ok(dir);
        }
        searched.push(format!("{DEBIAN_PG_ROOT}/*/bin"));
        Err(PgError::BinariesNotFound { searched: searched.join(", ") })
    }

    /// Creates the cluster if the directory holds none yet, then starts it, or reuses a
    /// server already running on it (e.g. left by a crashed node). Returns once the
    /// server accepts connections.
    ///
    /// A reused server keeps the `max_connections` it was started with; one running with
    /// another port or socket directory is an error rather than silently unreachable.
    pub fn start(opts: &EmbeddedOptions) -> Result<Self, PgError> {
        fs::create_dir_all(&opts.dir).map_err(io_err("cannot create", &opts.dir))?;
        // pg_ctl passes -D to a postmaster that chdirs into it, so the path must be absolute.
        let dir = fs::canonicalize(&opts.dir).map_err(io_err("cannot resolve", &opts.dir))?;
        check_path_is_usable(&dir)?;
        check_socket_path(&dir, opts.port)?;

        let data_version = read_pg_version(&dir)?;
        let bin_dir = choose_bin_dir(opts.bin_dir.as_deref(), data_version.as_deref())?;
        let run_as = if is_root() {
            let user = lookup_user(OS_USER)?.ok_or(PgError::NoPostgresUser)?;
            hand_over_to(&dir, &user)?;
            Some(user)
        } else {
            None
        };

        let mut pg = EmbeddedPostgres {
            dir,
            bin_dir,
            port: opts.port,
            max_connections: opts.max_connections,
            extra_settings: opts.extra_settings.clone(),
            run_as,
            reused: false,
        };
        match data_version {
            Some(version) => pg.check_version(&version)?,
            None => pg.initdb()?,
        }
        // A server found running may still die under us (it was crashing): then start anew.
        pg.reused = pg.is_running()? && pg.wait_ready()? == Readiness::Ready;
        if !pg.reused {
            pg.pg_ctl_start()?;
        }
        Ok(pg)
    }

    /// True if the server was already running when [`start`](Self::start) was called.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Directory holding the socket `.s.PGSQL.<port>`; the cluster directory itself.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster (data) directory, canonicalised.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The directory the PostgreSQL tools are run from (e.g. for `pgbench`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server log `pg_ctl` appends to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL for database `db` as user `postgres` over the Unix socket, in the form both
    /// `tokio_postgres::Config::from_str` and libpq accept (socket path percent-encoded).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@{}:{}/{}",
            percent_encode(self.dir.as_os_str().as_bytes()),
            self.port,
            percent_encode(db.as_bytes())
        )
    }

    /// Creates each database that does not exist yet. Idempotent.
    pub fn ensure_databases(&self, names: &[String]) -> Result<(), PgError> {
        for name in names {
            validate_db_name(name)?;
        }
        if names.is_empty() {
            return Ok(());
        }
        // \gexec skips names that exist, so the whole script is idempotent; names reach the
        // server as psql variables quoted by psql (:'v') and format(%I), never spliced raw.
        let mut script = String::from("\\set ON_ERROR_STOP on\n");
        for i in 0..names.len() {
            script.push_str(&format!(
                "SELECT format('CREATE DATABASE %I', :'db{i}') \
                 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db{i}') \\gexec\n"
            ));
        }
        // Two processes creating the same database race between check and CREATE; the
        // loser's retry then sees it exists.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cmd = self.tool("psql");
            cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-f", "-"]);
            self.add_conn_args(&mut cmd);
            for (i, name) in names.iter().enumerate() {
                cmd.arg("-v").arg(format!("db{i}={name}"));
            }
            let out = run_with_stdin(cmd, "psql", script.as_bytes())?;
            if out.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let raced = stderr.contains("already exists") || stderr.contains("duplicate key");
            if !raced || attempt >= 3 {
                return Err(PgError::CreateDatabasesFailed {
                    names: names.to_vec(),
                    status: out.status.to_string(),
                    stderr,
                });
            }
        }
    }

    /// The names of the databases the cluster holds (templates left out).
    pub fn databases(&self) -> Result<Vec<String>, PgError> {
        let mut cmd = self.tool("psql");
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-d",
            "postgres",
            "-c",
            "SELECT datname FROM pg_database WHERE NOT datistemplate",
        ]);
        self.add_conn_args(&mut cmd);
        let out = run(cmd, "psql")?;
        if !out.status.success() {
            return Err(PgError::CommandFailed {
                program: "psql (list databases)".into(),
                status: out.status.to_string(),
                output: combined_output(&out),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(Into::into)
            .collect())
    }

    /// Stops the server (`pg_ctl stop -m fast -w`). Idempotent.
    pub fn stop(&self) -> Result<(), PgError> {
        if !self.is_running()? {
            return Ok(());
        }
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D")
            .arg(&self.dir)
            .args(["-m", "fast", "-w", "-t"])
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("stop");
        let out = run(cmd, "pg_ctl stop")?;
        // Someone else (another stop, the server dying) may have won the race: that is fine.
        if out.status.success() || !self.is_running()? {
            return Ok(());
        }
        Err(PgError::StopFailed {
            dir: self.dir.clone(),
            status: out.status.to_string(),
            stderr: combined_output(&out),
        })
    }

    /// Starts the server again after [`stop`](Self::stop) with the original settings;
    /// does nothing but wait for readiness if it is running.
    pub fn restart(&self) -> Result<(), PgError> {
        if self.is_running()? && self.wait_ready()? == Readiness::Ready {
            return Ok(());
        }
        self.pg_ctl_start()
    }

    fn tool(&self, name: &str) -> Command {
        tool_command(&self.bin_dir, name, self.run_as.is_some(), &self.dir)
    }

    fn add_conn_args(&self, cmd: &mut Command) {
        cmd.arg("-h").arg(&self.dir).arg("-p").arg(self.port.to_string()).args(["-U", SUPERUSER]);
    }

    fn initdb(&self) -> Result<(), PgError> {
        let mut cmd = self.tool("initdb");
        cmd.arg("-D").arg(&self.dir).args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"]);
        let out = run(cmd, "initdb")?;
        if out.status.success() {
            return Ok(());
        }
        Err(PgError::InitdbFailed {
            dir: self.dir.clone(),
            status: out.status.to_string(),
            stderr: combined_output(&out),
        })
    }

    fn check_version(&self, data_version: &str) -> Result<(), PgError> {
        // --version is answered before pg_ctl's root check, so no need to switch user.
        let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
        cmd.arg("--version");
        let out = run(cmd, "pg_ctl --version")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bin_version = major_version(&text).unwrap_or_default();
        if out.status.success() && bin_version == data_version {
            return Ok(());
        }
        Err(PgError::VersionMismatch {
            dir: self.dir.clone(),
            data_version: data_version.to_owned(),
            bin_dir: self.bin_dir.clone(),
            bin_version: if bin_version.is_empty() { format!("unknown ({})", text.trim()) } else { bin_version },
        })
    }

    fn is_running(&self) -> Result<bool, PgError> {
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D").arg(&self.dir).arg("status");
        let out = run(cmd, "pg_ctl status")?;
        // pg_ctl documents 0 = running, 3 = not running; anything else is a real problem.
        match out.status.code() {
            // pg_ctl only asks kill(pid, 0), which also succeeds for a crashed postmaster
            // nobody has reaped yet; such a server will never answer.
            Some(0) => Ok(!matches!(self.postmaster_process(), Some(Process::Zombie))),
            Some(3) => Ok(false),
            _ => Err(PgError::CommandFailed {
                program: format!("pg_ctl status -D {}", self.dir.display()),
                status: out.status.to_string(),
                output: combined_output(&out),
            }),
        }
    }

    fn server_options(&self) -> String {
        // pg_ctl hands -o to /bin/sh, so the socket directory and settings are shell-quoted.
        let mut options = format!(
            "-k {} -p {} -c listen_addresses='' -c max_connections={n} \
             -c max_prepared_transactions={n} -c unix_socket_permissions=0700",
            shell_quote(&self.dir.to_string_lossy()),
            self.port,
            n = self.max_connections
        );
        // Later -c options win, so these override the defaults above.
        for (name, value) in &self.extra_settings {
            options.push_str(&format!(" -c {}", shell_quote(&format!("{name}={value}"))));
        }
        options
    }

    /// The state of the process `postmaster.pid` names, if the file and /proc tell us.
    fn postmaster_process(&self) -> Option<Process> {
        let pid = read_postmaster_pid(&self.dir).ok()??.pid?;
        Some(process_state(pid))
    }

    /// A crashed postmaster that is still a zombie makes the new one refuse to start
    /// ("lock file already exists"), so wait for it to be reaped.
    fn wait_until_old_postmaster_reaped(&self) -> Result<(), PgError> {
        let deadline = Instant::now() + REAP_TIMEOUT;
        loop {
            if !matches!(self.postmaster_process(), Some(Process::Zombie)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PgError::StartFailed {
                    dir: self.dir.clone(),
                    detail: format!(
                        "the previous server process named in postmaster.pid exited but was not \
                         reaped within {REAP_TIMEOUT:?}, so a new server would refuse to start; \
                         run the node under an init that reaps orphans (e.g. `docker run --init`)"
                    ),
                    log: self.log_path(),
                    log_tail: read_log_tail(&self.log_path()),
                });
            }
            std::thread::sleep(READY_POLL);
        }
    }

    fn pg_ctl_start(&self) -> Result<(), PgError> {
        self.wait_until_old_postmaster_reaped()?;
        let log = self.log_path();
        let deadline = Instant::now() + REAP_TIMEOUT;
        loop {
            let log_len = fs::metadata(&log).map_or(0, |m| m.len());
            let mut cmd = self.tool("pg_ctl");
            cmd.arg("-D")
                .arg(&self.dir)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t"])
                .arg(START_TIMEOUT.as_secs().to_string())
                .arg("-o")
                .arg(self.server_options())
                .arg("start");
            let out = run(cmd, "pg_ctl start")?;
            if out.status.success() {
                break;
            }
            // After a postmaster crash its children linger for a moment, still attached to
            // the old shared memory, and the new server refuses until they are gone.
            let children_linger = read_log_since(&log, log_len).contains(SHMEM_IN_USE);
            if !children_linger || Instant::now() >= deadline {
                return Err(PgError::StartFailed {
                    dir: self.dir.clone(),
                    detail: combined_output(&out),
                    log_tail: read_log_tail(&log),
                    log,
                });
            }
            std::thread::sleep(READY_POLL);
        }
        // pg_ctl -w trusts postmaster.pid; a real connection check also catches a socket
        // we cannot reach.
        match self.wait_ready()? {
            Readiness::Ready => Ok(()),
            Readiness::Died => Err(PgError::StartFailed {
                dir: self.dir.clone(),
                detail: "the server exited right after starting".to_owned(),
                log_tail: read_log_tail(&log),
                log,
            }),
        }
    }

    /// Polls until the server accepts connections on our socket, or is found dead. Fails
    /// early if it runs with another port or socket directory than ours.
    fn wait_ready(&self) -> Result<Readiness, PgError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let Some(pid_file) = read_postmaster_pid(&self.dir)? else {
                return Ok(Readiness::Died);
            };
            self.check_pid_file_settings(&pid_file)?;
            if let Some(pid) = pid_file.pid
                && matches!(process_state(pid), Process::Gone | Process::Zombie)
            {
                return Ok(Readiness::Died);
            }
            let mut cmd = self.tool("pg_isready");
            cmd.args(["-q", "-d", "postgres", "-t", "5"]);
            self.add_conn_args(&mut cmd);
            if run(cmd, "pg_isready")?.status.success() {
                return Ok(Readiness::Ready);
            }
            if Instant::now() >= deadline {
                return Err(PgError::NotReady {
                    dir: self.dir.clone(),
                    waited: START_TIMEOUT,
                    log: self.log_path(),
                    log_tail: read_log_tail(&self.log_path()),
                });
            }
            std::thread::sleep(READY_POLL);
        }
    }

    fn check_pid_file_settings(&self, pid: &PidFile) -> Result<(), PgError> {
        if let Some(port) = pid.port
            && port != self.port
        {
            return Err(PgError::RunningWithOtherSettings {
                dir: self.dir.clone(),
                detail: format!("with port {port}, not {}", self.port),
            });
        }
        if let Some(sock) = &pid.socket_dir {
            let sock = fs::canonicalize(sock).unwrap_or_else(|_| sock.clone());
            if sock != self.dir {
                return Err(PgError::RunningWithOtherSettings {
                    dir: self.dir.clone(),
                    detail: format!("with its socket in {}, not {}", sock.display(), self.dir.display()),
                });
            }
        }
        Ok(())
    }
}

/// The parts of `postmaster.pid` we check; empty lines (not written yet) are `None`.
#[derive(Debug)]
struct PidFile {
    pid: Option<libc::pid_t>,
    port: Option<u16>,
    socket_dir: Option<PathBuf>,
}

/// The pid of the server running on the cluster in `dir`, from its `postmaster.pid`
/// (none when the file is missing or not written yet).
pub fn postmaster_pid(dir: &Path) -> Option<u32> {
    read_postmaster_pid(dir).ok().flatten()?.pid.and_then(|pid| u32::try_from(pid).ok())
}

fn read_postmaster_pid(dir: &Path) -> Result<Option<PidFile>, PgError> {
    let path = dir.join("postmaster.pid");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("cannot read", &path)(e)),
    };
    // Layout from PostgreSQL's pidfile.h: line 4 is the port, line 5 the first socket dir.
    let lines: Vec<&str> = text.lines().collect();
    let field = |i: usize| lines.get(i).map(|s| s.trim()).filter(|s| !s.is_empty());
    Ok(Some(PidFile {
        // A standalone backend writes its pid negated; either way it names the owner.
        pid: field(0).and_then(|p| p.parse::<libc::pid_t>().ok()).map(|p| p.abs()),
        port: field(3).and_then(|p| p.parse().ok()),
        socket_dir: field(4).map(PathBuf::from),
    }))
}

#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    /// The server named in postmaster.pid is gone (crashed or stopped meanwhile).
    Died,
}

#[derive(Debug, PartialEq, Eq)]
enum Process {
    Gone,
    Zombie,
    Alive,
    /// No /proc to ask (not Linux): trust pg_ctl.
    Unknown,
}

fn process_state(pid: libc::pid_t) -> Process {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which may itself contain ") ".
        Ok(stat) => match stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()) {
            Some('Z') | Some('X') => Process::Zombie,
            Some(_) => Process::Alive,
            None => Process::Unknown,
        },
        Err(_) if !Path::new("/proc/self/stat").exists() => Process::Unknown,
        Err(_) => Process::Gone,
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PgError + 'a {
    move |source| PgError::Io { what, path: path.to_path_buf(), source }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn has_server_binaries(dir: &Path) -> bool {
    REQUIRED_TOOLS
        .iter()
        .all(|tool| fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// "15" → [15], "9.6" → [9, 6]; anything else is not a version directory.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// The major version as PG_VERSION spells it, from `pg_ctl (PostgreSQL) 15.18 (Debian …)`.
fn major_version(version_output: &str) -> Option<String> {
    let rest = version_output.split("(PostgreSQL)").nth(1)?.trim();
    let number = rest.split_whitespace().next()?;
    let parts: Vec<&str> = number.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).collect();
    let first: u32 = parts.first()?.parse().ok()?;
    // Since 10 the major version is one number; before it was two (9.6).
    if first >= 10 { Some(first.to_string()) } else { Some(format!("{first}.{}", parts.get(1)?)) }
}

fn read_pg_version(dir: &Path) -> Result<Option<String>, PgError> {
    let path = dir.join("PG_VERSION");
    match fs::read_to_string(&path) {
        Ok(v) => Ok(Some(v.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", &path)(e)),
    }
}

/// An existing cluster can only be run by its own major version, so on Debian prefer that
/// version's binaries over the newest installed ones.
fn choose_bin_dir(override_dir: Option<&Path>, data_version: Option<&str>) -> Result<PathBuf, PgError> {
    if override_dir.is_none()
        && let Some(version) = data_version
    {
        let dir = Path::new(DEBIAN_PG_ROOT).join(version).join("bin");
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
    }
    EmbeddedPostgres::find_bin_dir(override_dir)
}

fn check_path_is_usable(dir: &Path) -> Result<(), PgError> {
    let Some(text) = dir.to_str() else {
        return Err(PgError::UnusablePath {
            path: dir.to_path_buf(),
            reason: "the path is not valid UTF-8".to_owned(),
        });
    };
    // pg_ctl splices the path into a /bin/sh command inside double quotes, and the server
    // splits unix_socket_directories at commas: these characters would break either.
    if let Some(bad) = text.chars().find(|c| matches!(c, '"' | '$' | '`' | '\\' | ',' | '\n')) {
        return Err(PgError::UnusablePath {
            path: dir.to_path_buf(),
            reason: format!("it contains {bad:?}, which pg_ctl or PostgreSQL cannot quote"),
        });
    }
    Ok(())
}

fn check_socket_path(dir: &Path, port: u16) -> Result<(), PgError> {
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(PgError::SocketPathTooLong { path: socket, len });
    }
    Ok(())
}

fn lookup_user(name: &str) -> Result<Option<PgUser>, PgError> {
    let cname = CString::new(name).map_err(|_| PgError::NoPostgresUser)?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: passwd is plain data; all-zero is a valid (if meaningless) value that
        // getpwnam_r overwrites before we read it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and buf.len() is its real size;
        // the reentrant variant keeps concurrent callers (parallel tests) apart.
        let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(PgError::Io {
                what: "cannot look up user",
                path: PathBuf::from(name),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        let groups = group_list(&cname, pwd.pw_gid);
        return Ok(Some(PgUser { uid: pwd.pw_uid, gid: pwd.pw_gid, groups }));
    }
}

/// Every group the user is in, for the traversal check; falls back to the primary group.
fn group_list(name: &CString, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let mut capacity: libc::c_int = 32;
    while capacity <= 65536 {
        let mut groups: Vec<libc::gid_t> = vec![0; capacity as usize];
        let mut count = capacity;
        // SAFETY: groups holds `count` elements; getgrouplist writes at most that many and
        // reports the size it needs through `count` when they do not fit.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(usize::try_from(count).unwrap_or(0));
            return groups;
        }
        capacity = count.max(capacity * 2);
    }
    vec![gid]
}

fn can_traverse(meta: &fs::Metadata, user: &PgUser) -> bool {
    let mode = meta.mode();
    // POSIX picks exactly one class: owner, else group, else other.
    if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if user.groups.contains(&meta.gid()) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// Makes the cluster directory usable by the `postgres` account when we are root.
fn hand_over_to(dir: &Path, user: &PgUser) -> Result<(), PgError> {
    // Check everything before changing anything, so a refusal leaves no trace.
    let mut ancestors = dir.ancestors().skip(1);
    let parent = ancestors.next();
    for ancestor in ancestors {
        let meta = fs::metadata(ancestor).map_err(io_err("cannot inspect", ancestor))?;
        if !can_traverse(&meta, user) {
            return Err(PgError::NotTraversable {
                path: ancestor.to_path_buf(),
                mode: meta.mode() & 0o7777,
                dir: dir.to_path_buf(),
            });
        }
    }
    if let Some(parent) = parent {
        let meta = fs::metadata(parent).map_err(io_err("cannot inspect", parent))?;
        if !can_traverse(&meta, user) {
            // The node's own data dir (TempDir makes them 0700): o+x lets postgres pass
            // through without being able to list it.
            let mode = meta.mode() & 0o7777 | 0o001;
            fs::set_permissions(parent, fs::Permissions::from_mode(mode))
                .map_err(io_err("cannot add o+x to", parent))?;
        }
    }
    chown_tree(dir, user.uid, user.gid)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("cannot chmod 0700", dir))
}

fn chown_tree(path: &Path, uid: libc::uid_t, gid: libc::gid_t) -> Result<(), PgError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // A running server (reuse case) creates and removes files while we walk.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot inspect", path)(e)),
    };
    if meta.uid() != uid || meta.gid() != gid {
        match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot chown", path)(e)),
        }
    }
    if meta.is_dir() {
        let entries = match fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot list", path)(e)),
        };
        for entry in entries {
            match entry {
                Ok(entry) => chown_tree(&entry.path(), uid, gid)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot list", path)(e)),
            }
        }
    }
    Ok(())
}

fn validate_db_name(name: &str) -> Result<(), PgError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_IDENT_BYTES {
        "it is longer than 63 bytes, which PostgreSQL would truncate"
    } else if name.contains('\0') {
        "it contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(PgError::InvalidDatabaseName { name: name.to_owned(), reason })
}

/// A PostgreSQL tool, run as the `postgres` account when we are root.
fn tool_command(bin_dir: &Path, name: &str, as_postgres: bool, cwd: &Path) -> Command {
    let program = bin_dir.join(name);
    let mut cmd = if as_postgres {
        let mut c = Command::new(runuser_path());
        c.args(["-u", OS_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // The caller's PGHOST, PGDATABASE, … would redirect the tools to another server.
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"PG") {
            cmd.env_remove(key);
        }
    }
    // A cwd the postgres account cannot enter (e.g. /root) makes the tools complain.
    cmd.current_dir(cwd);
    cmd
}

fn runuser_path() -> &'static OsStr {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .map_or(OsStr::new("runuser"), OsStr::new)
}

fn run(mut cmd: Command, label: &str) -> Result<Output, PgError> {
    cmd.stdin(Stdio::null()).output().map_err(|source| PgError::Spawn { program: label.to_owned(), source })
}

fn run_with_stdin(mut cmd: Command, label: &str, input: &[u8]) -> Result<Output, PgError> {
    let spawn_err = |source| PgError::Spawn { program: label.to_owned(), source };
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A psql that dies early closes the pipe; its exit status then tells the story.
        if let Err(e) = stdin.write_all(input)
            && e.kind() != io::ErrorKind::BrokenPipe
        {
            return Err(spawn_err(e));
        }
    }
    child.wait_with_output().map_err(spawn_err)
}

fn combined_output(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    text
}

/// What the server log gained after byte `offset` (at most its last 64 KiB).
fn read_log_since(path: &Path, offset: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(offset.max(len.saturating_sub(64 * 1024))))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_default()
}

/// The last lines of the server log; it grows across restarts, so only its end is read.
fn read_log_tail(path: &Path) -> String {
    if !path.exists() {
        return format!("(no server log at {})", path.display());
    }
    let text = read_log_since(path, 0);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so '/', ':', '@' and
/// ',' in a socket path cannot be mistaken for URL structure.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use tokio_postgres::NoTls;
    use tokio_postgres::config::Host;

    /// Stops the cluster even when an assertion fails, so no server outlives its tempdir.
    /// Test-only on purpose: production code must never stop the server implicitly.
    struct StopOnDrop<'a>(&'a EmbeddedPostgres);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            if let Err(e) = self.0.stop() {
                eprintln!("cleanup: stopping {} failed: {e}", self.0.dir.display());
            }
        }
    }

    fn binaries_or_skip(test: &str) -> bool {
        match EmbeddedPostgres::find_bin_dir(None) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("SKIPPED {test}: {e}");
                false
            }
        }
    }

    fn fake(dir: &str, port: u16) -> EmbeddedPostgres {
        EmbeddedPostgres {
            dir: PathBuf::from(dir),
            bin_dir: PathBuf::from("/nonexistent"),
            port,
            max_connections: 10,
            extra_settings: Vec::new(),
            run_as: None,
            reused: false,
        }
    }

    async fn select_one(url: &str) -> Result<i32, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        let task = tokio::spawn(conn);
        let value: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
        drop(client);
        if let Ok(Err(e)) = task.await {
            return Err(e);
        }
        Ok(value)
    }

    #[test]
    fn url_round_trips_through_tokio_postgres() {
        let dir = "/tmp/odd dir/with:colon@at,comma/pg";
        let pg = fake(dir, 5433);
        let url = pg.url("db@é/x");
        let config = tokio_postgres::Config::from_str(&url).expect("url must parse");
        assert_eq!(config.get_hosts(), &[Host::Unix(PathBuf::from(dir))]);
        assert_eq!(config.get_ports(), &[5433]);
        assert_eq!(config.get_user(), Some("postgres"));
        assert_eq!(config.get_dbname(), Some("db@é/x"));
    }

    #[test]
    fn socket_path_too_long_is_reported_before_anything_runs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("d".repeat(120));
        let err = EmbeddedPostgres::start(&EmbeddedOptions::new(&dir)).expect_err("must refuse");
        assert!(matches!(err, PgError::SocketPathTooLong { len, .. } if len > 107), "{err}");
        assert!(err.to_string().contains("107"), "{err}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
    }

    #[test]
    fn explicit_bin_dir_without_binaries_is_rejected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = EmbeddedPostgres::find_bin_dir(Some(tmp.path())).expect_err("no binaries there");
        assert!(matches!(err, PgError::BinariesNotFound { .. }));
        assert!(err.to_string().contains("`postgresql`"), "{err}");
    }

    #[test]
    fn invalid_database_names_are_rejected_before_psql_runs() {
        let pg = fake("/nonexistent", 5432);
        for name in [String::new(), "x".repeat(64), "a\0b".to_owned()] {
            let err = pg.ensure_databases(&[name]).expect_err("must reject");
            assert!(matches!(err, PgError::InvalidDatabaseName { .. }), "{err}");
        }
        assert!(pg.ensure_databases(&[]).is_ok());
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("common"), None);
        assert_eq!(major_version("pg_ctl (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)").as_deref(), Some("15"));
        assert_eq!(major_version("pg_ctl (PostgreSQL) 9.6.24").as_deref(), Some("9.6"));
        assert_eq!(major_version("pg_ctl (PostgreSQL) 17devel").as_deref(), Some("17"));
    }

    #[test]
    fn server_options_quote_the_socket_dir_for_the_shell() {
        let pg = fake("/tmp/it's here", 6000);
        let opts = pg.server_options();
        assert!(opts.starts_with(r"-k '/tmp/it'\''s here' -p 6000 "), "{opts}");
        assert!(opts.contains("max_prepared_transactions=10"), "{opts}");
        let mut pg = pg;
        pg.extra_settings =
            vec![("listen_addresses".into(), "127.0.0.1".into()), ("ssl_cert_file".into(), "/a b".into())];
        let opts = pg.server_options();
        assert!(opts.ends_with(" -c 'listen_addresses=127.0.0.1' -c 'ssl_cert_file=/a b'"), "{opts}");
    }

    #[test]
    fn unquotable_paths_are_refused() {
        for bad in ["/tmp/a\"b", "/tmp/a$b", "/tmp/a,b"] {
            assert!(check_path_is_usable(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(check_path_is_usable(Path::new("/tmp/a b/it's")).is_ok());
    }

    #[tokio::test]
    async fn lifecycle_start_query_stop_reuse() {
        if !binaries_or_skip("lifecycle_start_query_stop_reuse") {
            return;
        }
        // The tempdir plays the node's data dir: 0700 like a real one may be.
        let data_dir = tempfile::tempdir().expect("tempdir");
        let opts = EmbeddedOptions { max_connections: 20, ..EmbeddedOptions::new(data_dir.path().join("pg")) };

        let t = Instant::now();
        let pg = EmbeddedPostgres::start(&opts).expect("first start");
        let _guard = StopOnDrop(&pg);
        eprintln!("initdb + start: {:?}", t.elapsed());
        assert!(!pg.reused());
        assert_eq!(pg.port(), 5432);
        assert!(pg.socket_dir().join(".s.PGSQL.5432").exists());
        assert!(pg.log_path().exists());

        if is_root() {
            let user = lookup_user(OS_USER).expect("lookup").expect("postgres user");
            let meta = fs::metadata(pg.data_dir()).expect("stat cluster");
            assert_eq!(meta.uid(), user.uid);
            assert_eq!(meta.mode() & 0o777, 0o700);
            let parent = fs::metadata(data_dir.path()).expect("stat parent");
            assert_ne!(parent.mode() & 0o001, 0, "o+x on the node's data dir");
        }

        let shards = vec!["shard_0".to_owned(), "Shard-1 odd".to_owned()];
        let t = Instant::now();
        pg.ensure_databases(&shards).expect("create databases");
        eprintln!("ensure_databases (create): {:?}", t.elapsed());
        pg.ensure_databases(&shards).expect("ensure_databases is idempotent");

        assert_eq!(select_one(&pg.url("shard_0")).await.expect("query shard_0"), 1);
        assert_eq!(select_one(&pg.url("Shard-1 odd")).await.expect("query shard 1"), 1);
        {
            let (client, conn) = tokio_postgres::connect(&pg.url("shard_0"), NoTls).await.expect("connect");
            let task = tokio::spawn(conn);
            client.batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)").await.expect("write");
            drop(client);
            task.await.expect("join").expect("connection");
        }

        // A second start on a running cluster (a node rebooting after a crash) reuses it…
        let again = EmbeddedPostgres::start(&opts).expect("start while running");
        assert!(again.reused());
        // …but not if it would listen somewhere the caller does not expect.
        let other_port = EmbeddedOptions { port: 5433, ..opts.clone() };
        let err = EmbeddedPostgres::start(&other_port).expect_err("port mismatch");
        assert!(matches!(err, PgError::RunningWithOtherSettings { .. }), "{err}");

        let t = Instant::now();
        pg.stop().expect("stop");
        eprintln!("stop: {:?}", t.elapsed());
        pg.stop().expect("stop is idempotent");
        assert!(select_one(&pg.url("shard_0")).await.is_err(), "server must be down");

        let t = Instant::now();
        let pg2 = EmbeddedPostgres::start(&opts).expect("start existing cluster");
        eprintln!("start existing cluster: {:?}", t.elapsed());
        assert!(!pg2.reused());
        let (client, conn) = tokio_postgres::connect(&pg2.url("shard_0"), NoTls).await.expect("connect after restart");
        let task = tokio::spawn(conn);
        let v: i32 = client.query_one("SELECT v FROM kept", &[]).await.expect("data survived").get(0);
        assert_eq!(v, 42);
        drop(client);
        task.await.expect("join").expect("connection");

        pg2.stop().expect("stop before restart");
        pg2.restart().expect("restart");
        assert_eq!(select_one(&pg2.url("shard_0")).await.expect("query after restart()"), 1);
        pg2.restart().expect("restart while running is a no-op");
        pg2.stop().expect("final stop");
    }

    #[tokio::test]
    async fn starts_again_after_the_server_crashed() {
        if !binaries_or_skip("starts_again_after_the_server_crashed") {
            return;
        }
        let data_dir = tempfile::tempdir().expect("tempdir");
        let opts = EmbeddedOptions { max_connections: 20, ..EmbeddedOptions::new(data_dir.path().join("pg")) };
        let pg = EmbeddedPostgres::start(&opts).expect("start");
        let _guard = StopOnDrop(&pg);
        pg.ensure_databases(&["survivor".to_owned()]).expect("create");

        let pid = read_postmaster_pid(pg.data_dir())
            .expect("read postmaster.pid")
            .and_then(|p| p.pid)
            .expect("postmaster pid");
        // SAFETY: plain syscall on a pid we just read from our own cluster's pid file.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill postmaster");
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_state(pid) == Process::Alive {
            assert!(Instant::now() < deadline, "postmaster {pid} survived SIGKILL");
            std::thread::yield_now();
        }

        let t = Instant::now();
        let pg2 = EmbeddedPostgres::start(&opts).expect("start after crash");
        eprintln!("start after crash: {:?}", t.elapsed());
        let _guard2 = StopOnDrop(&pg2);
        assert!(!pg2.reused(), "a dead server must not be reused");
        assert_eq!(select_one(&pg2.url("survivor")).await.expect("database survived"), 1);
        pg2.stop().expect("stop");
    }

    fn children_of(parent: libc::pid_t) -> Vec<libc::pid_t> {
        fs::read_dir("/proc")
            .expect("list /proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    // Field 4 (ppid) is the second field after the ")" ending the name.
                    stat.rsplit_once(") ").and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
                        == Some(parent)
                })
            })
            .collect()
    }

    #[test]
    fn start_waits_for_children_of_a_crashed_server_to_let_go() {
        if !binaries_or_skip("start_waits_for_children_of_a_crashed_server_to_let_go") {
            return;
        }
        let data_dir = tempfile::tempdir().expect("tempdir");
        let opts = EmbeddedOptions { max_connections: 20, ..EmbeddedOptions::new(data_dir.path().join("pg")) };
        let pg = EmbeddedPostgres::start(&opts).expect("start");
        let _guard = StopOnDrop(&pg);
        let pid = read_postmaster_pid(pg.data_dir())
            .expect("read postmaster.pid")
            .and_then(|p| p.pid)
            .expect("postmaster pid");
        let child = *children_of(pid).first().expect("postmaster has children");

        // A stopped child keeps the crashed server's shared memory attached, which is what
        // a slow-dying backend does in real life; it is let go once PostgreSQL complains.
        // SAFETY: plain syscalls on pids of our own cluster.
        unsafe {
            assert_eq!(libc::kill(child, libc::SIGSTOP), 0);
            assert_eq!(libc::kill(pid, libc::SIGKILL), 0);
        }
        let log = pg.log_path();
        let log_len = fs::metadata(&log).map_or(0, |m| m.len());
        let releaser = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !read_log_since(&log, log_len).contains(SHMEM_IN_USE) {
                if Instant::now() >= deadline {
                    // SAFETY: as above; never leave the child stopped.
                    unsafe { libc::kill(child, libc::SIGCONT) };
                    return false;
                }
                std::thread::yield_now();
            }
            // SAFETY: as above.
            unsafe { libc::kill(child, libc::SIGCONT) };
            true
        });

        let started = EmbeddedPostgres::start(&opts);
        let complained = releaser.join().expect("releaser thread");
        let pg2 = started.expect("start once the old children are gone");
        let _guard2 = StopOnDrop(&pg2);
        assert!(complained, "the retry path was not exercised");
        assert!(!pg2.reused());
        pg2.stop().expect("stop");
    }

    #[test]
    fn root_refuses_unreachable_ancestors_without_changing_them() {
        if !is_root() {
            eprintln!("SKIPPED root_refuses_unreachable_ancestors_without_changing_them: not root");
            return;
        }
        if !binaries_or_skip("root_refuses_unreachable_ancestors_without_changing_them") {
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod tmp");
        let locked = tmp.path().join("locked");
        let node = locked.join("node");
        fs::create_dir_all(&node).expect("mkdir");
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).expect("chmod locked");

        let err = EmbeddedPostgres::start(&EmbeddedOptions::new(node.join("pg"))).expect_err("locked");
        match &err {
            PgError::NotTraversable { path, .. } => assert_eq!(path, &locked),
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains("chmod o+x"), "{err}");
        let mode = fs::metadata(&locked).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o700, "higher ancestors are never chmodded");
    }
}
