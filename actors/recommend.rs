//! RecommendActor: computes every user's top-k neighbours in batch (see
//! `crate::similarity` for the model) on a timer and on demand, and stores them on each
//! user's shard.
//!
//! A run: read every shard's users and features (and drop rows a failed run left) →
//! build the model and the top k of both modes on the blocking pool (rayon inside), so no
//! actor thread or HTTP worker waits on the maths → write each shard's rows under the
//! run's generation, in batches, one transaction each → only when every shard holds its
//! rows, flip each shard to the new generation. Until the flip nobody sees the new rows,
//! so a run that fails or is interrupted leaves the previous results in place. One run at
//! a time: asking for a run while one is going joins it.
//!
//! It must never run SQL itself (it sends shard messages), never block its thread, and
//! never start a second run concurrently with the first.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::future::try_join_all;
use serde::{Deserialize, Serialize};
use slog_scope::{info, warn};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::actors::shard::{RecoActivate, RecoDiscardStale, RecoFeatures, RecoState, RecoWrite, StoreError};
use crate::actors::shards::Shards;
use crate::similarity::{Mode, Model, Params, UserFeatures};
pub use crate::similarity::{RecoInput, RecoRow, RunRecord};

/// Users whose rows go to a shard in one transaction.
const WRITE_BATCH_USERS: usize = 250;

/// How often, and how long apart, the last run is asked of shards that are still starting.
const LOAD_ATTEMPTS: u32 = 60;
const LOAD_RETRY: Duration = Duration::from_secs(1);

/// How the batch is run (from the node's configuration).
#[derive(Debug, Clone)]
pub struct RecommendSettings {
    /// Time between timed runs; `None` runs only on demand.
    pub interval: Option<Duration>,
    /// Neighbours kept per user and mode.
    pub k: usize,
    /// The model's tunables.
    pub params: Params,
}

/// A finished run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LastRun {
    /// The run's id (its generation on the shards).
    pub generation: i64,
    /// When its results started being served.
    pub finished_at: DateTime<Utc>,
    /// Users it computed recommendations for.
    pub users: u64,
    /// From the start of reading to the last shard's flip, in milliseconds.
    pub duration_ms: u64,
}

/// A run that failed (its results were never served).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct FailedRun {
    pub generation: i64,
    pub failed_at: DateTime<Utc>,
    pub error: String,
}

/// What a run is doing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Reading users and features from every shard.
    Reading,
    /// Computing neighbours (users done counts users of both modes).
    Computing,
    /// Writing each user's rows to their shard.
    Writing,
    /// Switching every shard to the new results.
    Activating,
}

/// A run in progress: `done` of `total` users in the current phase.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RunProgress {
    pub generation: i64,
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// The recommendation batch's state, as `cosmicsync status`, `/network/status` and
/// `cosmicsync recommend run` see it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RecommendStatus {
    /// Seconds between timed runs; absent when only on-demand runs happen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    /// Neighbours kept per user and mode.
    pub k: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<RunProgress>,
    /// The last run whose results are served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
    /// The last run that failed, if it came after the last successful one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailedRun>,
}

/// The actor.
pub struct RecommendActor {
    shards: Shards,
    settings: RecommendSettings,
    running: Option<Arc<Mutex<RunProgress>>>,
    last_run: Option<LastRun>,
    last_failure: Option<FailedRun>,
}

impl RecommendActor {
    /// An actor computing over `shards` as `settings` say.
    pub fn new(shards: Shards, settings: RecommendSettings) -> Self {
        Self { shards, settings, running: None, last_run: None, last_failure: None }
    }

    /// Starts a run unless one is going; returns the generation of the run going on.
    fn start_run(&mut self, ctx: &mut Context<Self>) -> i64 {
        if let Some(run) = &self.running {
            return lock(run).generation;
        }
        // Microseconds since the epoch: unique and increasing for one node's runs.
        let generation = Utc::now().timestamp_micros();
        let progress = Arc::new(Mutex::new(RunProgress { generation, phase: Phase::Reading, done: 0, total: 0 }));
        self.running = Some(progress.clone());
        info!("recommendation run starting"; "generation" => generation);
        let batch = run_batch(self.shards.clone(), self.settings.clone(), progress);
        ctx.spawn(batch.into_actor(self).map(move |result, act, _| {
            act.running = None;
            match result {
                Ok(run) => {
                    info!("recommendation run finished";
                          "generation" => generation, "users" => run.users, "duration_ms" => run.duration_ms);
                    act.last_run = Some(run);
                    act.last_failure = None;
                }
                Err(error) => {
                    warn!("recommendation run failed; the previous results stay in place";
                          "generation" => generation, "error" => &error);
                    act.last_failure = Some(FailedRun { generation, failed_at: Utc::now(), error });
                }
            }
        }));
        generation
    }

    fn status(&self) -> RecommendStatus {
        RecommendStatus {
            interval_secs: self.settings.interval.map(|d| d.as_secs()),
            k: self.settings.k,
            running: self.running.as_ref().map(|p| lock(p).clone()),
            last_run: self.last_run.clone(),
            last_failure: self.last_failure.clone(),
        }
    }
}

impl Actor for RecommendActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(interval) = self.settings.interval {
            ctx.run_interval(interval, |act, ctx| {
                act.start_run(ctx);
            });
        }
        self.load_last_run(ctx, LOAD_ATTEMPTS);
    }
}

impl RecommendActor {
    /// What the shards serve survives restarts: learn the last run from them, retrying
    /// while shards are still connecting.
    fn load_last_run(&mut self, ctx: &mut Context<Self>, attempts: u32) {
        let shards = self.shards.clone();
        let load = async move { shards.each(|_| RecoState {}).await };
        ctx.spawn(load.into_actor(self).map(move |states, act, ctx| {
            if states.iter().any(Result::is_err) {
                if attempts > 1 {
                    ctx.run_later(LOAD_RETRY, move |act, ctx| act.load_last_run(ctx, attempts - 1));
                    return;
                }
                warn!("could not learn the last recommendation run from every shard; status shows what answered");
            }
            let served = states.into_iter().filter_map(|s| s.ok().flatten()).max_by_key(|r| r.generation);
            if let (None, Some(r)) = (&act.last_run, served) {
                act.last_run = Some(LastRun {
                    generation: r.generation,
                    finished_at: r.computed_at,
                    users: u64::try_from(r.users).unwrap_or(0),
                    duration_ms: u64::try_from(r.duration_ms).unwrap_or(0),
                });
            }
        }));
    }
}

/// The progress of a run is only ever replaced whole, so a poisoned lock still holds a
/// consistent value.
fn lock(progress: &Mutex<RunProgress>) -> std::sync::MutexGuard<'_, RunProgress> {
    progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn set_phase(progress: &Mutex<RunProgress>, phase: Phase, total: usize) {
    let mut p = lock(progress);
    p.phase = phase;
    p.done = 0;
    p.total = total as u64;
}

fn advance(progress: &Mutex<RunProgress>, n: usize) {
    lock(progress).done += n as u64;
}

fn shard_error(shard: usize, what: &str, e: StoreError) -> String {
    format!("shard {shard}: {what}: {e}")
}

/// One whole run; `Err` carries what went wrong, for the log and the status.
async fn run_batch(
    shards: Shards,
    settings: RecommendSettings,
    progress: Arc<Mutex<RunProgress>>,
) -> Result<LastRun, String> {
    let started = Instant::now();
    let generation = lock(&progress).generation;

    // 1. Read (after dropping what an earlier failed run left).
    for (s, r) in shards.each(|_| RecoDiscardStale {}).await.into_iter().enumerate() {
        r.map_err(|e| shard_error(s, "cannot clear old rows", e))?;
    }
    let mut people = Vec::new();
    for (s, read) in shards.each(|_| RecoFeatures {}).await.into_iter().enumerate() {
        people.extend(read.map_err(|e| shard_error(s, "cannot read features", e))?);
    }
    // Sorted by id: the same input gives the same model, whatever order shards answer in.
    people.sort_by_key(|p| p.user_id);
    let n = people.len();

    // 2. Compute, off the actor threads.
    set_phase(&progress, Phase::Computing, 2 * n);
    let (k, params) = (settings.k, settings.params.clone());
    // Split by move: the labels go to the model, ids and names stay for the rows.
    let (features, people): (Vec<UserFeatures>, Vec<(Uuid, String)>) = people
        .into_iter()
        .map(|p| (UserFeatures { id: p.user_id, skills: p.skills, interests: p.interests }, (p.user_id, p.username)))
        .unzip();
    let p = progress.clone();
    let computed = tokio::task::spawn_blocking(move || {
        let model = Model::build(&features, &params);
        let tick = |done: usize| advance(&p, done);
        let tops: Vec<Vec<Vec<crate::similarity::Match>>> =
            Mode::ALL.iter().map(|mode| model.top_k(*mode, k, &tick)).collect();
        (model, tops)
    })
    .await
    .map_err(|e| format!("the computation failed: {e}"))?;
    let computed = Arc::new(computed);
    let people = Arc::new(people);

    // 3. Write every shard's rows under the new generation (not served yet).
    set_phase(&progress, Phase::Writing, n);
    let mut by_shard = vec![Vec::new(); shards.len()];
    for (i, (id, _)) in people.iter().enumerate() {
        by_shard[shards.shard_of(id)].push(i as u32);
    }
    // The first failing shard ends the run: the other shards stop writing rows never served.
    try_join_all(by_shard.into_iter().enumerate().map(|(s, users)| {
        let (shards, computed, people, progress) = (shards.clone(), computed.clone(), people.clone(), progress.clone());
        async move {
            for batch in users.chunks(WRITE_BATCH_USERS) {
                let len = batch.len();
                let (batch, computed, people) = (batch.to_vec(), computed.clone(), people.clone());
                let rows = tokio::task::spawn_blocking(move || rows_of(&computed.0, &computed.1, &people, &batch))
                    .await
                    .map_err(|e| format!("building rows failed: {e}"))?;
                let count = rows.len();
                shards
                    .ask(s, RecoWrite { generation, rows })
                    .await
                    .map_err(|e| shard_error(s, &format!("cannot write {count} recommendations"), e))?;
                advance(&progress, len);
            }
            Ok::<_, String>(())
        }
    }))
    .await?;

    // 4. Flip every shard to the new generation.
    set_phase(&progress, Phase::Activating, shards.len());
    let finished_at = crate::model::now();
    let duration_ms = started.elapsed().as_millis() as u64;
    let record = RunRecord {
        generation,
        computed_at: finished_at,
        users: i32::try_from(n).unwrap_or(i32::MAX),
        duration_ms: duration_ms as i64,
        k: k as i32,
    };
    let flips = shards.each(|_| RecoActivate { run: record.clone() }).await;
    let failed: Vec<String> = flips
        .into_iter()
        .enumerate()
        .filter_map(|(s, r)| r.err().map(|e| shard_error(s, "cannot switch", e)))
        .collect();
    if !failed.is_empty() {
        return Err(format!(
            "the new results are served on some shards only (each user still sees one whole run): {}",
            failed.join("; ")
        ));
    }
    Ok(LastRun { generation, finished_at, users: n as u64, duration_ms })
}

/// The stored rows of the users `batch` (indices into `people`: ids and usernames in the
/// model's order).
fn rows_of(
    model: &Model,
    tops: &[Vec<Vec<crate::similarity::Match>>],
    people: &[(Uuid, String)],
    batch: &[u32],
) -> Vec<RecoRow> {
    let mut rows = Vec::new();
    for &u in batch {
        for (mode, top) in Mode::ALL.iter().zip(tops) {
            let (Some(matches), Some((user_id, _))) = (top.get(u as usize), people.get(u as usize)) else { continue };
            for (rank, m) in matches.iter().enumerate() {
                let Some((neighbour_id, username)) = people.get(m.user as usize) else { continue };
                rows.push(RecoRow {
                    user_id: *user_id,
                    mode: *mode,
                    rank: i16::try_from(rank + 1).unwrap_or(i16::MAX),
                    neighbour_id: *neighbour_id,
                    username: username.clone(),
                    score: m.score,
                    shared: model.shared(*mode, u, m.user),
                });
            }
        }
    }
    rows
}

/// Starts a run (or joins the one going on); replies with its generation.
#[derive(Message)]
#[rtype(result = "i64")]
pub struct StartRun;

impl Handler<StartRun> for RecommendActor {
    type Result = i64;
    fn handle(&mut self, _: StartRun, ctx: &mut Self::Context) -> i64 {
        self.start_run(ctx)
    }
}

/// Asks for the batch's state.
#[derive(Message)]
#[rtype(result = "RecommendStatus")]
pub struct GetRecommendStatus;

impl Handler<GetRecommendStatus> for RecommendActor {
    type Result = MessageResult<GetRecommendStatus>;
    fn handle(&mut self, _: GetRecommendStatus, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.status())
    }
}
