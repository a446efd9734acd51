//! HttpActor: owns the actix-web HTTPS server (REST + WebSocket) — its lifecycle.
//!
//! Boot code binds the listener and builds the server (so a bad address fails the start
//! at once); this actor runs it and stops it gracefully on `StopServer`, letting
//! in-flight requests finish. Handlers live in `crate::api`; this actor does no request
//! work itself.

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle};
use slog_scope::{error, info};

/// The actor.
pub struct HttpActor {
    server: Option<Server>,
    handle: Option<ServerHandle>,
}

impl HttpActor {
    /// Wraps a built, not yet running server.
    pub fn new(server: Server) -> Self {
        let handle = server.handle();
        Self { server: Some(server), handle: Some(handle) }
    }
}

impl Actor for HttpActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        if let Some(server) = self.server.take() {
            actix_web::rt::spawn(async move {
                if let Err(e) = server.await {
                    error!("HTTP server failed"; "error" => %e);
                }
            });
        }
    }
}

/// Stops the server gracefully (in-flight requests finish).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopServer;

impl Handler<StopServer> for HttpActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: StopServer, _: &mut Self::Context) -> Self::Result {
        let handle = self.handle.take();
        Box::pin(async move {
            if let Some(handle) = handle {
                handle.stop(true).await;
                info!("HTTP server stopped");
            }
        })
    }
}
