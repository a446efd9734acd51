//! EventHub: puts committed changes in sequence order and fans them out to WebSocket
//! sessions.
//!
//! Shards report every sequence number they allocate exactly once (`Report`), in any
//! order. `Reorder` (pure, tested below) holds reports back until every lower number is
//! resolved, so subscribers see changes strictly in `seq` order; the watermark `W` is the
//! highest number resolved so far. A subscriber is matched by a `Filter` (parsed from
//! topics by `Filter::parse`) and fed through its own bounded channel with `try_send`:
//! one that cannot keep up is dropped and told so on its `ended` channel, never waited
//! for. A subscriber resuming from `since = L` gets `(L, W]` from the change log (read by
//! a spawned task through `Shards`, which may wait on the session) while the hub buffers
//! its live events; the task then drains that buffer until the hub switches it to live.
//! Every resume ends its history with `ReplayComplete`, also when there is none to send
//! (`L >= W`); a resume from a number the node has never issued (`L` beyond the
//! sequencer) is refused, since nothing it could send would be what the client lacks.
//!
//! The hub must never block or await a session, never run SQL (history comes through
//! `Shards`), and never format wire messages: JSON belongs to `api::ws`.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use slog_scope::{info, warn};
use tokio::sync::{mpsc, oneshot};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::actors::shard::StoreError;
use crate::actors::shards::Shards;
pub use crate::changes::Report;
use crate::model::{ChangeEvent, Entity};
use crate::sequencer::Sequencer;

/// How many change-log rows a replay reads per request.
const REPLAY_PAGE: i64 = 500;
/// How often the hub checks whether delivery is stuck on a missing number.
const STALL_CHECK: Duration = Duration::from_secs(5);
/// How long delivery may wait on one number before the hub warns (once per stall).
const STALL_WARN_AFTER: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Reordering (pure)
// ---------------------------------------------------------------------------------------

/// A report waiting for a lower number.
#[derive(Debug)]
enum Pending {
    Event(ChangeEvent),
    /// Void from this entry's key up to `end` (exclusive).
    Void {
        end: i64,
    },
}

/// Turns reports that arrive in any order into changes in strict sequence order.
///
/// Robust to contract breaches, because a shard bug must not stop delivery for the whole
/// node: duplicates and numbers already resolved are ignored, void ranges may overlap
/// what is already delivered, and a number reported both committed and void is delivered
/// (a committed change is never hidden by a void claim).
#[derive(Debug)]
pub struct Reorder {
    next: i64,
    pending: BTreeMap<i64, Pending>,
}

impl Reorder {
    /// Waits for `first` next.
    pub fn new(first: i64) -> Self {
        Self { next: first, pending: BTreeMap::new() }
    }

    /// The highest number resolved (delivered or void) with every lower one resolved too.
    pub fn watermark(&self) -> i64 {
        self.next - 1
    }

    /// The number delivery waits for.
    pub fn next_expected(&self) -> i64 {
        self.next
    }

    /// How many reports are held back waiting for a lower number.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one report; returns the changes it makes deliverable, in sequence order.
    pub fn report(&mut self, report: Report) -> Vec<ChangeEvent> {
        match report {
            Report::Committed(event) => self.commit(event),
            Report::Void(range) => self.void(range),
        }
        self.drain()
    }

    fn commit(&mut self, event: ChangeEvent) {
        let seq = event.seq;
        if seq < self.next {
            return;
        }
        match self.pending.entry(seq) {
            Entry::Vacant(slot) => {
                slot.insert(Pending::Event(event));
            }
            Entry::Occupied(mut slot) => {
                if let Pending::Void { end } = *slot.get() {
                    slot.insert(Pending::Event(event));
                    self.void(seq + 1..end);
                }
            }
        }
    }

    fn void(&mut self, range: Range<i64>) {
        let mut start = range.start.max(self.next);
        while start < range.end {
            match self.pending.entry(start) {
                Entry::Vacant(slot) => {
                    slot.insert(Pending::Void { end: range.end });
                    return;
                }
                Entry::Occupied(mut slot) => match slot.get_mut() {
                    Pending::Void { end } => {
                        *end = (*end).max(range.end);
                        return;
                    }
                    // Committed wins: the void claim resumes after it.
                    Pending::Event(_) => start += 1,
                },
            }
        }
    }

    fn drain(&mut self) -> Vec<ChangeEvent> {
        let mut ready = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > self.next {
                break;
            }
            match entry.remove() {
                // Events are never stored below `next` (see `commit` and below), so this
                // one is exactly the number we wait for.
                Pending::Event(event) => {
                    self.next = event.seq + 1;
                    ready.push(event);
                }
                Pending::Void { end } if end > self.next => {
                    // A void range stops at the first committed event inside it, which
                    // keeps the invariant that no event is stored below `next`.
                    let event_inside = self
                        .pending
                        .range(self.next..end)
                        .find(|(_, p)| matches!(p, Pending::Event(_)))
                        .map(|(seq, _)| *seq);
                    match event_inside {
                        Some(seq) => {
                            self.next = seq;
                            self.void(seq + 1..end);
                        }
                        None => self.next = end,
                    }
                }
                Pending::Void { .. } => {}
            }
        }
        ready
    }
}

// ---------------------------------------------------------------------------------------
// Topics and filters (pure)
// ---------------------------------------------------------------------------------------

/// At most this many topics per subscription: matching cost is per event and per topic.
pub const MAX_TOPICS: usize = 100;

/// Why a list of topics was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("subscribe to at least one topic")]
    Empty,
    #[error("at most {MAX_TOPICS} topics per subscription")]
    TooMany,
    #[error("unknown topic {0:?}: expected all, users, profiles, projects, user:<uuid> or project:<uuid>")]
    Unknown(String),
    #[error("topic {0:?} does not hold a valid UUID")]
    BadId(String),
}

/// Which changes a subscriber wants: the union of its topics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    all: bool,
    entities: Vec<Entity>,
    owners: HashSet<Uuid>,
    projects: HashSet<Uuid>,
    topics: Vec<String>,
}

impl Filter {
    /// Parses topics: `all`, `users`, `profiles`, `projects`, `user:<uuid>` (every row
    /// that user owns: the user row, their profile, their projects), `project:<uuid>`.
    pub fn parse<S: AsRef<str>>(topics: &[S]) -> Result<Self, TopicError> {
        if topics.is_empty() {
            return Err(TopicError::Empty);
        }
        if topics.len() > MAX_TOPICS {
            return Err(TopicError::TooMany);
        }
        let mut filter = Filter::default();
        for topic in topics {
            let topic = topic.as_ref();
            let canonical = match topic {
                "all" => {
                    filter.all = true;
                    topic.to_owned()
                }
                "users" | "profiles" | "projects" => {
                    let entity = match topic {
                        "users" => Entity::User,
                        "profiles" => Entity::Profile,
                        _ => Entity::Project,
                    };
                    if !filter.entities.contains(&entity) {
                        filter.entities.push(entity);
                    }
                    topic.to_owned()
                }
                _ => {
                    let (kind, id) = topic.split_once(':').ok_or_else(|| TopicError::Unknown(shorten(topic)))?;
                    let set = match kind {
                        "user" => &mut filter.owners,
                        "project" => &mut filter.projects,
                        _ => return Err(TopicError::Unknown(shorten(topic))),
                    };
                    let id = Uuid::try_parse(id).map_err(|_| TopicError::BadId(shorten(topic)))?;
                    set.insert(id);
                    format!("{kind}:{id}")
                }
            };
            if !filter.topics.contains(&canonical) {
                filter.topics.push(canonical);
            }
        }
        Ok(filter)
    }

    /// The topics in canonical form (lower-case hyphenated ids), without duplicates.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// Whether the change is one the subscriber asked for.
    pub fn matches(&self, event: &ChangeEvent) -> bool {
        self.all
            || self.entities.contains(&event.entity)
            || self.owners.contains(&event.owner_id)
            || (event.entity == Entity::Project && self.projects.contains(&event.id))
    }
}

/// Keeps an echoed topic short: it goes back to the client inside an error message.
fn shorten(topic: &str) -> String {
    const MAX: usize = 80;
    match topic.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &topic[..cut]),
        None => topic.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// The actor and its messages
// ---------------------------------------------------------------------------------------

/// Identifies one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

impl std::fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What the hub puts on a subscriber's channel, in order.
#[derive(Debug, Clone)]
pub enum HubMessage {
    /// A change that matches the subscriber's filter.
    Change(Arc<ChangeEvent>),
    /// Every matching change up to `seq` has been sent; live changes follow.
    ReplayComplete { seq: i64 },
}

/// Why the hub stopped serving a subscriber (sent on its `ended` channel; the hub sends
/// nothing more after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The subscriber's channel (capacity `limit`) was full: it fell too far behind.
    Lagged { limit: usize },
    /// The history could not be read; `reason` is fit for the client.
    ReplayFailed { reason: String },
}

/// Subscribes a session. Changes go to `tx` (its capacity is how far the subscriber may
/// fall behind); `ended` fires if the hub drops the subscriber.
#[derive(Debug, Message)]
#[rtype(result = "Result<Subscribed, SubscribeError>")]
pub struct Subscribe {
    pub filter: Filter,
    /// Resume after this sequence number: every matching change with a greater `seq` is
    /// sent, history first. `None`: only changes after the current watermark.
    pub since: Option<i64>,
    pub tx: mpsc::Sender<HubMessage>,
    pub ended: oneshot::Sender<Ended>,
    /// The authenticated user behind the session (for logs).
    pub caller: Uuid,
}

/// The reply to `Subscribe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    pub id: SubscriptionId,
    /// The watermark `W` at subscription: live changes have a greater `seq`.
    pub seq: i64,
    /// True when history `(since, W]` is being replayed. Every subscription with a
    /// `since` gets a `ReplayComplete` after its history, empty or not.
    pub replaying: bool,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// `since` names a number this node has not handed out: the client's position comes
    /// from another node, or from before this node's data was reset.
    #[error(
        "since={since} is ahead of this node: it has issued sequence numbers up to {issued} only \
         (a position from another node, or from data that was reset?); subscribe without since \
         and reload what you hold"
    )]
    SinceAhead { since: i64, issued: i64 },
}

/// Ends a subscription (the session is closing). Unknown ids are ignored.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub SubscriptionId);

/// Asks for the hub's numbers (for status).
#[derive(Debug, Message)]
#[rtype(result = "HubStatus")]
pub struct HubStats;

/// The hub's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct HubStatus {
    /// Subscribed WebSocket sessions.
    pub sessions: usize,
    /// The watermark: every change up to this sequence number has been delivered.
    pub seq: i64,
    /// Reports held back waiting for a lower sequence number.
    pub pending_reports: usize,
}

/// From a replay task: hand over the live changes buffered for this subscriber; an empty
/// list means none were left and the subscriber is now live. `None`: it is gone.
#[derive(Message)]
#[rtype(result = "Option<Vec<Arc<ChangeEvent>>>")]
struct TakeBuffered(SubscriptionId);

/// From a replay task: reading the history failed.
#[derive(Message)]
#[rtype(result = "()")]
struct ReplayFailed {
    id: SubscriptionId,
    error: StoreError,
}

enum Phase {
    Live,
    /// History is being replayed; live changes wait here (bounded by the channel size).
    CatchingUp(VecDeque<Arc<ChangeEvent>>),
}

struct Subscriber {
    filter: Filter,
    /// Only changes with a greater `seq` are sent.
    after: i64,
    tx: mpsc::Sender<HubMessage>,
    ended: oneshot::Sender<Ended>,
    caller: Uuid,
    phase: Phase,
}

/// Why a subscriber is removed.
enum Removal {
    Lagged,
    Failed(String),
    /// The session is gone; nobody to tell.
    Gone,
}

/// The hub.
pub struct EventHub {
    order: Reorder,
    /// What has been handed out, so a resume from beyond it can be refused.
    sequencer: Arc<Sequencer>,
    shards: Shards,
    subscribers: HashMap<SubscriptionId, Subscriber>,
    next_id: u64,
    /// The number delivery waited for at the last stall check, since when, and whether
    /// the stall was already logged.
    stall: (i64, Instant, bool),
}

impl EventHub {
    /// A hub waiting for the sequencer's next number.
    pub fn new(sequencer: Arc<Sequencer>, shards: Shards) -> Self {
        let first_seq = sequencer.peek();
        Self {
            order: Reorder::new(first_seq),
            sequencer,
            shards,
            subscribers: HashMap::new(),
            next_id: 1,
            stall: (first_seq, Instant::now(), false),
        }
    }

    fn deliver(&mut self, event: Arc<ChangeEvent>) {
        let mut removals = Vec::new();
        for (id, sub) in &mut self.subscribers {
            if event.seq <= sub.after || !sub.filter.matches(&event) {
                continue;
            }
            match &mut sub.phase {
                Phase::Live => match sub.tx.try_send(HubMessage::Change(event.clone())) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => removals.push((*id, Removal::Lagged)),
                    Err(mpsc::error::TrySendError::Closed(_)) => removals.push((*id, Removal::Gone)),
                },
                Phase::CatchingUp(buffer) => {
                    if sub.tx.is_closed() {
                        removals.push((*id, Removal::Gone));
                    } else if buffer.len() >= sub.tx.max_capacity() {
                        removals.push((*id, Removal::Lagged));
                    } else {
                        buffer.push_back(event.clone());
                    }
                }
            }
        }
        for (id, why) in removals {
            self.remove(id, why);
        }
    }

    fn remove(&mut self, id: SubscriptionId, why: Removal) {
        let Some(sub) = self.subscribers.remove(&id) else { return };
        let limit = sub.tx.max_capacity();
        match why {
            Removal::Lagged => {
                info!("WebSocket subscriber too slow; dropped"; "subscription" => %id, "user_id" => %sub.caller,
                      "limit" => limit);
                // The receiver may be gone already: nobody left to tell.
                let _ = sub.ended.send(Ended::Lagged { limit });
            }
            Removal::Failed(reason) => {
                let _ = sub.ended.send(Ended::ReplayFailed { reason });
            }
            Removal::Gone => {}
        }
    }

    fn check_stall(&mut self) {
        let next = self.order.next_expected();
        let (waiting_for, since, logged) = self.stall;
        if waiting_for != next || self.order.pending() == 0 {
            self.stall = (next, Instant::now(), false);
        } else if !logged && since.elapsed() >= STALL_WARN_AFTER {
            self.stall.2 = true;
            warn!("change delivery is waiting for a sequence number no shard has reported";
                  "seq" => next, "held_back" => self.order.pending(), "waiting_secs" => since.elapsed().as_secs());
        }
    }
}

impl Actor for EventHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // No mailbox capacity to raise: shards report with `do_send`, which always queues,
        // so a shard never waits on the hub.
        ctx.run_interval(STALL_CHECK, |act, _| act.check_stall());
    }
}

impl Handler<Report> for EventHub {
    type Result = ();
    fn handle(&mut self, msg: Report, _ctx: &mut Self::Context) {
        for event in self.order.report(msg) {
            self.deliver(Arc::new(event));
        }
    }
}

impl Handler<Subscribe> for EventHub {
    type Result = Result<Subscribed, SubscribeError>;
    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) -> Self::Result {
        let watermark = self.order.watermark();
        // Numbers in (W, issued] are in flight: a client cannot have seen them from this
        // node, but they exist, and live delivery starts after `since` as asked.
        let issued = self.sequencer.peek() - 1;
        if let Some(since) = msg.since.filter(|since| *since > issued.max(watermark)) {
            return Err(SubscribeError::SinceAhead { since, issued });
        }
        let id = SubscriptionId(self.next_id);
        self.next_id += 1;
        let after = msg.since.unwrap_or(watermark);
        let replaying = after < watermark;
        let phase = if replaying {
            let task =
                replay(ctx.address(), self.shards.clone(), id, msg.filter.clone(), after, watermark, msg.tx.clone());
            actix::spawn(task);
            Phase::CatchingUp(VecDeque::new())
        } else {
            if msg.since.is_some() {
                // Nothing to replay, but the client still learns that history is done.
                // The channel is new and empty (capacity at least 1), so this cannot fail
                // for space; a closed one means the session is gone already.
                let _ = msg.tx.try_send(HubMessage::ReplayComplete { seq: watermark });
            }
            Phase::Live
        };
        let Subscribe { filter, since, tx, ended, caller } = msg;
        info!("WebSocket subscription"; "subscription" => %id, "user_id" => %caller,
              "topics" => filter.topics().join(","), "since" => since, "seq" => watermark);
        let sub = Subscriber { filter, after, tx, ended, caller, phase };
        self.subscribers.insert(id, sub);
        Ok(Subscribed { id, seq: watermark, replaying })
    }
}

impl Handler<Unsubscribe> for EventHub {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Self::Context) {
        self.remove(msg.0, Removal::Gone);
    }
}

impl Handler<HubStats> for EventHub {
    type Result = MessageResult<HubStats>;
    fn handle(&mut self, _: HubStats, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(HubStatus {
            sessions: self.subscribers.len(),
            seq: self.order.watermark(),
            pending_reports: self.order.pending(),
        })
    }
}

impl Handler<TakeBuffered> for EventHub {
    type Result = Option<Vec<Arc<ChangeEvent>>>;
    fn handle(&mut self, msg: TakeBuffered, _ctx: &mut Self::Context) -> Self::Result {
        let sub = self.subscribers.get_mut(&msg.0)?;
        match &mut sub.phase {
            Phase::CatchingUp(buffer) if !buffer.is_empty() => Some(buffer.drain(..).collect()),
            phase => {
                *phase = Phase::Live;
                Some(Vec::new())
            }
        }
    }
}

impl Handler<ReplayFailed> for EventHub {
    type Result = ();
    fn handle(&mut self, msg: ReplayFailed, _ctx: &mut Self::Context) {
        let reason = match &msg.error {
            StoreError::Unavailable(shard) => format!("replay unavailable: shard {shard} is down; retry"),
            _ => "replay failed: the change log could not be read; retry".to_owned(),
        };
        warn!("WebSocket replay failed"; "subscription" => %msg.id, "error" => %msg.error);
        self.remove(msg.id, Removal::Failed(reason));
    }
}

/// Sends `(after, upto]` from the change log, then the live changes the hub buffered
/// meanwhile, until the hub has none left and switches the subscriber to live. Runs
/// outside the hub because it waits on the session (`send().await`: back-pressure).
async fn replay(
    hub: Addr<EventHub>,
    shards: Shards,
    id: SubscriptionId,
    filter: Filter,
    after: i64,
    upto: i64,
    tx: mpsc::Sender<HubMessage>,
) {
    let mut cursor = after;
    while cursor < upto {
        let page = match shards.changes_since(cursor, upto, REPLAY_PAGE).await {
            Ok(page) => page,
            Err(error) => {
                hub.do_send(ReplayFailed { id, error });
                return;
            }
        };
        let Some(last) = page.last().map(|e| e.seq) else { break };
        let full = page.len() as i64 >= REPLAY_PAGE;
        for event in page.into_iter().filter(|e| filter.matches(e)) {
            if tx.send(HubMessage::Change(Arc::new(event))).await.is_err() {
                return; // The session is gone; its guard unsubscribes it.
            }
        }
        // `last > cursor` always (rows are `> cursor`), so this loop ends.
        cursor = last;
        if !full {
            break;
        }
    }
    if tx.send(HubMessage::ReplayComplete { seq: upto }).await.is_err() {
        return;
    }
    loop {
        let batch = match hub.send(TakeBuffered(id)).await {
            Ok(Some(batch)) => batch,
            Ok(None) | Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        for event in batch {
            if tx.send(HubMessage::Change(event)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::VectorClock;
    use proptest::prelude::*;

    fn event(seq: i64) -> ChangeEvent {
        event_of(seq, Entity::Project, Uuid::nil(), Uuid::nil())
    }

    fn event_of(seq: i64, entity: Entity, id: Uuid, owner_id: Uuid) -> ChangeEvent {
        ChangeEvent {
            seq,
            origin: "node".into(),
            origin_seq: seq,
            entity,
            op: crate::model::Op::Update,
            id,
            owner_id,
            vclock: VectorClock::default(),
            data: serde_json::Value::Null,
            committed_at: crate::model::now(),
            conflicts: Vec::new(),
        }
    }

    /// Feeds reports to a fresh `Reorder` starting at `first`; returns the seqs delivered
    /// and the final watermark.
    fn check(first: i64, reports: Vec<Report>) -> (Vec<i64>, i64) {
        let mut order = Reorder::new(first);
        let mut seen = Vec::new();
        for r in reports {
            seen.extend(order.report(r).into_iter().map(|e| e.seq));
        }
        (seen, order.watermark())
    }

    use Report::{Committed as C, Void as V};

    #[test]
    fn in_order_commits_are_delivered_at_once() {
        assert_eq!(check(1, vec![C(event(1)), C(event(2)), C(event(3))]), (vec![1, 2, 3], 3));
    }

    #[test]
    fn out_of_order_commits_wait_for_the_lower_numbers() {
        let mut order = Reorder::new(10);
        assert!(order.report(C(event(12))).is_empty());
        assert!(order.report(C(event(11))).is_empty());
        assert_eq!(order.watermark(), 9);
        assert_eq!(order.pending(), 2);
        let out: Vec<i64> = order.report(C(event(10))).iter().map(|e| e.seq).collect();
        assert_eq!(out, vec![10, 11, 12]);
        assert_eq!((order.watermark(), order.pending()), (12, 0));
    }

    #[test]
    fn void_ranges_fill_gaps() {
        assert_eq!(check(1, vec![C(event(5)), V(1..3), C(event(3)), V(4..5)]), (vec![3, 5], 5));
        // A void range alone moves the watermark.
        assert_eq!(check(1, vec![V(1..100)]), (vec![], 99));
        // Empty and backwards ranges are harmless.
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = V(9..3);
        assert_eq!(check(1, vec![V(4..4), backwards, C(event(1))]), (vec![1], 1));
    }

    #[test]
    fn ranges_overlapping_delivered_numbers_do_not_break_delivery() {
        let (seen, w) = check(1, vec![C(event(1)), C(event(2)), V(0..4), C(event(4)), V(2..3), V(-5..0)]);
        assert_eq!((seen, w), (vec![1, 2, 4], 4));
        // Overlapping pending void ranges merge.
        assert_eq!(check(1, vec![V(2..6), V(3..8), V(1..2), C(event(8))]), (vec![8], 8));
    }

    #[test]
    fn duplicates_are_ignored() {
        let (seen, w) = check(1, vec![C(event(2)), C(event(2)), C(event(1)), C(event(1)), C(event(2)), V(1..2)]);
        assert_eq!((seen, w), (vec![1, 2], 2));
    }

    #[test]
    fn a_committed_change_is_never_hidden_by_a_void_claim() {
        // Both orders of a contract breach: the change is still delivered, once.
        assert_eq!(check(1, vec![C(event(3)), V(1..6)]), (vec![3], 5));
        assert_eq!(check(1, vec![V(2..6), C(event(3)), V(1..2)]), (vec![3], 5));
        assert_eq!(check(1, vec![V(2..6), C(event(2)), C(event(5)), V(1..2)]), (vec![2, 5], 5));
    }

    #[test]
    fn nothing_below_the_first_number_is_delivered() {
        assert_eq!(check(100, vec![C(event(5)), V(0..50), C(event(100))]), (vec![100], 100));
    }

    /// One report as plain data (a `Report` is not `Clone`): `(start, len, committed)`.
    type Item = (i64, i64, bool);

    /// Numbers 1.. split into commits and void runs, some reported twice, in any order.
    fn shuffled_reports() -> impl Strategy<Value = Vec<Item>> {
        let kinds = proptest::collection::vec((any::<bool>(), 1i64..4), 1..60);
        let dups = proptest::collection::vec(any::<proptest::sample::Index>(), 0..5);
        (kinds, dups).prop_flat_map(|(kinds, dups)| {
            let mut seq = 1;
            let mut items: Vec<Item> = kinds
                .into_iter()
                .map(|(committed, len)| {
                    let item = if committed { (seq, 1, true) } else { (seq, len, false) };
                    seq += item.1;
                    item
                })
                .collect();
            let copies: Vec<Item> = dups.iter().map(|i| *i.get(&items)).collect();
            items.extend(copies);
            Just(items).prop_shuffle()
        })
    }

    proptest! {
        /// Any interleaving of the reports delivers exactly the committed changes, in
        /// order, once each, and resolves every number.
        #[test]
        fn any_order_delivers_every_commit_once_in_order(items in shuffled_reports()) {
            let mut committed: Vec<i64> = items.iter().filter(|i| i.2).map(|i| i.0).collect();
            committed.sort();
            committed.dedup();
            let last = items.iter().map(|i| i.0 + i.1 - 1).max().unwrap_or(0);
            let reports = items.into_iter().map(|(start, len, c)| if c { C(event(start)) } else { V(start..start + len) });
            let (seen, w) = check(1, reports.collect());
            prop_assert_eq!(seen, committed);
            prop_assert_eq!(w, last);
        }
    }

    // --- topics -------------------------------------------------------------------------

    fn topics(list: &[&str]) -> Result<Vec<String>, TopicError> {
        Filter::parse(list).map(|f| f.topics().to_vec())
    }

    #[test]
    fn topics_parse_to_canonical_form() {
        let id = Uuid::now_v7();
        let upper = id.to_string().to_uppercase();
        assert_eq!(
            topics(&["projects", "all", "users", "profiles", &format!("user:{upper}"), &format!("project:{id}")]),
            Ok(vec![
                "projects".to_owned(),
                "all".into(),
                "users".into(),
                "profiles".into(),
                format!("user:{id}"),
                format!("project:{id}")
            ])
        );
        assert_eq!(topics(&["projects", "projects"]), Ok(vec!["projects".to_owned()]));
    }

    #[test]
    fn bad_topics_are_refused() {
        assert_eq!(topics(&[]), Err(TopicError::Empty));
        assert_eq!(topics(&["things"]), Err(TopicError::Unknown("things".into())));
        assert_eq!(topics(&["Projects"]), Err(TopicError::Unknown("Projects".into())));
        assert_eq!(topics(&["team:1"]), Err(TopicError::Unknown("team:1".into())));
        assert_eq!(topics(&["user:"]), Err(TopicError::BadId("user:".into())));
        assert_eq!(topics(&["project:123"]), Err(TopicError::BadId("project:123".into())));
        assert_eq!(topics(&vec!["all"; MAX_TOPICS + 1]), Err(TopicError::TooMany));
        let long = "x".repeat(10_000);
        let Err(TopicError::Unknown(echo)) = Filter::parse(&[long]) else { panic!("accepted") };
        assert!(echo.chars().count() <= 81);
        // Multi-byte characters are cut on a boundary, not in the middle.
        assert!(Filter::parse(&["é".repeat(200)]).is_err());
    }

    #[test]
    fn filters_match_what_their_topics_name() {
        let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let (p1, p2) = (Uuid::now_v7(), Uuid::now_v7());
        let ada_user = event_of(1, Entity::User, ada, ada);
        let ada_profile = event_of(2, Entity::Profile, Uuid::now_v7(), ada);
        let ada_project = event_of(3, Entity::Project, p1, ada);
        let bob_project = event_of(4, Entity::Project, p2, bob);
        let all = [&ada_user, &ada_profile, &ada_project, &bob_project];
        let matching = |list: &[String]| -> Vec<i64> {
            let f = Filter::parse(list).unwrap();
            all.iter().filter(|e| f.matches(e)).map(|e| e.seq).collect()
        };
        assert_eq!(matching(&["all".into()]), vec![1, 2, 3, 4]);
        assert_eq!(matching(&["users".into()]), vec![1]);
        assert_eq!(matching(&["profiles".into()]), vec![2]);
        assert_eq!(matching(&["projects".into()]), vec![3, 4]);
        assert_eq!(matching(&[format!("user:{ada}")]), vec![1, 2, 3]);
        assert_eq!(matching(&[format!("user:{bob}")]), vec![4]);
        assert_eq!(matching(&[format!("project:{p2}")]), vec![4]);
        // A project topic never matches a user whose id happens to be the same.
        assert_eq!(matching(&[format!("project:{ada}")]), Vec::<i64>::new());
        assert_eq!(matching(&["users".into(), format!("project:{p1}")]), vec![1, 3]);
    }

    // --- the actor ------------------------------------------------------------------------

    /// A hub and the sequencer it checks resumes against (numbers from 1).
    struct TestHub {
        addr: Addr<EventHub>,
        sequencer: Arc<Sequencer>,
        _dir: tempfile::TempDir,
    }

    impl std::ops::Deref for TestHub {
        type Target = Addr<EventHub>;
        fn deref(&self) -> &Addr<EventHub> {
            &self.addr
        }
    }

    impl TestHub {
        /// Hands out `n` numbers, as shards do before they report them.
        fn issue(&self, n: usize) {
            for _ in 0..n {
                self.sequencer.allocate().unwrap();
            }
        }
    }

    /// A hub with no shards (replays read nothing) or with one shard that is down.
    fn hub(shard_down: bool) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let sequencer = Arc::new(Sequencer::open(&dir.path().join("seq")).unwrap());
        let keys = std::sync::Arc::new(crate::sealing::SharedKeyring::new(crate::sealing::Keyring::generate()));
        let shards = if shard_down {
            // An address whose actor never runs: every request fails as unavailable.
            let ctx = Context::<crate::actors::shard::ShardActor>::new();
            Shards::new(vec![ctx.address()], keys)
        } else {
            Shards::new(Vec::new(), keys)
        };
        TestHub { addr: EventHub::new(sequencer.clone(), shards).start(), sequencer, _dir: dir }
    }

    struct Sub {
        rx: mpsc::Receiver<HubMessage>,
        ended: oneshot::Receiver<Ended>,
        reply: Subscribed,
    }

    async fn try_subscribe(
        hub: &Addr<EventHub>,
        topics: &[&str],
        since: Option<i64>,
        capacity: usize,
    ) -> Result<Sub, SubscribeError> {
        let (tx, rx) = mpsc::channel(capacity);
        let (ended_tx, ended) = oneshot::channel();
        let filter = Filter::parse(topics).unwrap();
        let reply = hub.send(Subscribe { filter, since, tx, ended: ended_tx, caller: Uuid::nil() }).await.unwrap()?;
        Ok(Sub { rx, ended, reply })
    }

    async fn subscribe(hub: &Addr<EventHub>, topics: &[&str], since: Option<i64>, capacity: usize) -> Sub {
        try_subscribe(hub, topics, since, capacity).await.expect("subscription accepted")
    }

    fn expect_replay_complete(m: Option<HubMessage>) -> i64 {
        match m {
            Some(HubMessage::ReplayComplete { seq }) => seq,
            other => panic!("expected replay_complete, got {other:?}"),
        }
    }

    /// Waits (with a deadline) for the next message.
    async fn next(sub: &mut Sub) -> Option<HubMessage> {
        tokio::time::timeout(Duration::from_secs(5), sub.rx.recv()).await.expect("hub message within 5 s")
    }

    fn seq_of(m: Option<HubMessage>) -> i64 {
        match m {
            Some(HubMessage::Change(e)) => e.seq,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[actix_web::test]
    async fn live_subscribers_get_matching_changes_in_order() {
        let hub = hub(false);
        let mut projects = subscribe(&hub, &["projects"], None, 16).await;
        let mut users = subscribe(&hub, &["users"], None, 16).await;
        assert_eq!(projects.reply.seq, 0);
        assert!(!projects.reply.replaying);
        hub.do_send(C(event(2)));
        hub.do_send(C(event_of(3, Entity::User, Uuid::nil(), Uuid::nil())));
        hub.do_send(V(1..2));
        hub.do_send(C(event(4)));
        assert_eq!(seq_of(next(&mut projects).await), 2);
        assert_eq!(seq_of(next(&mut projects).await), 4);
        assert_eq!(seq_of(next(&mut users).await), 3);
        let stats = hub.send(HubStats).await.unwrap();
        assert_eq!(stats, HubStatus { sessions: 2, seq: 4, pending_reports: 0 });
        hub.send(Unsubscribe(users.reply.id)).await.unwrap();
        assert_eq!(hub.send(HubStats).await.unwrap().sessions, 1);
        // Unsubscribing drops the hub's sender without an `ended` notice.
        assert!(next(&mut users).await.is_none());
        assert!(users.ended.await.is_err());
    }

    #[actix_web::test]
    async fn a_full_channel_drops_the_subscriber_and_says_why() {
        let hub = hub(false);
        let mut slow = subscribe(&hub, &["all"], None, 2).await;
        for seq in 1..=5 {
            hub.do_send(C(event(seq)));
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), &mut slow.ended).await.unwrap();
        assert_eq!(ended, Ok(Ended::Lagged { limit: 2 }));
        // What was queued before the overflow is still there, then nothing more.
        assert_eq!(seq_of(next(&mut slow).await), 1);
        assert_eq!(seq_of(next(&mut slow).await), 2);
        assert!(next(&mut slow).await.is_none());
        assert_eq!(hub.send(HubStats).await.unwrap().sessions, 0);
    }

    #[actix_web::test]
    async fn a_closed_session_is_forgotten() {
        let hub = hub(false);
        let sub = subscribe(&hub, &["all"], None, 4).await;
        drop(sub);
        hub.do_send(C(event(1)));
        assert_eq!(hub.send(HubStats).await.unwrap().sessions, 0);
    }

    #[actix_web::test]
    async fn resuming_ahead_of_the_watermark_skips_what_the_client_has() {
        let hub = hub(false);
        // 1..=3 are handed out but not reported yet: the watermark is still 0.
        hub.issue(3);
        let mut sub = subscribe(&hub, &["all"], Some(2), 4).await;
        assert!(!sub.reply.replaying);
        for seq in 1..=3 {
            hub.do_send(C(event(seq)));
        }
        assert_eq!(expect_replay_complete(next(&mut sub).await), 0);
        assert_eq!(seq_of(next(&mut sub).await), 3);
    }

    #[actix_web::test]
    async fn resuming_at_the_watermark_still_completes_the_replay() {
        let hub = hub(false);
        hub.issue(3);
        for seq in 1..=3 {
            hub.do_send(C(event(seq)));
        }
        let mut sub = subscribe(&hub, &["all"], Some(3), 4).await;
        assert_eq!((sub.reply.seq, sub.reply.replaying), (3, false));
        hub.issue(1);
        hub.do_send(C(event(4)));
        assert_eq!(expect_replay_complete(next(&mut sub).await), 3);
        assert_eq!(seq_of(next(&mut sub).await), 4);
        // Without `since` there is no history, so no replay_complete either.
        let mut live = subscribe(&hub, &["all"], None, 4).await;
        hub.issue(1);
        hub.do_send(C(event(5)));
        assert_eq!(seq_of(next(&mut live).await), 5);
    }

    #[actix_web::test]
    async fn resuming_from_beyond_what_was_issued_is_refused() {
        let hub = hub(false);
        hub.issue(3);
        hub.do_send(V(1..3));
        let refused = try_subscribe(&hub, &["all"], Some(4), 4).await.err();
        assert_eq!(refused, Some(SubscribeError::SinceAhead { since: 4, issued: 3 }));
        assert_eq!(hub.send(HubStats).await.unwrap().sessions, 0);
        // Up to what was issued is fine.
        subscribe(&hub, &["all"], Some(3), 4).await;
    }

    #[actix_web::test]
    async fn resuming_replays_history_then_goes_live() {
        // No shard holds anything, so the replay is empty, but the protocol is the same:
        // `ReplayComplete` at the watermark, then live changes buffered meanwhile.
        let hub = hub(false);
        for seq in 1..=3 {
            hub.do_send(C(event(seq)));
        }
        let mut sub = subscribe(&hub, &["all"], Some(1), 8).await;
        assert_eq!((sub.reply.seq, sub.reply.replaying), (3, true));
        hub.do_send(C(event(4)));
        match next(&mut sub).await {
            Some(HubMessage::ReplayComplete { seq }) => assert_eq!(seq, 3),
            other => panic!("expected replay_complete, got {other:?}"),
        }
        assert_eq!(seq_of(next(&mut sub).await), 4);
        hub.do_send(C(event(5)));
        assert_eq!(seq_of(next(&mut sub).await), 5);
    }

    #[actix_web::test]
    async fn a_failed_replay_ends_the_subscription_with_a_reason() {
        let hub = hub(true);
        hub.do_send(V(1..10));
        let mut sub = subscribe(&hub, &["all"], Some(0), 8).await;
        assert!(sub.reply.replaying);
        let ended = tokio::time::timeout(Duration::from_secs(5), &mut sub.ended).await.unwrap();
        assert_eq!(ended, Ok(Ended::ReplayFailed { reason: "replay unavailable: shard 0 is down; retry".into() }));
        assert!(next(&mut sub).await.is_none());
    }
}
