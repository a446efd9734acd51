//! AuthActor: password hashing and checking, access tokens (JWT), revocations.
//!
//! bcrypt runs on the blocking pool behind a semaphore sized to the machine, so a burst
//! of logins queues there and never stalls the actor threads serving other requests.
//! Tokens are HS256 JWTs (`sub`, `exp`, `iat`, `nbf`, `jti`) signed with a key from the
//! data directory. Revocations are persisted on the user's shard and held in memory in a
//! `TokenVerifier` that HTTP workers read directly (checking a token is a pure
//! computation on every request: a round trip to the actor would cost more than the
//! check); the actor is the verifier's only writer. A token of a user whose shard's
//! revocations are not loaded yet is refused with 503 rather than trusted. It must never
//! log or return a password, hash, token or key.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use slog_scope::{info, warn};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::actors::shard::{Revocations, RevokeToken};
use crate::actors::shards::Shards;
use crate::model::TokenResponse;
use crate::placement::Router;
use crate::problem::ApiError;

/// Seconds of clock skew tolerated when checking `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 5;

/// The claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: Uuid,
}

/// Who is calling: the verified subject of an access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    pub jti: Uuid,
    /// Unix seconds when the token expires.
    pub expires_at: i64,
}

/// Everything a login or hash needs, shared with the tasks doing the work.
struct Keys {
    encoding: EncodingKey,
    ttl_secs: u64,
    cost: u32,
    gate: Semaphore,
    /// A hash of a random password at the configured cost: checked when the username is
    /// unknown, so an unknown name costs the same work as a wrong password.
    decoy_hash: String,
}

/// Revocations as the verifier sees them.
#[derive(Default)]
struct RevocationSet {
    /// Revoked token ids and when each token expires (Unix seconds).
    jtis: HashMap<Uuid, i64>,
    /// Per shard: are its revocations loaded?
    loaded: Vec<bool>,
}

/// Checks access tokens; shared by every HTTP worker, written only by the AuthActor.
pub struct TokenVerifier {
    decoding: DecodingKey,
    validation: Validation,
    router: Router,
    revocations: RwLock<RevocationSet>,
}

impl TokenVerifier {
    fn new(secret: &[u8], shards: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iat", "nbf", "sub", "jti"]);
        Self {
            decoding: DecodingKey::from_secret(secret),
            validation,
            router: Router::new(shards as u32),
            revocations: RwLock::new(RevocationSet { jtis: HashMap::new(), loaded: vec![false; shards] }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RevocationSet> {
        self.revocations.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RevocationSet> {
        self.revocations.write().unwrap_or_else(|p| p.into_inner())
    }

    /// True once the revocations of every shard are loaded (tokens can be checked).
    pub fn is_ready(&self) -> bool {
        self.read().loaded.iter().all(|l| *l)
    }

    /// Verifies an access token: signature (HS256 only), time claims, revocation.
    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let invalid = || ApiError::Unauthorized("the access token is invalid or expired".into());
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            warn!("access token rejected"; "reason" => format!("{:?}", e.kind()));
            invalid()
        })?;
        let claims = data.claims;
        if claims.iat > Utc::now().timestamp() + LEEWAY_SECS as i64 {
            warn!("access token rejected"; "reason" => "issued in the future", "user_id" => %claims.sub);
            return Err(invalid());
        }
        let set = self.read();
        if !set.loaded.get(self.router.shard_of(&claims.sub)).copied().unwrap_or(false) {
            return Err(ApiError::Unavailable("token revocations for this user are not loaded yet".into()));
        }
        if set.jtis.contains_key(&claims.jti) {
            warn!("access token rejected"; "reason" => "revoked", "user_id" => %claims.sub);
            return Err(ApiError::Unauthorized("the access token has been revoked".into()));
        }
        Ok(Caller { user_id: claims.sub, jti: claims.jti, expires_at: claims.exp })
    }
}

/// The actor.
pub struct AuthActor {
    keys: Arc<Keys>,
    verifier: Arc<TokenVerifier>,
    shards: Shards,
    restarts: u32,
}

async fn bcrypt_work<T: Send + 'static>(keys: &Keys, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    let _permit = keys.gate.acquire().await.map_err(|_| ApiError::Internal("password gate closed".into()))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal(format!("password task failed: {e}")))
}

impl AuthActor {
    /// An auth actor signing with `secret` (at least 32 bytes).
    pub fn new(secret: &[u8], ttl_secs: u64, cost: u32, shards: Shards) -> Result<Self, bcrypt::BcryptError> {
        let mut decoy = [0u8; 24];
        rand::fill(&mut decoy);
        let decoy_hash = bcrypt::hash(hex::encode(decoy), cost)?;
        let workers = std::thread::available_parallelism().map(|n| n.get().div_ceil(2)).unwrap_or(1);
        Ok(Self {
            keys: Arc::new(Keys {
                encoding: EncodingKey::from_secret(secret),
                ttl_secs,
                cost,
                gate: Semaphore::new(workers),
                decoy_hash,
            }),
            verifier: Arc::new(TokenVerifier::new(secret, shards.len())),
            shards,
            restarts: 0,
        })
    }

    /// The verifier HTTP workers check tokens with.
    pub fn verifier(&self) -> Arc<TokenVerifier> {
        self.verifier.clone()
    }

    fn load_revocations(&self, ctx: &mut Context<Self>, shard: usize) {
        let shards = self.shards.clone();
        ctx.spawn(async move { shards.ask(shard, Revocations {}).await }.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(list) => {
                    let mut set = act.verifier.write();
                    for (jti, exp) in list {
                        set.jtis.insert(jti, exp.timestamp());
                    }
                    if let Some(flag) = set.loaded.get_mut(shard) {
                        *flag = true;
                    }
                    drop(set);
                    info!("token revocations loaded"; "shard" => shard);
                }
                Err(_) => {
                    ctx.run_later(Duration::from_millis(200), move |act, ctx| act.load_revocations(ctx, shard));
                }
            }
        }));
    }
}

impl Actor for AuthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let unloaded: Vec<usize> =
            self.verifier.read().loaded.iter().enumerate().filter(|(_, l)| !**l).map(|(s, _)| s).collect();
        for shard in unloaded {
            self.load_revocations(ctx, shard);
        }
        ctx.run_interval(Duration::from_secs(60), |act, _| {
            let now = Utc::now().timestamp() - LEEWAY_SECS as i64;
            act.verifier.write().jtis.retain(|_, exp| *exp >= now);
        });
    }
}

impl Supervised for AuthActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.restarts += 1;
        warn!("actor restarting"; "actor" => "AuthActor", "reason" => "stopped", "count" => self.restarts);
    }
}

/// Hashes a new password (bcrypt, configured cost).
#[derive(Message)]
#[rtype(result = "Result<String, ApiError>")]
pub struct HashPassword(pub String);

impl Handler<HashPassword> for AuthActor {
    type Result = ResponseFuture<Result<String, ApiError>>;
    fn handle(&mut self, msg: HashPassword, _: &mut Self::Context) -> Self::Result {
        let keys = self.keys.clone();
        Box::pin(async move {
            let cost = keys.cost;
            bcrypt_work(&keys, move || bcrypt::hash(msg.0, cost))
                .await?
                .map_err(|e| ApiError::Internal(format!("bcrypt: {e}")))
        })
    }
}

/// Checks a username and password; issues an access token.
#[derive(Message)]
#[rtype(result = "Result<TokenResponse, ApiError>")]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl Handler<Login> for AuthActor {
    type Result = ResponseFuture<Result<TokenResponse, ApiError>>;
    fn handle(&mut self, msg: Login, _: &mut Self::Context) -> Self::Result {
        let keys = self.keys.clone();
        let shards = self.shards.clone();
        Box::pin(async move {
            let Login { username, password } = msg;
            let user = shards.user_by_username(&username).await?;
            let (hash, user_id) = match &user {
                Some(u) => (u.password_hash.clone(), Some(u.id)),
                None => (keys.decoy_hash.clone(), None),
            };
            let ok = bcrypt_work(&keys, move || bcrypt::verify(password, &hash).unwrap_or(false)).await?;
            match (ok, user_id) {
                (true, Some(user_id)) => {
                    info!("login"; "user_id" => %user_id);
                    issue(&keys, user_id)
                }
                _ => {
                    warn!("login failed"; "username" => &username);
                    Err(ApiError::Unauthorized("invalid username or password".into()))
                }
            }
        })
    }
}

fn issue(keys: &Keys, user_id: Uuid) -> Result<TokenResponse, ApiError> {
    let now = Utc::now().timestamp();
    let claims = Claims { sub: user_id, iat: now, nbf: now, exp: now + keys.ttl_secs as i64, jti: Uuid::now_v7() };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding)
        .map_err(|e| ApiError::Internal(format!("cannot sign token: {e}")))?;
    Ok(TokenResponse { access_token: token, token_type: "Bearer".into(), expires_in: keys.ttl_secs })
}

/// Revokes the caller's token (logout); persisted before it answers.
#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct Revoke(pub Caller);

impl Handler<Revoke> for AuthActor {
    type Result = ResponseActFuture<Self, Result<(), ApiError>>;
    fn handle(&mut self, msg: Revoke, _: &mut Self::Context) -> Self::Result {
        let shards = self.shards.clone();
        let caller = msg.0;
        let expires_at = DateTime::<Utc>::from_timestamp(caller.expires_at, 0).unwrap_or_else(Utc::now);
        Box::pin(
            async move {
                shards
                    .ask_for(&caller.user_id, RevokeToken { jti: caller.jti, user_id: caller.user_id, expires_at })
                    .await
            }
            .into_actor(self)
            .map(move |res, act, _| {
                res?;
                act.verifier.write().jtis.insert(caller.jti, caller.expires_at);
                info!("logout"; "user_id" => %caller.user_id);
                Ok(())
            }),
        )
    }
}
