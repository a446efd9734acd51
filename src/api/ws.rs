//! `GET /api/v1/ws`: the WebSocket that streams committed changes to clients.
//!
//! One session per connection, run as a task (`serve`) that `select!`s over the client's
//! frames, its EventHub subscription and its timers. The protocol, all JSON text frames:
//!
//! 1. authenticate: an `Authorization: Bearer <token>` header on the upgrade request, or
//!    (browsers cannot set headers) a first message `{"type":"auth","token":"..."}`
//!    within 10 s. The server answers `{"type":"ready","user_id":"...","expires_at":N}`.
//! 2. subscribe once: `{"type":"subscribe","topics":["projects","user:<uuid>"],"since":N}`
//!    (`since` optional: without it only live changes). The server answers
//!    `{"type":"subscribed","topics":[...],"seq":W}`, then `{"type":"change",...}` per
//!    change (the `ChangeEvent` fields flattened), with `{"type":"replay_complete",
//!    "seq":W}` between the history `(since, W]` and the live changes whenever `since` is
//!    given (also when there is no history to send). A `since` beyond every number the
//!    node has issued is refused with an error message, and nothing is subscribed.
//! 3. a bad message gets `{"type":"error","message":"..."}` and the connection stays.
//!
//! Close codes: 1008 for the client's faults (bad, missing or expired token, more than
//! 20 bad messages, a frame over 64 KiB, no heartbeat for 45 s, too slow to keep up);
//! 1013 for temporary conditions on the node (a shard down during replay, tokens not
//! checkable yet); 1000 in answer to the client's close. Every reason says what to do.
//!
//! It must never take a token from the URL (URLs end up in logs), log a token, panic on
//! anything a client sends, wait on a stalled client without a deadline, or keep its hub
//! subscription after the session ends (a guard unsubscribes on every exit path).

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError, Session};
use serde::{Deserialize, Serialize};
use slog_scope::{debug, info};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use uuid::Uuid;

use super::AppState;
use super::extract::bearer_token;
use crate::actors::auth::{AuthError, Caller};
use crate::actors::event_hub::{Ended, Filter, HubMessage, Subscribe, SubscriptionId, Unsubscribe};
use crate::model::ChangeEvent;
use crate::problem::ApiError;

/// How long a client has to authenticate by message.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the server pings.
const PING_EVERY: Duration = Duration::from_secs(15);
/// Silence (no pong, no message) after which the client is presumed gone. Also how long
/// one write may wait on a client that does not read.
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// How long the closing handshake may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest frame (and reassembled message) a client may send.
const MAX_FRAME: usize = 64 * 1024;
/// Bad messages tolerated before the connection is closed.
const MAX_BAD_MESSAGES: u32 = 20;

/// A message from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Auth {
        token: String,
    },
    Subscribe {
        topics: Vec<String>,
        #[serde(default)]
        since: Option<i64>,
    },
}

/// A message to the client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerMessage<'a> {
    Ready { user_id: Uuid, expires_at: i64 },
    Subscribed { topics: &'a [String], seq: i64 },
    Change(&'a ChangeEvent),
    ReplayComplete { seq: i64 },
    Error { message: &'a str },
}

/// How a session ends.
#[derive(Debug)]
enum Exit {
    /// Send a close frame with this code and reason.
    Close(CloseCode, String),
    /// The client is gone or stalled: nothing can be sent.
    Gone,
}

fn close(code: CloseCode, reason: impl Into<String>) -> Exit {
    Exit::Close(code, reason.into())
}

/// The WebSocket upgrade; the session then runs as its own task.
pub async fn ws_endpoint(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let header_auth = if req.headers().contains_key(actix_web::http::header::AUTHORIZATION) {
        Some(bearer_token(&req).ok_or("the Authorization header must be `Bearer <token>`"))
    } else {
        None
    };
    let (response, session, stream) = actix_ws::handle(&req, body).map_err(|e| {
        ApiError::BadRequest(format!("this endpoint expects a WebSocket upgrade (GET with Upgrade: websocket): {e}"))
    })?;
    let stream = stream.max_frame_size(MAX_FRAME).aggregate_continuations().max_continuation_size(MAX_FRAME);
    actix_web::rt::spawn(serve(session, stream, state, header_auth));
    Ok(response)
}

/// Runs one session to its end and closes it.
async fn serve(
    session: Session,
    mut stream: AggregatedMessageStream,
    state: web::Data<AppState>,
    header_auth: Option<Result<String, &'static str>>,
) {
    let mut conn = Conn { session, state, bad: 0, user: None, subscription: None };
    let exit = conn.run(&mut stream, header_auth).await;
    let user = conn.user.map(|u| u.to_string()).unwrap_or_default();
    // Unsubscribe before the (possibly slow) closing handshake.
    conn.subscription = None;
    match exit {
        Exit::Close(code, reason) => {
            info!("WebSocket closed"; "user_id" => &user, "code" => u16::from(code), "reason" => &reason);
            let reason = CloseReason { code, description: (!reason.is_empty()).then_some(reason) };
            let _ = timeout(CLOSE_TIMEOUT, conn.session.close(Some(reason))).await;
        }
        Exit::Gone => info!("WebSocket gone"; "user_id" => &user),
    }
}

/// Unsubscribes from the hub when dropped, whatever ends the session.
struct SubscriptionGuard {
    hub: actix::Addr<crate::actors::event_hub::EventHub>,
    id: SubscriptionId,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.hub.do_send(Unsubscribe(self.id));
    }
}

/// A live subscription.
struct Subscription {
    rx: mpsc::Receiver<HubMessage>,
    ended: oneshot::Receiver<Ended>,
    _guard: SubscriptionGuard,
    /// Every matching change up to here has been written to the client: where it should
    /// resume from if this connection is lost.
    position: i64,
}

struct Conn {
    session: Session,
    state: web::Data<AppState>,
    bad: u32,
    user: Option<Uuid>,
    subscription: Option<Subscription>,
}

impl Conn {
    async fn run(
        &mut self,
        stream: &mut AggregatedMessageStream,
        header_auth: Option<Result<String, &'static str>>,
    ) -> Exit {
        let caller = match header_auth {
            Some(Ok(token)) => self.authenticate(token).await,
            Some(Err(problem)) => Err(close(CloseCode::Policy, problem)),
            None => self.authenticate_by_message(stream).await,
        };
        let caller = match caller {
            Ok(caller) => caller,
            Err(exit) => return exit,
        };
        self.user = Some(caller.user_id);
        debug!("WebSocket authenticated"; "user_id" => %caller.user_id);
        match self.serve_authenticated(stream, caller).await {
            Ok(never) => match never {},
            Err(exit) => exit,
        }
    }

    /// Waits for `{"type":"auth"}` as the first message.
    async fn authenticate_by_message(&mut self, stream: &mut AggregatedMessageStream) -> Result<Caller, Exit> {
        let deadline = Instant::now() + AUTH_TIMEOUT;
        loop {
            let frame = tokio::select! {
                frame = stream.recv() => frame,
                _ = sleep_until(deadline) => return Err(close(
                    CloseCode::Policy,
                    r#"authentication timed out: send {"type":"auth","token":"..."} within 10 s"#,
                )),
            };
            match self.frame(frame).await? {
                None => continue,
                Some(text) => {
                    return match serde_json::from_str::<ClientMessage>(&text) {
                        Ok(ClientMessage::Auth { token }) => self.authenticate(token).await,
                        _ => Err(close(
                            CloseCode::Policy,
                            r#"authenticate first: send {"type":"auth","token":"..."} or an Authorization header"#,
                        )),
                    };
                }
            }
        }
    }

    async fn authenticate(&mut self, token: String) -> Result<Caller, Exit> {
        match self.state.tokens.verify(&token) {
            Ok(caller) => {
                self.send(&ServerMessage::Ready { user_id: caller.user_id, expires_at: caller.expires_at }).await?;
                Ok(caller)
            }
            Err(e @ AuthError::RevocationsNotLoaded) => Err(close(CloseCode::Again, format!("{e}; retry"))),
            Err(AuthError::Unauthorized(why)) => Err(close(CloseCode::Policy, why)),
            Err(_) => Err(close(CloseCode::Error, "the token could not be checked; retry")),
        }
    }

    /// The main loop once the caller is known; returns only how it ended.
    async fn serve_authenticated(
        &mut self,
        stream: &mut AggregatedMessageStream,
        caller: Caller,
    ) -> Result<std::convert::Infallible, Exit> {
        let expiry = sleep_until(token_deadline(caller.expires_at));
        tokio::pin!(expiry);
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        // After a long write, one ping is enough, not a burst of the missed ones.
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One timer for the session, pushed back by every frame (not a new one per event).
        let idle = sleep_until(Instant::now() + IDLE_TIMEOUT);
        tokio::pin!(idle);
        loop {
            // Biased: the expiry first; the client's frames before the heartbeat deadline
            // (a pong already received counts); changes last, so a flood of them never
            // starves the timers or the client.
            tokio::select! {
                biased;
                _ = &mut expiry => return Err(close(CloseCode::Policy, "token expired")),
                frame = stream.recv() => {
                    idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
                    if let Some(text) = self.frame(frame).await? {
                        self.on_text(&text, caller).await?;
                    }
                }
                _ = &mut idle => {
                    return Err(close(CloseCode::Policy, "heartbeat timeout: no pong or message for 45 s"));
                }
                _ = ping.tick() => self.control(None).await?,
                event = hub_event(&mut self.subscription) => match event {
                    HubEvent::Ended(ended) => {
                        let exit = self.ended(ended);
                        if let Exit::Close(CloseCode::Again, reason) = &exit {
                            // Say it as a message too, for clients that only read messages.
                            self.send(&ServerMessage::Error { message: reason }).await?;
                        }
                        return Err(exit);
                    }
                    HubEvent::Message(message) => self.on_hub(message).await?,
                },
            }
        }
    }

    /// Handles one client frame: control frames here, text returned to the caller.
    async fn frame(&mut self, frame: Option<Result<AggregatedMessage, ProtocolError>>) -> Result<Option<String>, Exit> {
        match frame {
            None => Err(Exit::Gone),
            Some(Ok(AggregatedMessage::Text(text))) => Ok(Some(text.to_string())),
            Some(Ok(AggregatedMessage::Binary(_))) => {
                self.bad_message("send JSON text messages, not binary").await?;
                Ok(None)
            }
            Some(Ok(AggregatedMessage::Ping(payload))) => {
                self.control(Some(&payload)).await?;
                Ok(None)
            }
            Some(Ok(AggregatedMessage::Pong(_))) => Ok(None),
            Some(Ok(AggregatedMessage::Close(_))) => Err(close(CloseCode::Normal, "")),
            Some(Err(ProtocolError::Overflow)) => Err(close(CloseCode::Policy, "frame larger than 64 KiB")),
            Some(Err(ProtocolError::Io(e))) if e.to_string().contains("continuation size") => {
                Err(close(CloseCode::Policy, "message larger than 64 KiB"))
            }
            Some(Err(e)) => Err(close(CloseCode::Protocol, format!("protocol error: {e}"))),
        }
    }

    async fn on_text(&mut self, text: &str, caller: Caller) -> Result<(), Exit> {
        let (topics, since) = match serde_json::from_str::<ClientMessage>(text) {
            Ok(ClientMessage::Subscribe { topics, since }) => (topics, since),
            Ok(ClientMessage::Auth { .. }) => return self.bad_message("already authenticated").await,
            Err(e) => return self.bad_message(&format!("invalid message: {e}")).await,
        };
        if self.subscription.is_some() {
            return self.bad_message("already subscribed; open another connection for other topics").await;
        }
        if since.is_some_and(|s| s < 0) {
            return self.bad_message("since must be a sequence number (0 or more)").await;
        }
        let filter = match Filter::parse(&topics) {
            Ok(filter) => filter,
            Err(e) => return self.bad_message(&e.to_string()).await,
        };
        let topics = filter.topics().to_vec();
        let (tx, rx) = mpsc::channel(self.state.ws_queue.max(1));
        let (ended_tx, ended) = oneshot::channel();
        let hub = self.state.hub.clone();
        let subscribe = Subscribe { filter, since, tx, ended: ended_tx, caller: caller.user_id };
        let reply = match hub.send(subscribe).await {
            Ok(Ok(reply)) => reply,
            // Not subscribed: the client may try again with another `since`.
            Ok(Err(refused)) => return self.bad_message(&refused.to_string()).await,
            Err(_) => return Err(close(CloseCode::Again, "the event hub is restarting; reconnect")),
        };
        self.subscription = Some(Subscription {
            rx,
            ended,
            _guard: SubscriptionGuard { hub, id: reply.id },
            position: since.unwrap_or(reply.seq),
        });
        self.send(&ServerMessage::Subscribed { topics: &topics, seq: reply.seq }).await
    }

    async fn on_hub(&mut self, message: Option<HubMessage>) -> Result<(), Exit> {
        match message {
            Some(HubMessage::Change(event)) => {
                self.send(&ServerMessage::Change(&event)).await?;
                self.set_position(event.seq);
                Ok(())
            }
            Some(HubMessage::ReplayComplete { seq }) => {
                self.send(&ServerMessage::ReplayComplete { seq }).await?;
                self.set_position(seq);
                Ok(())
            }
            // The hub always says why before it lets go of a subscriber (and `ended` is
            // polled first), so a bare end means the hub itself stopped.
            None => Err(self.ended(None)),
        }
    }

    fn set_position(&mut self, seq: i64) {
        if let Some(sub) = &mut self.subscription {
            sub.position = sub.position.max(seq);
        }
    }

    fn ended(&self, ended: Option<Ended>) -> Exit {
        let position = self.subscription.as_ref().map(|s| s.position).unwrap_or_default();
        match ended {
            Some(Ended::Lagged { limit }) => close(
                CloseCode::Policy,
                format!("client too slow: more than {limit} events behind; reconnect with since={position}"),
            ),
            Some(Ended::ReplayFailed { reason }) => close(CloseCode::Again, reason),
            None => close(CloseCode::Again, format!("the event hub stopped; reconnect with since={position}")),
        }
    }

    /// Answers a bad message with an error, or closes after too many.
    async fn bad_message(&mut self, message: &str) -> Result<(), Exit> {
        self.bad += 1;
        if self.bad > MAX_BAD_MESSAGES {
            return Err(close(CloseCode::Policy, format!("more than {MAX_BAD_MESSAGES} bad messages")));
        }
        self.send(&ServerMessage::Error { message }).await
    }

    async fn send(&mut self, message: &ServerMessage<'_>) -> Result<(), Exit> {
        let text = serde_json::to_string(message)
            .map_err(|e| close(CloseCode::Error, format!("cannot encode a message: {e}")))?;
        match timeout(IDLE_TIMEOUT, self.session.text(text)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Exit::Gone),
        }
    }

    /// A ping (`None`) or a pong, with the same deadline as any write.
    async fn control(&mut self, pong: Option<&[u8]>) -> Result<(), Exit> {
        let session = &mut self.session;
        let write = async move {
            match pong {
                Some(payload) => session.pong(payload).await,
                None => session.ping(b"").await,
            }
        };
        match timeout(IDLE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Exit::Gone),
        }
    }
}

/// When the token expires, as a timer deadline (clamped so no arithmetic can overflow).
fn token_deadline(expires_at: i64) -> Instant {
    const YEAR: i64 = 365 * 24 * 3600;
    let left = expires_at.saturating_sub(chrono::Utc::now().timestamp()).clamp(0, YEAR);
    Instant::now() + Duration::from_secs(left as u64)
}

/// What a subscription yields next.
enum HubEvent {
    /// The hub dropped the subscriber (`None`: the hub itself is gone).
    Ended(Option<Ended>),
    Message(Option<HubMessage>),
}

/// The next thing a subscription yields; pending while there is none. The end comes
/// first: once the hub has let go, the changes still queued are not worth sending.
async fn hub_event(subscription: &mut Option<Subscription>) -> HubEvent {
    match subscription {
        Some(sub) => tokio::select! {
            biased;
            ended = &mut sub.ended => HubEvent::Ended(ended.ok()),
            message = sub.rx.recv() => HubEvent::Message(message),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<ClientMessage, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn client_messages_parse_strictly() {
        assert!(matches!(parse(r#"{"type":"auth","token":"t"}"#), Ok(ClientMessage::Auth { token }) if token == "t"));
        assert!(matches!(
            parse(r#"{"type":"subscribe","topics":["all"],"since":7}"#),
            Ok(ClientMessage::Subscribe { since: Some(7), .. })
        ));
        assert!(matches!(
            parse(r#"{"type":"subscribe","topics":["all"]}"#),
            Ok(ClientMessage::Subscribe { since: None, .. })
        ));
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"type":"hello"}"#,
            r#"{"token":"t"}"#,
            r#"{"type":"auth"}"#,
            r#"{"type":"auth","token":"t","extra":1}"#,
            r#"{"type":"subscribe","topics":"all"}"#,
            r#"{"type":"subscribe","topics":["all"],"since":1.5}"#,
            r#"{"type":"subscribe","topics":["all"],"since":"1"}"#,
            r#"{"type":"subscribe","topics":["all"],"since":99999999999999999999}"#,
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn server_messages_have_the_documented_shape() {
        let event = ChangeEvent {
            seq: 5,
            origin: "n1".into(),
            origin_seq: 5,
            entity: crate::model::Entity::Project,
            op: crate::model::Op::Create,
            id: Uuid::nil(),
            owner_id: Uuid::nil(),
            vclock: Default::default(),
            data: json!({"name": "x"}),
            committed_at: crate::model::now(),
            conflicts: Vec::new(),
        };
        let change: serde_json::Value = serde_json::to_value(ServerMessage::Change(&event)).unwrap();
        assert_eq!(change["type"], "change");
        assert_eq!(change["seq"], 5);
        assert_eq!(change["entity"], "project");
        assert_eq!(change["op"], "create");
        assert_eq!(change["data"]["name"], "x");
        for key in ["origin", "origin_seq", "id", "owner_id", "vclock", "committed_at"] {
            assert!(change.get(key).is_some(), "change without {key}: {change}");
        }
        let topics = vec!["projects".to_owned()];
        assert_eq!(
            serde_json::to_value(ServerMessage::Subscribed { topics: &topics, seq: 3 }).unwrap(),
            json!({"type": "subscribed", "topics": ["projects"], "seq": 3})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::ReplayComplete { seq: 3 }).unwrap(),
            json!({"type": "replay_complete", "seq": 3})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::Error { message: "no" }).unwrap(),
            json!({"type": "error", "message": "no"})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::Ready { user_id: Uuid::nil(), expires_at: 9 }).unwrap(),
            json!({"type": "ready", "user_id": Uuid::nil(), "expires_at": 9})
        );
    }

    #[test]
    fn token_deadlines_never_overflow() {
        let now = Instant::now();
        assert!(token_deadline(i64::MIN) <= now + Duration::from_secs(1));
        assert!(token_deadline(i64::MAX) > now + Duration::from_secs(3600));
    }
}
