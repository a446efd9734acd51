use super::*;
use proptest::prelude::*;
use serde_json::json;

const NODES: [&str; 3] = ["n1", "n2", "n3"];
const FIELDS: [&str; 3] = ["name", "description", "tags"];

fn id(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn ctx(node: &str, hlc: u64) -> WriteCtx<'_> {
    WriteCtx { node, hlc, caller: None, if_match: None }
}

fn create(node: &str, hlc: u64) -> RowState {
    let fields = BTreeMap::from([
        ("creator_id".to_owned(), json!(id(9))),
        ("name".to_owned(), json!("start")),
        ("description".to_owned(), json!("")),
        ("tags".to_owned(), json!([])),
        ("created_at".to_owned(), json!("2026-01-01T00:00:00Z")),
    ]);
    let write = Write::Create { entity: Entity::Project, id: id(1), owner: id(9), fields };
    apply_local(None, write, &ctx(node, hlc)).unwrap().state
}

fn update(state: &RowState, node: &str, hlc: u64, field: &str, value: Value) -> Applied {
    let write = Write::Update { fields: BTreeMap::from([(field.to_owned(), value)]) };
    apply_local(Some(state), write, &ctx(node, hlc)).unwrap()
}

#[test]
fn a_local_write_bumps_its_own_dot_and_supersedes_the_field() {
    let s = create("n1", 10);
    let a = update(&s, "n1", 11, "name", json!("renamed"));
    assert_eq!(a.state.clock.get("n1"), 2);
    assert_eq!(a.state.value("name"), Some(&json!("renamed")));
    assert_eq!(a.state.stamp("name").unwrap().dot, Dot { node: "n1".into(), counter: 2 });
    assert_eq!(a.state.value("description"), Some(&json!("")));
}

#[test]
fn the_write_rules_refuse_what_they_must() {
    let s = create("n1", 10);
    let other = WriteCtx { caller: Some(id(5)), ..ctx("n1", 11) };
    let upd = Write::Update { fields: BTreeMap::from([("name".to_owned(), json!("x"))]) };
    assert_eq!(apply_local(Some(&s), upd.clone(), &other).unwrap_err(), Refused::Forbidden("project"));
    let stale = WriteCtx { if_match: Some("\"nope\""), ..ctx("n1", 11) };
    assert_eq!(apply_local(Some(&s), upd.clone(), &stale).unwrap_err(), Refused::PreconditionFailed);
    let tag = s.clock.etag();
    let fresh = WriteCtx { if_match: Some(&tag), ..ctx("n1", 11) };
    assert!(apply_local(Some(&s), upd.clone(), &fresh).is_ok());
    assert_eq!(apply_local(None, upd.clone(), &ctx("n1", 11)).unwrap_err(), Refused::NotFound("row"));
    let gone = apply_local(Some(&s), Write::Delete, &ctx("n1", 12)).unwrap().state;
    assert!(gone.is_deleted());
    assert_eq!(apply_local(Some(&gone), upd, &ctx("n1", 13)).unwrap_err(), Refused::NotFound("row"));
    let bad = Write::Update { fields: BTreeMap::from([("owner".to_owned(), json!("x"))]) };
    assert!(matches!(apply_local(Some(&s), bad, &ctx("n1", 11)), Err(Refused::Malformed(_))));
}

#[test]
fn concurrent_edits_of_different_fields_both_survive() {
    let base = create("n1", 10);
    let a = update(&base, "n1", 20, "name", json!("from n1")).state;
    let b = update(&base, "n2", 21, "description", json!("from n2")).state;
    let m = merge(Some(&a), &b).unwrap();
    assert_eq!(m.outcome, Outcome::Merged);
    assert_eq!(m.state.value("name"), Some(&json!("from n1")));
    assert_eq!(m.state.value("description"), Some(&json!("from n2")));
    assert!(m.opened.is_empty() && m.state.conflicts().is_empty());
}

#[test]
fn concurrent_edits_of_one_field_are_a_conflict_won_by_the_highest_stamp() {
    let base = create("n1", 10);
    let a = update(&base, "n1", 20, "name", json!("older")).state;
    let b = update(&base, "n2", 30, "name", json!("newer")).state;
    for (x, y) in [(&a, &b), (&b, &a)] {
        let m = merge(Some(x), y).unwrap();
        assert_eq!(m.state.value("name"), Some(&json!("newer")));
        let c = m.state.conflicts();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].loser.value, json!("older"));
        assert_eq!(m.opened.len(), 1);
    }
    // The owner writes the value they want: the conflict is resolved, and so it is
    // wherever that write arrives.
    let merged = merge(Some(&a), &b).unwrap().state;
    let fixed = update(&merged, "n1", 40, "name", json!("chosen"));
    assert_eq!(fixed.resolved.len(), 1);
    let elsewhere = merge(Some(&merge(Some(&b), &a).unwrap().state), &fixed.state).unwrap();
    assert_eq!(elsewhere.outcome, Outcome::Applied);
    assert_eq!(elsewhere.resolved.len(), 1);
    assert!(elsewhere.state.conflicts().is_empty());
}

#[test]
fn a_delete_wins_over_a_concurrent_update() {
    let base = create("n1", 10);
    let deleted = apply_local(Some(&base), Write::Delete, &ctx("n1", 20)).unwrap().state;
    let updated = update(&base, "n2", 30, "name", json!("edited")).state;
    assert!(merge(Some(&deleted), &updated).unwrap().state.is_deleted());
    assert!(merge(Some(&updated), &deleted).unwrap().state.is_deleted());
}

#[test]
fn older_or_equal_states_change_nothing() {
    let base = create("n1", 10);
    let newer = update(&base, "n1", 11, "name", json!("x")).state;
    assert_eq!(merge(Some(&newer), &base).unwrap().outcome, Outcome::Stale);
    assert_eq!(merge(Some(&newer), &newer).unwrap().outcome, Outcome::Stale);
    assert_eq!(merge(Some(&base), &newer).unwrap().outcome, Outcome::Applied);
}

#[test]
fn malformed_states_are_refused() {
    let mut s = create("n1", 10);
    s.fields.insert("owner".into(), s.fields["name"].clone());
    assert!(matches!(merge(None, &s), Err(Refused::Malformed(_))));
    let mut s = create("n1", 10);
    s.fields.get_mut("name").unwrap()[0].stamp.dot.counter = 7;
    assert!(matches!(merge(None, &s), Err(Refused::Malformed(_))));
    let mut s = create("n1", 10);
    let extra = Sibling { stamp: s.fields["deleted"][0].stamp.clone(), value: json!(true) };
    s.fields.get_mut("deleted").unwrap().push(extra);
    assert!(matches!(merge(None, &s), Err(Refused::Malformed(_))));
    let other = create("n1", 10);
    let mut moved = other.clone();
    moved.owner = id(3);
    assert!(matches!(merge(Some(&other), &moved), Err(Refused::Malformed(_))));
}

#[test]
fn hlc_times_read_as_utc() {
    let t = chrono::DateTime::parse_from_rfc3339("2026-12-02T15:00:00.123456Z").unwrap();
    let hlc = ((t.timestamp() as u64) << 32) | (((t.timestamp_subsec_nanos() as u128) << 32) / 1_000_000_000) as u64;
    // NTP64 fractions are not exact in microseconds: within one.
    let back = hlc_datetime(hlc + 5000);
    assert!((back - t.with_timezone(&chrono::Utc)).num_microseconds().unwrap().abs() <= 1);
}

/// One step of a random history: a node writes a field, deletes, or takes another
/// node's state.
#[derive(Debug, Clone)]
enum Step {
    Write { node: usize, field: usize, value: u8 },
    Delete { node: usize },
    Sync { from: usize, to: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..3usize, 0..3usize, 0..4u8).prop_map(|(node, field, value)| Step::Write { node, field, value }),
        1 => (0..3usize).prop_map(|node| Step::Delete { node }),
        4 => (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
    ]
}

/// Runs a history; returns every state any node held (the messages a network carries).
fn run(steps: &[Step]) -> Vec<RowState> {
    let mut nodes: Vec<Option<RowState>> = vec![Some(create("n1", 1)), None, None];
    let mut hlc = [1u64, 0, 0];
    let mut seen = vec![nodes[0].clone().unwrap()];
    for s in steps {
        match *s {
            Step::Write { node, field, value } => {
                let Some(state) = nodes[node].as_ref().filter(|s| !s.is_deleted()) else { continue };
                hlc[node] = hlc[node].max(state.last_hlc()) + 1;
                let next = update(state, NODES[node], hlc[node], FIELDS[field], json!(value)).state;
                nodes[node] = Some(next);
            }
            Step::Delete { node } => {
                let Some(state) = nodes[node].as_ref().filter(|s| !s.is_deleted()) else { continue };
                hlc[node] = hlc[node].max(state.last_hlc()) + 1;
                let write = apply_local(Some(state), Write::Delete, &ctx(NODES[node], hlc[node]));
                nodes[node] = Some(write.unwrap().state);
            }
            Step::Sync { from, to } => {
                let Some(incoming) = nodes[from].clone() else { continue };
                let merged = merge(nodes[to].as_ref(), &incoming).unwrap().state;
                nodes[to] = Some(merged);
            }
        }
        seen.extend(nodes.iter().flatten().cloned());
    }
    seen
}

fn replay(messages: &[RowState], order: &[usize]) -> RowState {
    let mut state: Option<RowState> = None;
    for &i in order {
        state = Some(merge(state.as_ref(), &messages[i % messages.len()]).unwrap().state);
    }
    // Every message at least once (duplicates come from `order`).
    for m in messages {
        state = Some(merge(state.as_ref(), m).unwrap().state);
    }
    state.unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Convergence: every order of every message, with duplicates, gives the same row
    /// and the same conflicts.
    #[test]
    fn replicas_converge_whatever_the_order(
        steps in prop::collection::vec(step(), 0..40),
        orders in prop::collection::vec(prop::collection::vec(0..1000usize, 0..60), 2..5),
    ) {
        let messages = run(&steps);
        let results: Vec<RowState> = orders.iter().map(|o| replay(&messages, o)).collect();
        for r in &results[1..] {
            prop_assert_eq!(r, &results[0]);
            prop_assert_eq!(r.conflicts(), results[0].conflicts());
            prop_assert_eq!(r.digest(), results[0].digest());
        }
    }

    /// The join is idempotent and commutative on any two states of a history.
    #[test]
    fn merge_laws(steps in prop::collection::vec(step(), 0..30), i in 0..1000usize, j in 0..1000usize) {
        let messages = run(&steps);
        let (a, b) = (&messages[i % messages.len()], &messages[j % messages.len()]);
        let ab = merge(Some(a), b).unwrap().state;
        let ba = merge(Some(b), a).unwrap().state;
        prop_assert_eq!(&ab, &ba);
        prop_assert_eq!(&merge(Some(&ab), a).unwrap().state, &ab);
        prop_assert_eq!(merge(Some(&ab), b).unwrap().outcome, Outcome::Stale);
    }

    /// Equal clocks mean equal states: the digest names a version.
    #[test]
    fn equal_clocks_mean_equal_states(steps in prop::collection::vec(step(), 0..30)) {
        let messages = run(&steps);
        for a in &messages {
            for b in &messages {
                if a.clock.compare(&b.clock) == crate::vclock::Causality::Equal {
                    prop_assert_eq!(a, b);
                }
            }
        }
    }
}
