//! The CLI's local channel to a running node: a Unix socket at `<data-dir>/control.sock`.
//!
//! **Authentication is the file mode.** The socket is created with mode 0600 inside a
//! private (0700) directory and only then linked into place, so from the moment anyone can
//! reach it only the node's own user (and root) can connect. There are no tokens: whoever
//! can connect may stop the node and read any user, profile or project (never a password
//! hash or an email — the node answers with the public views). Never widen the mode, and
//! never expose this protocol on a TCP port.
//!
//! Protocol: the client writes one JSON `Request` on one line (at most
//! `MAX_LINE_BYTES`), the node writes one JSON `Response` line and closes the connection.
//!
//! ```text
//! → {"op":"get_user","id":"0190c0de-…"}
//! ← {"result":"ok","data":{"id":"0190c0de-…","username":"ada",…}}
//! ← {"result":"error","status":404,"message":"user not found"}
//! ```
//!
//! This module holds the wire types, the codec, `bind` and a blocking client; the serving
//! side is `actors::control::ControlActor`. Nothing here may panic on what a peer sends.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The longest request or response line either side accepts, newline included.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// File name of the socket inside the data directory.
const SOCKET_NAME: &str = "control.sock";

/// What the CLI asks a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are ignored (serde's default), so a newer CLI that adds an optional
// field can still talk to an older node.
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The node's `StatusReport`.
    Status,
    /// Stop gracefully; the node answers `{"pid": …}` first, then shuts down.
    Stop,
    /// A user's public view (no email).
    GetUser { id: Uuid },
    /// A profile.
    GetProfile { id: Uuid },
    /// A live project.
    GetProject { id: Uuid },
    /// A page of live projects, newest first (as `GET /api/v1/projects`).
    ListProjects {
        #[serde(default)]
        creator: Option<Uuid>,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(default)]
        cursor: Option<String>,
    },
    /// The node's view of the network (the `StatusReport`, whose `network` part is the
    /// peer-to-peer status).
    NetworkStatus,
    /// Add a data key and re-seal every row with it (or continue an unfinished rotation);
    /// answers the `KeyStatus` at once, the re-sealing goes on in the background.
    KeysRotate,
    /// The data keys, rows under each, and the re-sealing pass.
    KeysStatus,
    /// Start a recommendation run, or join the one going on: `{"generation": …}`.
    RecommendRun,
    /// The recommendation batch's `RecommendStatus` (progress of a run, the last run).
    RecommendStatus,
    /// The connected peers (`Vec<PeerReport>`).
    NetworkPeers,
    /// A DHT lookup of a peer's addresses (`FoundPeer`).
    FindPeer { peer_id: String },
    /// The replication status (`SyncStatus`).
    SyncStatus,
}

/// What a node answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The request succeeded.
    Ok { data: serde_json::Value },
    /// The request failed; `status` is the HTTP status the REST API would give.
    Error { status: u16, message: String },
}

impl Response {
    /// An error response.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Response::Error { status, message: message.into() }
    }
}

/// Why the client could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No node listens on the socket (missing, or a stale file left by a crash).
    #[error("nothing answers on {0}")]
    NotRunning(PathBuf),
    /// The node did not answer in time.
    #[error("the node did not answer within {0:?}")]
    Timeout(Duration),
    /// The node answered something that is not a `Response`.
    #[error("the node sent an invalid answer: {0}")]
    Protocol(String),
    /// Any other I/O failure (e.g. permission denied: the socket belongs to another user).
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The control socket of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Decodes one request line (with or without its newline). Anything that is not a
/// well-formed request becomes the error response to send back.
pub fn decode_request(line: &[u8]) -> Result<Request, Response> {
    if line.len() > MAX_LINE_BYTES {
        return Err(Response::error(413, format!("request longer than {MAX_LINE_BYTES} bytes")));
    }
    let line = trim_newline(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::error(400, "empty request"));
    }
    serde_json::from_slice(line).map_err(|e| Response::error(400, format!("malformed request: {e}")))
}

/// Decodes one response line (with or without its newline).
pub fn decode_response(line: &[u8]) -> Result<Response, ControlError> {
    serde_json::from_slice(trim_newline(line)).map_err(|e| ControlError::Protocol(e.to_string()))
}

/// One request as a line, newline included.
pub fn encode_request(request: &Request) -> Vec<u8> {
    encode_line(request)
}

/// One response as a line, newline included. A body that cannot be serialised (it
/// cannot happen with `serde_json::Value`, but the caller must not have to care) becomes
/// a 500 error line.
pub fn encode_response(response: &Response) -> Vec<u8> {
    encode_line(response)
}

fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    // serde_json escapes control characters, so the encoded value never holds a newline.
    let mut line = serde_json::to_vec(value).unwrap_or_else(|e| {
        serde_json::to_vec(&Response::error(500, format!("cannot encode: {e}"))).unwrap_or_default()
    });
    line.push(b'\n');
    line
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Binds the control socket at `path` with mode 0600.
///
/// Fails with `AddrInUse` if a node answers on it (this is what keeps two nodes off one
/// data directory), removes a stale socket a crashed node left, and refuses to replace
/// anything that is not a socket. The socket is bound inside a private directory and
/// hard-linked into place, so it is never reachable with a wider mode, and a socket
/// another process linked in meanwhile is never overwritten.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    // Held until this function returns: two nodes starting at once cannot both decide
    // the socket is stale and replace each other's.
    let _lock = DirLock::acquire(&dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    ErrorKind::AddrInUse,
                    format!("another node is running on {} (its control socket answers)", dir.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; move it away", path.display()),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }

    // A short private name, so the temporary socket path is never longer than the final
    // one (socket paths are limited to about 107 bytes).
    let private = dir.join(format!(".c{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = bind_private(&private.join("c"), path);
    let _ = std::fs::remove_dir_all(&private);
    result
}

fn bind_private(temp: &Path, path: &Path) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(temp)?;
    std::fs::set_permissions(temp, std::fs::Permissions::from_mode(0o600))?;
    // The listener is bound to the inode, so it answers under the new name.
    std::fs::hard_link(temp, path)?;
    let mode = std::fs::symlink_metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        let _ = std::fs::remove_file(path);
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!("control socket {} has mode {:o}, not 0600", path.display(), mode & 0o777),
        ));
    }
    Ok(listener)
}

/// An exclusive `flock` on a directory, released on drop. (Locking the directory
/// itself leaves no lock file behind.)
struct DirLock(std::fs::File);

impl DirLock {
    fn acquire(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::io::AsRawFd;
        let file = std::fs::File::open(dir)?;
        // SAFETY: flock on a file descriptor we own; it has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirLock(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: as above; closing the file would release the lock anyway.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Sends one request to the node running on `data_dir` and waits at most `timeout`
/// (in total) for its answer.
pub fn request(data_dir: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let path = socket_path(data_dir);
    let io = |source: std::io::Error| ControlError::Io { path: path.clone(), source };
    let deadline = Instant::now() + timeout;
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Err(ControlError::NotRunning(path));
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_write_timeout(Some(remaining(deadline, timeout)?)).map_err(io)?;
    stream.write_all(&encode_request(request)).map_err(|e| timed_out(e, timeout).unwrap_or_else(io))?;

    let mut reader = BufReader::new(stream).take(MAX_LINE_BYTES as u64);
    let mut line = Vec::new();
    loop {
        reader.get_ref().get_ref().set_read_timeout(Some(remaining(deadline, timeout)?)).map_err(io)?;
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(timed_out(e, timeout).unwrap_or_else(io)),
        };
        if buf.is_empty() {
            break;
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&buf[..=end]);
                break;
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                reader.consume(n);
            }
        }
    }
    if !line.ends_with(b"\n") {
        let why = if line.len() >= MAX_LINE_BYTES { "answer too long" } else { "connection closed mid-answer" };
        return Err(ControlError::Protocol(why.into()));
    }
    decode_response(&line)
}

/// Time left until `deadline`, or `Timeout` if none is.
fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration, ControlError> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or(ControlError::Timeout(timeout))
}

/// A socket timeout shows up as `WouldBlock` or `TimedOut`, depending on the platform.
fn timed_out(e: std::io::Error, timeout: Duration) -> Result<ControlError, std::io::Error> {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Ok(ControlError::Timeout(timeout)),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One helper for the decoder: `input` must be rejected with `status`.
    fn check_rejected(input: &[u8], status: u16) {
        match decode_request(input) {
            Err(Response::Error { status: s, message }) => {
                assert_eq!(s, status, "{input:?}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{input:?} decoded as {other:?}"),
        }
    }

    #[test]
    fn every_request_round_trips() {
        let id = Uuid::now_v7();
        for req in [
            Request::Status,
            Request::Stop,
            Request::GetUser { id },
            Request::GetProfile { id },
            Request::GetProject { id },
            Request::ListProjects { creator: Some(id), limit: Some(5), cursor: Some("c".into()) },
            Request::ListProjects { creator: None, limit: None, cursor: None },
            Request::NetworkStatus,
            Request::RecommendRun,
            Request::RecommendStatus,
            Request::NetworkPeers,
            Request::FindPeer { peer_id: "12D3KooW".into() },
        ] {
            let line = encode_request(&req);
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            assert_eq!(decode_request(&line), Ok(req));
        }
    }

    #[test]
    fn wire_format_is_stable() {
        let id = Uuid::nil();
        assert_eq!(encode_request(&Request::Status), b"{\"op\":\"status\"}\n");
        assert_eq!(
            decode_request(format!("{{\"op\":\"get_user\",\"id\":\"{id}\"}}\r\n").as_bytes()),
            Ok(Request::GetUser { id })
        );
        assert_eq!(
            decode_request(b"{\"op\":\"list_projects\"}"),
            Ok(Request::ListProjects { creator: None, limit: None, cursor: None })
        );
        assert_eq!(decode_request(b"{\"op\":\"status\",\"since\":\"v2\"}"), Ok(Request::Status));
        let ok = Response::Ok { data: json!({"a": "line\nbreak"}) };
        let line = encode_response(&ok);
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "a newline in data stays escaped");
        assert_eq!(decode_response(&line).unwrap(), ok);
        assert_eq!(
            serde_json::to_value(Response::error(404, "user not found")).unwrap(),
            json!({"result": "error", "status": 404, "message": "user not found"})
        );
    }

    #[test]
    fn garbage_becomes_an_error_response() {
        for input in [
            &b""[..],
            b"\n",
            b"   \r\n",
            b"not json",
            b"{",
            b"[]",
            b"null",
            b"\xff\xfe\x00",
            b"{\"op\":\"launch_missiles\"}",
            b"{\"op\":\"get_user\"}",
            b"{\"op\":\"get_user\",\"id\":\"not-a-uuid\"}",
            b"{\"op\":\"get_user\",\"id\":42}",
            b"{\"op\":\"list_projects\",\"limit\":-1}",
            b"{\"op\":\"status\"}{\"op\":\"stop\"}",
        ] {
            check_rejected(input, 400);
        }
        check_rejected(&vec![b' '; MAX_LINE_BYTES + 1], 413);
    }

    #[test]
    fn garbage_answers_are_protocol_errors() {
        for input in [&b"garbage"[..], b"{\"result\":\"ok\"}", b"{\"result\":\"error\",\"status\":\"x\"}"] {
            assert!(matches!(decode_response(input), Err(ControlError::Protocol(_))), "{input:?}");
        }
    }

    #[test]
    fn bind_is_private_exclusive_and_replaces_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());

        let listener = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let err = bind(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");

        // A crashed node leaves the file behind with nobody listening.
        drop(listener);
        assert!(path.exists());
        let _listener = bind(&path).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".c"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn concurrent_binds_leave_exactly_one_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    bind(&path)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
        assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| e.kind() == ErrorKind::AddrInUse));
    }

    #[test]
    fn bind_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        std::fs::write(&path, "precious").unwrap();
        assert_eq!(bind(&path).unwrap_err().kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn client_reports_not_running_and_reads_one_answer() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(dir.path(), &Request::Status, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, ControlError::NotRunning(_)), "{err}");

        let listener = bind(&socket_path(dir.path())).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            BufReader::new(&stream).read_until(b'\n', &mut line).unwrap();
            let answer = match decode_request(&line) {
                Ok(Request::GetUser { id }) => Response::Ok { data: json!({ "id": id }) },
                Ok(_) => Response::error(400, "unexpected"),
                Err(e) => e,
            };
            (&stream).write_all(&encode_response(&answer)).unwrap();
            // A silent server: the client must give up on its own.
            let (_silent, _) = listener.accept().unwrap();
            let _ = listener.accept();
        });
        let id = Uuid::now_v7();
        let answer = request(dir.path(), &Request::GetUser { id }, Duration::from_secs(5)).unwrap();
        assert_eq!(answer, Response::Ok { data: json!({ "id": id }) });
        let err = request(dir.path(), &Request::Status, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ControlError::Timeout(_)), "{err}");
        // Let the server thread finish.
        let _ = UnixStream::connect(socket_path(dir.path()));
        server.join().unwrap();
    }
}
