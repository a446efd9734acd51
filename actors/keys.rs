//! KeyActor: the node's data keys — the key file, rotation, and re-sealing old rows.
//!
//! `cosmicsync keys rotate` asks it for a new data key: the key is written to the key
//! file first (atomically, mode 0600), then becomes the key new values are sealed with,
//! and a background pass re-seals every row still under an older key, shard by shard, in
//! small transactions, while the node keeps serving. The pass needs no bookkeeping of its
//! own: what is left is exactly the rows whose key id is not the current one, so a pass
//! cut short (by a crash or a stop) resumes where it stopped when the node starts again.
//! Old keys stay in the file (backups made before the rotation still need them).
//!
//! It must never log or return key bytes, and never remove a key from the key file.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use slog_scope::{info, warn};

use crate::actors::shard::StoreError;
use crate::actors::shard::{KeyUsage, RegisterKeys, ResealBatch};
use crate::actors::shards::Shards;
use crate::sealing::{KeyCheck, SharedKeyring};

/// How long the pass waits before retrying a shard that is unavailable.
const RETRY: Duration = Duration::from_secs(1);

/// Why a rotation or a status request failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the key file: {0}")]
    KeyFile(#[source] std::io::Error),
}

/// Progress of a re-sealing pass.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ResealProgress {
    /// The key rows are being re-sealed to.
    pub target_key: i32,
    /// Rows under older keys when the pass started.
    pub total: u64,
    /// Rows re-sealed so far.
    pub done: u64,
    /// True once no row is left under an older key.
    pub finished: bool,
    /// The last error the pass met (it retries), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What `cosmicsync keys status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The key file.
    pub key_file: PathBuf,
    /// The data key new values are sealed with.
    pub current_key: i32,
    /// Every data key in the key file.
    pub keys: Vec<i32>,
    /// Rows sealed under each key, summed over the shards that answered.
    pub rows_by_key: Vec<(i32, i64)>,
    /// The current or last re-sealing pass of this run, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reseal: Option<ResealProgress>,
}

/// The actor.
pub struct KeyActor {
    keys: Arc<SharedKeyring>,
    key_file: PathBuf,
    shards: Shards,
    /// Rows re-sealed per transaction.
    batch: i64,
    progress: Arc<Mutex<Option<ResealProgress>>>,
}

impl KeyActor {
    /// A key actor over the node's keyring, stored in `key_file`, re-sealing `batch` rows
    /// per transaction.
    pub fn new(keys: Arc<SharedKeyring>, key_file: PathBuf, shards: Shards, batch: u32) -> Self {
        Self { keys, key_file, shards, batch: i64::from(batch), progress: Arc::new(Mutex::new(None)) }
    }

    fn progress(&self) -> Option<ResealProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn running(&self) -> bool {
        self.progress().is_some_and(|p| !p.finished)
    }

    /// Starts a pass that re-seals every row under an older key (unless one runs).
    fn start_pass(&mut self) {
        if self.running() {
            return;
        }
        let target_key = self.keys.get().current();
        let (shards, batch) = (self.shards.clone(), self.batch);
        let progress = self.progress.clone();
        *progress.lock().unwrap_or_else(|p| p.into_inner()) = Some(ResealProgress { target_key, ..Default::default() });
        actix::spawn(async move {
            let update = |f: &dyn Fn(&mut ResealProgress)| {
                if let Some(p) = progress.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    f(p);
                }
            };
            let total =
                rows_left_retrying(&shards, target_key, |e| update(&|p| p.last_error = Some(e.to_string()))).await;
            update(&|p| p.total = total);
            info!("re-sealing rows under older keys"; "target_key" => target_key);
            for shard in 0..shards.len() {
                loop {
                    match shards.ask(shard, ResealBatch { limit: batch }).await {
                        Ok(0) => break,
                        Ok(n) => update(&|p| p.done += n),
                        Err(e) => {
                            warn!("re-sealing paused"; "shard" => shard, "error" => %e);
                            update(&|p| p.last_error = Some(format!("shard {shard}: {e}")));
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
            }
            update(&|p| {
                p.finished = true;
                p.last_error = None;
            });
            info!("re-sealing finished"; "target_key" => target_key);
        });
    }
}

impl Actor for KeyActor {
    type Context = Context<Self>;

    /// Resumes a rotation an earlier run left unfinished, once every shard answers.
    fn started(&mut self, ctx: &mut Self::Context) {
        let (shards, current) = (self.shards.clone(), self.keys.get().current());
        let left = async move { rows_left_retrying(&shards, current, |_| {}).await };
        ctx.spawn(left.into_actor(self).map(|left, act, _| {
            if left > 0 {
                info!("resuming an unfinished key rotation"; "rows_left" => left);
                act.start_pass();
            }
        }));
    }
}

/// Rows on every shard sealed under another key than `current`.
async fn rows_left(shards: &Shards, current: i32) -> Result<u64, KeyError> {
    let mut left = 0;
    for usage in shards.each(|_| KeyUsage {}).await {
        left += usage?.iter().filter(|(k, _)| *k != current).map(|(_, n)| *n as u64).sum::<u64>();
    }
    Ok(left)
}

/// `rows_left`, asked again after a pause until every shard answers; `failed` hears why not.
async fn rows_left_retrying(shards: &Shards, current: i32, failed: impl Fn(&KeyError)) -> u64 {
    loop {
        match rows_left(shards, current).await {
            Ok(left) => return left,
            Err(e) => {
                failed(&e);
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Introduce a new data key and re-seal every row with it; if a rotation is unfinished,
/// continue that one instead of adding another key.
#[derive(Message)]
#[rtype(result = "Result<KeyStatus, KeyError>")]
pub struct Rotate;

impl Handler<Rotate> for KeyActor {
    type Result = ResponseActFuture<Self, Result<KeyStatus, KeyError>>;

    fn handle(&mut self, _: Rotate, _: &mut Self::Context) -> Self::Result {
        let (shards, current) = (self.shards.clone(), self.keys.get().current());
        let left = async move { rows_left(&shards, current).await };
        Box::pin(left.into_actor(self).then(|left, act, _| {
            let added = match left {
                Ok(0) if !act.running() => act.add_key().map(Some),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            if added.is_ok() {
                act.start_pass();
            }
            let (shards, status) = (act.shards.clone(), act.status());
            async move {
                if let Some(checks) = added? {
                    // Shards that are down record the check values when they reconnect.
                    let recorded = shards.each(|_| RegisterKeys { checks: checks.clone() }).await;
                    for (shard, recorded) in recorded.into_iter().enumerate() {
                        if let Err(e) = recorded {
                            warn!("cannot record the new key's check value yet"; "shard" => shard, "error" => %e);
                        }
                    }
                }
                status.await
            }
            .into_actor(act)
        }))
    }
}

impl KeyActor {
    /// Adds a new current data key: written to the key file before anything is sealed with it.
    fn add_key(&mut self) -> Result<Vec<KeyCheck>, KeyError> {
        let next = self.keys.get().rotated();
        crate::secrets::write_private(&self.key_file, &next.to_file()).map_err(KeyError::KeyFile)?;
        let checks = next.checks();
        info!("new data key"; "key_id" => next.current());
        self.keys.replace(next);
        Ok(checks)
    }

    fn status(&self) -> impl Future<Output = Result<KeyStatus, KeyError>> + use<> {
        let ring = self.keys.get();
        let (shards, key_file, reseal) = (self.shards.clone(), self.key_file.clone(), self.progress());
        async move {
            let mut rows = std::collections::BTreeMap::<i32, i64>::new();
            for usage in shards.each(|_| KeyUsage {}).await {
                for (key, n) in usage? {
                    *rows.entry(key).or_default() += n;
                }
            }
            Ok(KeyStatus {
                key_file,
                current_key: ring.current(),
                keys: ring.key_ids(),
                rows_by_key: rows.into_iter().collect(),
                reseal,
            })
        }
    }
}

/// The keys, the rows under each, and the re-sealing pass.
#[derive(Message)]
#[rtype(result = "Result<KeyStatus, KeyError>")]
pub struct GetKeyStatus;

impl Handler<GetKeyStatus> for KeyActor {
    type Result = ResponseFuture<Result<KeyStatus, KeyError>>;

    fn handle(&mut self, _: GetKeyStatus, _: &mut Self::Context) -> Self::Result {
        Box::pin(self.status())
    }
}
