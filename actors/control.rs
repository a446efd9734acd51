//! ControlActor: serves the CLI's local channel (`crate::control`) on the node's Unix
//! socket.
//!
//! Each connection carries one request line and gets one response line; the request is
//! translated into the same actor messages the REST API uses, with the same error
//! statuses. Who may connect is decided by the socket's file mode (see `crate::control`),
//! so this actor must never bind the socket itself or loosen its mode, never hand out
//! data the public REST views would not (a user's email, a password hash), and never
//! let one slow or hostile client hold up the others or the actor.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::time::Duration;

use actix::prelude::*;
use actix_web::ResponseError;
use serde::Serialize;
use slog_scope::{debug, error, info, warn};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::actors::keys::{GetKeyStatus, KeyActor, Rotate};
use crate::actors::peer::{FindPeer, GetNetwork, PeerActor};
use crate::actors::recommend::{GetRecommendStatus, RecommendActor, StartRun};
use crate::actors::shard::{GetProfile, GetProject, GetUser};
use crate::actors::shards::Shards;
use crate::actors::supervisor::{GetStatus, NodeSupervisor, Shutdown};
use crate::actors::sync::{GetSyncStatus, SyncActor};
use crate::control::{MAX_LINE_BYTES, Request, Response, decode_request, encode_response};
use crate::problem::ApiError;

/// How long a client may take to send its request line: a connection that sends
/// nothing must not hold a task forever.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long writing the answer may take before the client is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The actor.
pub struct ControlActor {
    listener: Option<StdUnixListener>,
    handler: RequestHandler,
}

impl ControlActor {
    /// Serves `listener` (bound by `crate::control::bind`) once started.
    pub fn new(
        listener: StdUnixListener,
        supervisor: Addr<NodeSupervisor>,
        shards: Shards,
        keys: Addr<KeyActor>,
        peer: Addr<PeerActor>,
        recommender: Addr<RecommendActor>,
        sync: Addr<SyncActor>,
    ) -> Self {
        let handler = RequestHandler { supervisor, shards, keys, peer, recommender, sync };
        Self { listener: Some(listener), handler }
    }
}

impl Actor for ControlActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(listener) = self.listener.take() else { return };
        let listener = match listener.set_nonblocking(true).and_then(|()| UnixListener::from_std(listener)) {
            Ok(l) => l,
            Err(e) => {
                error!("cannot serve the control socket; `cosmicsync stop` and `status` will not work"; "error" => %e);
                ctx.stop();
                return;
            }
        };
        info!("control socket ready");
        // The accept loop lives as long as the actor; each connection gets its own task.
        let handler = self.handler.clone();
        ctx.spawn(accept_loop(listener, handler).into_actor(self));
    }
}

async fn accept_loop(listener: UnixListener, handler: RequestHandler) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                actix::spawn(serve(stream, handler.clone()));
            }
            Err(e) => {
                warn!("control socket: accept failed"; "error" => %e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Answers one connection: one request line in, one response line out.
async fn serve(stream: UnixStream, handler: RequestHandler) {
    let (read, mut write) = stream.into_split();
    let request = match tokio::time::timeout(READ_TIMEOUT, read_line(read)).await {
        Err(_) => Err(Response::error(408, "no request line received in time")),
        Ok(Err(e)) => {
            debug!("control socket: read failed"; "error" => %e);
            return;
        }
        // A probe (connect and close, as `control::bind` does) is not an error.
        Ok(Ok(None)) => return,
        Ok(Ok(Some(line))) => decode_request(&line),
    };
    let stop = matches!(request, Ok(Request::Stop));
    let response = match request {
        Ok(request) => handler.answer(request).await,
        Err(response) => response,
    };
    let line = encode_response(&response);
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&line).await?;
        write.shutdown().await
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("control socket: write failed"; "error" => %e),
        Err(_) => debug!("control socket: client did not take the answer in time"),
    }
    // Stop is answered first and done after, so the client always hears back.
    if stop {
        info!("stop requested over the control socket");
        handler.supervisor.do_send(Shutdown);
    }
}

/// Reads up to and including the first newline, at most `MAX_LINE_BYTES` (+1, so an
/// overlong line is seen as such by the decoder). `None` when the peer sent nothing.
async fn read_line(read: tokio::net::unix::OwnedReadHalf) -> std::io::Result<Option<Vec<u8>>> {
    let mut reader = BufReader::new(read.take(MAX_LINE_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    Ok((!line.is_empty()).then_some(line))
}

/// Translates requests into actor messages.
#[derive(Clone)]
struct RequestHandler {
    supervisor: Addr<NodeSupervisor>,
    shards: Shards,
    keys: Addr<KeyActor>,
    recommender: Addr<RecommendActor>,
    peer: Addr<PeerActor>,
    sync: Addr<SyncActor>,
}

impl RequestHandler {
    async fn answer(&self, request: Request) -> Response {
        match self.dispatch(request).await {
            Ok(data) => Response::Ok { data },
            Err(e) => {
                // The client only sees "internal error"; the cause belongs in the log.
                if let ApiError::Internal(cause) = &e {
                    error!("control request failed"; "cause" => cause.as_str());
                }
                Response::error(e.status_code().as_u16(), e.to_string())
            }
        }
    }

    async fn dispatch(&self, request: Request) -> Result<serde_json::Value, ApiError> {
        match request {
            Request::Status | Request::NetworkStatus => json(self.supervisor.send(GetStatus).await?),
            Request::Stop => Ok(serde_json::json!({ "stopping": true, "pid": std::process::id() })),
            Request::GetUser { id } => json(self.shards.ask_for(&id, GetUser { id }).await?.view(None)),
            Request::GetProfile { id } => json(self.shards.ask_for(&id, GetProfile { id }).await?),
            Request::GetProject { id } => json(self.shards.ask_for(&id, GetProject { id }).await?),
            Request::ListProjects { creator, limit, cursor } => {
                json(crate::api::projects::list_page(&self.shards, creator, cursor, limit).await?)
            }
            Request::KeysRotate => json(self.keys.send(Rotate).await??),
            Request::KeysStatus => json(self.keys.send(GetKeyStatus).await??),
            Request::RecommendRun => {
                let generation = self.recommender.send(StartRun).await?;
                Ok(serde_json::json!({ "generation": generation }))
            }
            Request::RecommendStatus => json(self.recommender.send(GetRecommendStatus).await?),
            Request::NetworkPeers => json(self.peer.send(GetNetwork).await??.peers),
            Request::SyncStatus => json(self.sync.send(GetSyncStatus).await?),
            Request::FindPeer { peer_id } => {
                let peer_id = peer_id
                    .trim()
                    .parse()
                    .map_err(|e| ApiError::BadRequest(format!("{peer_id:?} is not a peer id: {e}")))?;
                json(self.peer.send(FindPeer(peer_id)).await??)
            }
        }
    }
}

fn json(value: impl Serialize) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::Internal(format!("cannot encode an answer: {e}")))
}
