//! AuthActor: password hashing and checking, access tokens (JWT), revocations.
//!
//! bcrypt runs on the blocking pool behind a semaphore sized to the machine, so a burst
//! of logins queues there and never stalls the actor threads serving other requests.
//! Tokens are HS256 JWTs (`sub`, `exp`, `iat`, `nbf`, `jti`, and `pwd`: when the
//! user's password was last changed) signed with a key from the data directory; HS256 is
//! the only algorithm accepted. Revocations are persisted on the user's shard (pruned
//! once the token has expired) and held in memory in a `TokenVerifier` that HTTP workers
//! read directly (checking a token is a pure computation on every request: a round trip
//! to the actor would cost more than the check); the actor is the verifier's only
//! writer. The verifier also knows recent password changes, so a token issued before a
//! change is refused. A token of a user whose shard is not loaded yet is refused with
//! 503 rather than trusted. Failed logins are rate-limited (`crate::login_limit`).
//! It must never log or return a password, hash, token or key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use slog_scope::{info, warn};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::actors::shard::StoreError;
use crate::actors::shard::{PasswordChanges, PruneRevocations, Revocations, RevokeToken};
use crate::actors::shards::Shards;
use crate::login_limit::LoginLimiter;
use crate::model::TokenResponse;
use crate::placement::Router;

/// Seconds of clock skew tolerated when checking `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 5;

/// How often expired revocations are deleted from the shards.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Why the AuthActor or the token verifier refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token or the credentials are not accepted; the text says which check failed.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The revocations of the token's user are not loaded yet (their shard is starting).
    #[error("token revocations for this user are not loaded yet")]
    RevocationsNotLoaded,
    /// Too many failed logins from this address or for this username.
    #[error("too many failed logins; wait before trying again")]
    TooManyAttempts { retry_after: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bcrypt: {0}")]
    Hashing(#[source] bcrypt::BcryptError),
    /// A bcrypt job on the blocking pool ended without an answer.
    #[error("password task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("password gate closed")]
    GateClosed,
    #[error("cannot sign token: {0}")]
    Signing(#[source] jsonwebtoken::errors::Error),
}

/// The claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: Uuid,
    /// When the user's password was last changed (Unix microseconds) as the token was issued.
    pwd: i64,
}

/// How the AuthActor works.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Access token lifetime.
    pub ttl_secs: u64,
    /// bcrypt cost of new hashes.
    pub cost: u32,
    /// Failed logins allowed per minute from one client address.
    pub failures_per_address: NonZeroU32,
    /// Failed logins allowed per minute for one username.
    pub failures_per_username: NonZeroU32,
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
    limiter: LoginLimiter,
    /// A hash of a random password at the configured cost: checked when the username is
    /// unknown, so an unknown name costs the same work as a wrong password.
    decoy_hash: String,
}

/// Revocations as the verifier sees them.
#[derive(Default)]
struct RevocationSet {
    /// Revoked token ids and when each token expires (Unix seconds).
    jtis: HashMap<Uuid, i64>,
    /// Users whose password changed within a token lifetime, and when (Unix microseconds).
    password_changed: HashMap<Uuid, i64>,
    /// Per shard: are its revocations and password changes loaded?
    loaded: Vec<bool>,
}

impl RevocationSet {
    /// Records that `user`'s password changed at `at` (Unix microseconds); the latest wins.
    fn password_changed(&mut self, user: Uuid, at: i64) {
        let entry = self.password_changed.entry(user).or_insert(at);
        *entry = (*entry).max(at);
    }
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
        // Only HS256: a token naming another algorithm (or `none`) fails to decode.
        validation.algorithms = vec![Algorithm::HS256];
        Self {
            decoding: DecodingKey::from_secret(secret),
            validation,
            router: Router::new(shards as u32),
            revocations: RwLock::new(RevocationSet { loaded: vec![false; shards], ..Default::default() }),
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
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let invalid = || AuthError::Unauthorized("the access token is invalid or expired");
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
            return Err(AuthError::RevocationsNotLoaded);
        }
        if set.jtis.contains_key(&claims.jti) {
            warn!("access token rejected"; "reason" => "revoked", "user_id" => %claims.sub);
            return Err(AuthError::Unauthorized("the access token has been revoked"));
        }
        if set.password_changed.get(&claims.sub).is_some_and(|changed| claims.pwd < *changed) {
            warn!("access token rejected"; "reason" => "issued before a password change", "user_id" => %claims.sub);
            return Err(AuthError::Unauthorized("the password has changed since this token was issued; log in again"));
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

async fn bcrypt_work<T: Send + 'static>(
    keys: &Keys,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AuthError> {
    let _permit = keys.gate.acquire().await.map_err(|_| AuthError::GateClosed)?;
    let work = move || {
        hold_for_test();
        work()
    };
    tokio::task::spawn_blocking(work).await.map_err(AuthError::Task)
}

/// Test builds only (`--features failpoints`): `FAILPOINTS=password-work=return(<file>)`
/// holds every bcrypt job, on the thread that runs it, while `<file>` does not exist (a
/// minute at most), so a test can keep the hashing pool busy for exactly as long as it
/// needs. Compiles to nothing otherwise.
fn hold_for_test() {
    fail::fail_point!("password-work", |release: Option<String>| {
        let Some(release) = release else { return };
        let release = std::path::Path::new(&release);
        if release.exists() {
            return;
        }
        info!("fail point password-work: holding a bcrypt job"; "until" => %release.display());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !release.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        info!("fail point password-work: released");
    });
}

impl AuthActor {
    /// An auth actor signing with `secret` (at least 32 bytes).
    pub fn new(secret: &[u8], config: AuthConfig, shards: Shards) -> Result<Self, bcrypt::BcryptError> {
        let mut decoy = [0u8; 24];
        rand::fill(&mut decoy);
        let decoy_hash = bcrypt::hash(hex::encode(decoy), config.cost)?;
        let workers = std::thread::available_parallelism().map(|n| n.get().div_ceil(2)).unwrap_or(1);
        Ok(Self {
            keys: Arc::new(Keys {
                encoding: EncodingKey::from_secret(secret),
                ttl_secs: config.ttl_secs,
                cost: config.cost,
                gate: Semaphore::new(workers),
                limiter: LoginLimiter::new(config.failures_per_address, config.failures_per_username),
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

    /// The oldest password change that can still matter: tokens issued before it have expired.
    fn changes_horizon(&self) -> DateTime<Utc> {
        Utc::now() - chrono::Duration::seconds((self.keys.ttl_secs + LEEWAY_SECS) as i64)
    }

    fn load_revocations(&self, ctx: &mut Context<Self>, shard: usize) {
        let shards = self.shards.clone();
        let since = self.changes_horizon();
        let load = async move {
            let revoked = shards.ask(shard, Revocations {}).await?;
            let changed = shards.ask(shard, PasswordChanges { since }).await?;
            Ok::<_, StoreError>((revoked, changed))
        };
        ctx.spawn(load.into_actor(self).map(move |res, act, ctx| match res {
            Ok((revoked, changed)) => {
                let mut set = act.verifier.write();
                for (jti, exp) in revoked {
                    set.jtis.insert(jti, exp.timestamp());
                }
                for (user, at) in changed {
                    set.password_changed(user, at.timestamp_micros());
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
            let horizon = act.changes_horizon().timestamp_micros();
            let mut set = act.verifier.write();
            set.jtis.retain(|_, exp| *exp >= now);
            set.password_changed.retain(|_, at| *at >= horizon);
            drop(set);
            act.keys.limiter.prune();
        });
        ctx.run_interval(PRUNE_INTERVAL, |act, ctx| {
            let shards = act.shards.clone();
            ctx.spawn(
                async move {
                    for (shard, pruned) in shards.each(|_| PruneRevocations {}).await.into_iter().enumerate() {
                        if let Ok(pruned @ 1..) = pruned {
                            info!("expired token revocations pruned"; "shard" => shard, "count" => pruned);
                        }
                    }
                }
                .into_actor(act),
            );
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
#[rtype(result = "Result<String, AuthError>")]
pub struct HashPassword(pub String);

impl Handler<HashPassword> for AuthActor {
    type Result = ResponseFuture<Result<String, AuthError>>;
    fn handle(&mut self, msg: HashPassword, _: &mut Self::Context) -> Self::Result {
        let keys = self.keys.clone();
        Box::pin(async move {
            let cost = keys.cost;
            bcrypt_work(&keys, move || bcrypt::hash(msg.0, cost)).await?.map_err(AuthError::Hashing)
        })
    }
}

/// Checks a username and password; issues an access token.
#[derive(Message)]
#[rtype(result = "Result<TokenResponse, AuthError>")]
pub struct Login {
    pub username: String,
    pub password: String,
    /// The client's address, for the failed-login limit.
    pub client: IpAddr,
}

impl Handler<Login> for AuthActor {
    type Result = ResponseFuture<Result<TokenResponse, AuthError>>;
    fn handle(&mut self, msg: Login, _: &mut Self::Context) -> Self::Result {
        let keys = self.keys.clone();
        let shards = self.shards.clone();
        Box::pin(async move {
            let Login { username, password, client } = msg;
            if let Err(wait) = keys.limiter.check(client, &username) {
                warn!("login refused: too many failures"; "username" => &username, "client" => %client);
                return Err(AuthError::TooManyAttempts { retry_after: wait });
            }
            let user = shards.user_by_username(&username).await?;
            let (hash, user) = match user {
                Some(u) => (u.password_hash.clone(), Some((u.id, u.password_changed_at))),
                None => (keys.decoy_hash.clone(), None),
            };
            let ok = bcrypt_work(&keys, move || bcrypt::verify(password, &hash).unwrap_or(false)).await?;
            match (ok, user) {
                (true, Some((user_id, changed))) => {
                    info!("login"; "user_id" => %user_id);
                    issue(&keys, user_id, changed.timestamp_micros())
                }
                _ => {
                    warn!("login failed"; "username" => &username, "client" => %client);
                    keys.limiter
                        .failed(client, &username)
                        .map_err(|wait| AuthError::TooManyAttempts { retry_after: wait })?;
                    Err(AuthError::Unauthorized("invalid username or password"))
                }
            }
        })
    }
}

fn issue(keys: &Keys, user_id: Uuid, password_changed: i64) -> Result<TokenResponse, AuthError> {
    let now = Utc::now().timestamp();
    let claims = Claims {
        sub: user_id,
        iat: now,
        nbf: now,
        exp: now + keys.ttl_secs as i64,
        jti: Uuid::now_v7(),
        pwd: password_changed,
    };
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding).map_err(AuthError::Signing)?;
    Ok(TokenResponse { access_token: token, token_type: "Bearer".into(), expires_in: keys.ttl_secs })
}

/// Revokes the caller's token (logout); persisted before it answers.
#[derive(Message)]
#[rtype(result = "Result<(), AuthError>")]
pub struct Revoke(pub Caller);

impl Handler<Revoke> for AuthActor {
    type Result = ResponseActFuture<Self, Result<(), AuthError>>;
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

/// A user's password changed: tokens issued before `at` stop working at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PasswordChanged {
    pub user_id: Uuid,
    pub at: DateTime<Utc>,
}

impl Handler<PasswordChanged> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: PasswordChanged, _: &mut Self::Context) {
        self.verifier.write().password_changed(msg.user_id, msg.at.timestamp_micros());
        info!("password changed; older tokens refused"; "user_id" => %msg.user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> (TokenVerifier, Vec<u8>) {
        let secret = vec![7u8; 64];
        let v = TokenVerifier::new(&secret, 1);
        v.write().loaded[0] = true;
        (v, secret)
    }

    fn claims(user: Uuid, pwd: i64) -> serde_json::Value {
        let now = Utc::now().timestamp();
        serde_json::json!({ "sub": user, "iat": now, "nbf": now, "exp": now + 60, "jti": Uuid::now_v7(), "pwd": pwd })
    }

    fn sign(alg: Algorithm, claims: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn only_hs256_is_accepted() {
        let (v, secret) = verifier();
        let user = Uuid::now_v7();
        assert_eq!(v.verify(&sign(Algorithm::HS256, &claims(user, 0), &secret)).unwrap().user_id, user);
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            assert!(v.verify(&sign(alg, &claims(user, 0), &secret)).is_err(), "{alg:?} accepted");
        }
        let b64 = |v: &serde_json::Value| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!("{}.{}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT"})), b64(&claims(user, 0)));
        assert!(v.verify(&none).is_err(), "alg none accepted");
    }

    #[test]
    fn tokens_from_before_a_password_change_are_refused() {
        let (v, secret) = verifier();
        let user = Uuid::now_v7();
        let old = sign(Algorithm::HS256, &claims(user, 1_000), &secret);
        let new = sign(Algorithm::HS256, &claims(user, 2_000), &secret);
        v.write().password_changed.insert(user, 2_000);
        assert!(matches!(v.verify(&old), Err(AuthError::Unauthorized(_))));
        assert!(v.verify(&new).is_ok());
        let mut missing = claims(user, 0);
        missing.as_object_mut().unwrap().remove("pwd");
        assert!(v.verify(&sign(Algorithm::HS256, &missing, &secret)).is_err(), "a token without pwd is refused");
    }

    #[test]
    fn time_claims_are_checked_with_a_small_leeway() {
        let (v, secret) = verifier();
        let user = Uuid::now_v7();
        let now = Utc::now().timestamp();
        let mut c = claims(user, 0);
        c["exp"] = (now - 2).into();
        assert!(v.verify(&sign(Algorithm::HS256, &c, &secret)).is_ok(), "within the leeway");
        c["exp"] = (now - 60).into();
        assert!(v.verify(&sign(Algorithm::HS256, &c, &secret)).is_err(), "expired");
        let mut c = claims(user, 0);
        c["nbf"] = (now + 60).into();
        assert!(v.verify(&sign(Algorithm::HS256, &c, &secret)).is_err(), "not yet valid");
        let mut c = claims(user, 0);
        c["iat"] = (now + 60).into();
        assert!(v.verify(&sign(Algorithm::HS256, &c, &secret)).is_err(), "issued in the future");
    }
}
