//! The group state machine's behaviour, case by case, then a model test: random runs of
//! joins, leaves, deliveries, acks, naks, terms, retention, erasure, seeks, snapshots and
//! restarts with 1–3 members, checking the guarantees of SPEC §4.3 after every step.
//! Property cases are capped (PROPTEST_CASES, default 256) so CI time stays bounded.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use proptest::prelude::*;

use super::*;
use crate::events::time::Micros;

const ACK_WAIT: Micros = 1_000;

fn group_with(ordering: Ordering, limits: Limits) -> Group {
    let config = GroupConfig::new(GroupFilter::default(), ordering, ACK_WAIT).unwrap();
    Group::create(GroupName::parse("workers").unwrap(), config, 0, 1, limits)
}

fn unordered() -> Group {
    group_with(Ordering::Unordered, Limits::default())
}

/// Candidates for sequences `from..to`, users cycling through `users`.
fn events(from: u64, to: u64, users: &[&str]) -> Vec<Candidate> {
    (from..to)
        .map(|sequence| Candidate {
            sequence,
            user: Arc::from(users[(sequence as usize) % users.len()]),
        })
        .collect()
}

fn scan(candidates: &[Candidate]) -> Scan<'_> {
    Scan {
        matching: candidates,
        end: candidates.last().map_or(0, |c| c.sequence + 1),
    }
}

fn sequences(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(|d| d.sequence).collect()
}

#[test]
fn group_names_follow_the_pattern() {
    for good in ["a", "billing.v2", "A-b_c.9", &"x".repeat(64)] {
        assert!(GroupName::parse(good).is_ok(), "{good}");
    }
    for bad in ["", "has space", "slash/", "star*", "é", &"x".repeat(65)] {
        let error = GroupName::parse(bad).unwrap_err();
        assert!(error.to_string().contains("[A-Za-z0-9._-]"), "{error}");
    }
}

#[test]
fn a_later_open_with_another_definition_names_the_difference() {
    let group = unordered();
    let same = GroupConfig::new(GroupFilter::default(), Ordering::Unordered, 7).unwrap();
    assert_eq!(group.check_open(&same), Ok(()), "ack_wait is not compared");

    let types = GroupFilter::new(&[1], vec![], vec![]).unwrap();
    let other = GroupConfig::new(types, Ordering::Unordered, 0).unwrap();
    let error = group.check_open(&other).unwrap_err().to_string();
    assert_eq!(
        error,
        "consumer group workers exists with event_types [] (all), this open asks for \
         [EVENT_TYPE_RECORD_CHANGE]"
    );

    let users = GroupFilter::new(&[], vec!["u2".into(), "u1".into()], vec![]).unwrap();
    let other = GroupConfig::new(users, Ordering::Unordered, 0).unwrap();
    let error = group.check_open(&other).unwrap_err().to_string();
    assert!(error.contains("application_user_ids [] (all), this open asks for [u1, u2]"));

    let per_user = GroupConfig::new(GroupFilter::default(), Ordering::PerUser, 0).unwrap();
    let error = group.check_open(&per_user).unwrap_err().to_string();
    assert!(error.contains(
        "ordering CONSUME_ORDERING_UNSPECIFIED, this open asks for CONSUME_ORDERING_PER_USER"
    ));
}

#[test]
fn definitions_are_validated() {
    let filter = GroupFilter::default();
    let config = GroupConfig::new(filter.clone(), Ordering::Unordered, 0).unwrap();
    assert_eq!(config.ack_wait, DEFAULT_ACK_WAIT);
    assert_eq!(
        GroupConfig::new(filter, Ordering::Unordered, -1),
        Err(GroupError::NegativeDuration("ack_wait"))
    );
    assert!(
        GroupFilter::new(&[0], vec![], vec![]).is_err(),
        "unspecified type"
    );
    assert!(
        GroupFilter::new(&[99], vec![], vec![]).is_err(),
        "unknown type"
    );
    assert_eq!(Ordering::from_proto(1), Ok(Ordering::PerUser));
    assert_eq!(Ordering::from_proto(7), Err(GroupError::InvalidOrdering(7)));
}

#[test]
fn max_in_flight_caps_deliveries_exactly() {
    let mut group = unordered();
    let all = events(1, 200, &["a"]);
    let member = group.join(0).unwrap();
    let got = group.next_deliveries(member, 0, scan(&all)).unwrap();
    assert_eq!(got.len(), DEFAULT_MAX_IN_FLIGHT as usize, "0 means 64");
    assert_eq!(
        group.read_cursor(),
        65,
        "the cursor stops at the first event not taken"
    );
    assert!(
        group
            .next_deliveries(member, 0, scan(&all))
            .unwrap()
            .is_empty()
    );

    group.ack(member, &[1, 2, 3]).unwrap();
    let got = group.next_deliveries(member, 0, scan(&all[64..])).unwrap();
    assert_eq!(sequences(&got), [65, 66, 67]);

    assert_eq!(
        group.join(1025),
        Err(GroupError::MaxInFlightTooLarge {
            requested: 1025,
            limit: 1024
        })
    );
}

#[test]
fn first_deliveries_go_out_in_sequence_order_and_spread_across_members() {
    let mut group = unordered();
    let (a, b) = (group.join(2).unwrap(), group.join(2).unwrap());
    let all = events(1, 10, &["u"]);
    let to_a = group.next_deliveries(a, 0, scan(&all)).unwrap();
    let to_b = group.next_deliveries(b, 0, scan(&all)).unwrap();
    assert_eq!(sequences(&to_a), [1, 2]);
    assert_eq!(sequences(&to_b), [3, 4]);
    assert!(to_a.iter().chain(&to_b).all(|d| d.attempt == 1));
}

#[test]
fn the_cursor_skips_what_did_not_match_only_when_every_candidate_was_taken() {
    let mut group = unordered();
    let member = group.join(5).unwrap();
    let sparse = vec![
        Candidate {
            sequence: 3,
            user: "u".into(),
        },
        Candidate {
            sequence: 9,
            user: "u".into(),
        },
    ];
    let read = Scan {
        matching: &sparse,
        end: 20,
    };
    assert_eq!(
        sequences(&group.next_deliveries(member, 0, read).unwrap()),
        [3, 9]
    );
    assert_eq!(group.read_cursor(), 20);
    group.ack(member, &[3, 9]).unwrap();
    assert_eq!(group.acked_through(), 19);
}

#[test]
fn a_scan_that_breaks_its_contract_is_refused_before_anything_changes() {
    let mut group = unordered();
    let member = group.join(5).unwrap();
    let mut backwards = events(1, 4, &["u"]);
    backwards.reverse();
    let error = group
        .next_deliveries(member, 0, scan(&backwards))
        .unwrap_err();
    assert!(matches!(error, GroupError::InvalidScan(_)), "{error}");
    let short = Scan {
        matching: &events(1, 4, &["u"]),
        end: 2,
    };
    assert!(group.next_deliveries(member, 0, short).is_err());
    assert_eq!(group.read_cursor(), 1);
    let gone = group.join(1).unwrap();
    group.leave(gone, 0);
    assert_eq!(
        group.next_deliveries(gone, 0, Scan::NONE),
        Err(GroupError::UnknownMember(gone.get()))
    );
}

#[test]
fn acks_settle_move_the_position_and_never_come_back() {
    let mut group = unordered();
    let member = group.join(10).unwrap();
    let all = events(1, 6, &["u"]);
    group.next_deliveries(member, 0, scan(&all)).unwrap();
    assert_eq!(group.ack(member, &[2, 3]).unwrap().applied, 2);
    assert_eq!(group.acked_through(), 0, "1 is still unsettled");
    assert_eq!(group.ack(member, &[1]).unwrap().applied, 1);
    assert_eq!(group.acked_through(), 3);

    // Not in flight for the group: ignored.
    let again = group.ack(member, &[1, 2, 77]).unwrap();
    assert_eq!((again.applied, again.ignored), (0, 3));
    assert_eq!(group.counters().acks, 3);

    // Long past ack_wait, nothing acked comes back.
    let later = group
        .next_deliveries(member, 10 * ACK_WAIT, Scan::NONE)
        .unwrap();
    assert_eq!(sequences(&later), [4, 5]);
    assert!(later.iter().all(|d| d.attempt == 2));
}

#[test]
fn a_nak_redelivers_after_its_delay_with_the_next_attempt() {
    let mut group = unordered();
    let (a, b) = (group.join(1).unwrap(), group.join(1).unwrap());
    let all = events(1, 3, &["u"]);
    assert_eq!(
        sequences(&group.next_deliveries(a, 0, scan(&all)).unwrap()),
        [1]
    );

    assert_eq!(group.nak(b, &[1], 0, 0).unwrap().ignored, 1, "not b's");
    assert_eq!(group.nak(a, &[1], 300, 100).unwrap().applied, 1);
    let early = group.next_deliveries(b, 399, Scan::NONE).unwrap();
    assert!(early.is_empty(), "not before the delay");
    assert_eq!(group.next_wakeup(399), Some(400));
    let due = group.next_deliveries(b, 400, scan(&all)).unwrap();
    assert_eq!(
        due,
        [Delivery {
            sequence: 1,
            attempt: 2
        }],
        "redelivery first"
    );
    assert_eq!(group.counters().naks, 1);
    assert_eq!(group.counters().redeliveries, 1);
    assert_eq!(
        group.nak(a, &[1], -1, 0),
        Err(GroupError::NegativeDuration("nak delay"))
    );
}

#[test]
fn after_ack_wait_another_member_gets_it_and_the_silent_one_stops_receiving() {
    let mut group = unordered();
    let (a, b) = (group.join(1).unwrap(), group.join(1).unwrap());
    let all = events(1, 5, &["u"]);
    group.next_deliveries(a, 0, scan(&all)).unwrap();
    assert_eq!(group.next_wakeup(0), Some(ACK_WAIT));

    let to_b = group.next_deliveries(b, ACK_WAIT, scan(&all[1..])).unwrap();
    assert_eq!(
        to_b,
        [Delivery {
            sequence: 1,
            attempt: 2
        }]
    );
    // a never answered: its room stays used until it does.
    assert_eq!(group.room(a), Ok(0));
    assert!(
        group
            .next_deliveries(a, ACK_WAIT, scan(&all[1..]))
            .unwrap()
            .is_empty()
    );

    // a's late ack still settles the event, which b then holds as stale work.
    assert_eq!(group.ack(a, &[1]).unwrap().applied, 1);
    assert_eq!(group.room(a), Ok(1));
    assert_eq!(group.room(b), Ok(0));
    assert_eq!(group.ack(b, &[1]).unwrap().ignored, 1);
    assert_eq!(group.room(b), Ok(1));
}

#[test]
fn a_members_end_returns_its_deliveries_at_once() {
    let mut group = unordered();
    let (a, b) = (group.join(3).unwrap(), group.join(3).unwrap());
    let all = events(1, 4, &["u"]);
    group.next_deliveries(a, 0, scan(&all)).unwrap();
    assert_eq!(group.leave(a, 5), 3);
    assert_eq!(group.leave(a, 5), 0, "leaving twice is harmless");
    let to_b = group.next_deliveries(b, 5, Scan::NONE).unwrap();
    assert_eq!(sequences(&to_b), [1, 2, 3]);
    assert!(to_b.iter().all(|d| d.attempt == 2));
    assert_eq!(group.members(), 1);
}

#[test]
fn a_term_never_comes_back_and_is_counted() {
    let mut group = unordered();
    let member = group.join(2).unwrap();
    let all = events(1, 3, &["u"]);
    group.next_deliveries(member, 0, scan(&all)).unwrap();
    assert_eq!(group.term(member, &[1]).unwrap().applied, 1);
    let later = group
        .next_deliveries(member, 5 * ACK_WAIT, Scan::NONE)
        .unwrap();
    assert_eq!(sequences(&later), [2]);
    assert_eq!(group.counters().terminated, 1);
}

#[test]
fn per_user_ordering_keeps_one_event_per_user_out_and_lets_others_pass() {
    let mut group = group_with(Ordering::PerUser, Limits::default());
    let (a, b) = (group.join(5).unwrap(), group.join(5).unwrap());
    // Sequences 1..=6 for users x, y, x, y, x, y.
    let all = events(1, 7, &["y", "x"]);
    let to_a = group.next_deliveries(a, 0, scan(&all)).unwrap();
    assert_eq!(sequences(&to_a), [1, 2], "one per user, the rest queued");
    assert!(group.next_deliveries(b, 0, Scan::NONE).unwrap().is_empty());

    // x's next (3) goes out only after 1 is settled, and to whoever has room.
    group.nak(a, &[1], 0, 0).unwrap();
    let to_b = group.next_deliveries(b, 0, Scan::NONE).unwrap();
    assert_eq!(
        to_b,
        [Delivery {
            sequence: 1,
            attempt: 2
        }],
        "the nak'd one, not 3"
    );
    group.ack(b, &[1]).unwrap();
    assert_eq!(
        sequences(&group.next_deliveries(b, 0, Scan::NONE).unwrap()),
        [3]
    );
    group.term(a, &[2]).unwrap();
    assert_eq!(
        sequences(&group.next_deliveries(a, 0, Scan::NONE).unwrap()),
        [4]
    );
    assert_eq!(group.stats(0).pending, 4, "3 and 4 out, 5 and 6 queued");
}

#[test]
fn a_full_window_pauses_first_deliveries_but_not_redeliveries() {
    let limits = Limits {
        max_waiting: 2,
        ..Limits::default()
    };
    let mut group = group_with(Ordering::Unordered, limits);
    let member = group.join(10).unwrap();
    let all = events(1, 20, &["u"]);
    group.next_deliveries(member, 0, scan(&all[..3])).unwrap();
    group.nak(member, &[1, 2], 500, 0).unwrap();
    // Two events wait: the window is full, so nothing new is read.
    assert!(
        group
            .next_deliveries(member, 0, scan(&all[3..]))
            .unwrap()
            .is_empty()
    );
    assert_eq!(group.read_cursor(), 4);
    // Once one is settled, reading resumes: what goes out at once does not wait, so it
    // does not fill the window.
    group.term(member, &[1]).unwrap();
    let got = group.next_deliveries(member, 0, scan(&all[3..])).unwrap();
    assert_eq!(
        sequences(&got),
        (4..=12).collect::<Vec<_>>(),
        "the member's room"
    );
    group.ack(member, &[3, 4]).unwrap();
    let due = group
        .next_deliveries(member, 500, scan(&all[12..]))
        .unwrap();
    assert_eq!(
        sequences(&due),
        [2, 13],
        "the redelivery, then the next event"
    );
    assert_eq!(due[0].attempt, 2);
}

#[test]
fn retention_skips_and_counts_what_the_group_had_not_settled() {
    let mut group = unordered();
    let member = group.join(2).unwrap();
    let all = events(1, 10, &["u"]);
    group.next_deliveries(member, 0, scan(&all[..3])).unwrap(); // 1 and 2 out
    group.nak(member, &[1], 0, 0).unwrap(); // 1 waits; 2 in flight
    // Retention removes 1..=5; the backend saw 2 matching unread events among 3..=5
    // (3 was read but not taken: it is unread).
    assert_eq!(group.unread_from(), 3);
    assert_eq!(group.expire_before(6, 3), 4);
    assert_eq!(group.read_cursor(), 6);
    // 2 is still in flight: an ack works, but had it come back it would expire.
    group.nak(member, &[2], 0, 0).unwrap();
    assert_eq!(group.counters().expired, 5);
    assert_eq!(group.acked_through(), 5);
    let got = group.next_deliveries(member, 0, scan(&all[5..])).unwrap();
    assert_eq!(sequences(&got), [6, 7]);
}

#[test]
fn erasure_removes_the_users_pending_work() {
    let mut group = group_with(Ordering::PerUser, Limits::default());
    let member = group.join(10).unwrap();
    let all = events(1, 7, &["gone", "kept"]);
    group.next_deliveries(member, 0, scan(&all)).unwrap();
    assert_eq!(group.erase_user("gone"), 3);
    assert_eq!(group.stats(0).pending, 3);
    // The member keeps the erased event it holds on its count until it answers.
    assert_eq!(group.room(member), Ok(8));
    assert_eq!(group.ack(member, &[2]).unwrap().ignored, 1);
    assert_eq!(group.room(member), Ok(9));
}

#[test]
fn seek_forgets_unsettled_work_and_moves_the_position() {
    let mut group = unordered();
    let member = group.join(3).unwrap();
    let all = events(1, 10, &["u"]);
    group.next_deliveries(member, 0, scan(&all)).unwrap();
    group.seek(8);
    assert_eq!(group.acked_through(), 7);
    assert_eq!(group.ack(member, &[1, 2, 3]).unwrap().ignored, 3);
    let got = group.next_deliveries(member, 0, scan(&all[7..])).unwrap();
    assert_eq!(sequences(&got), [8, 9]);
    assert!(got.iter().all(|d| d.attempt == 1));
}

#[test]
fn a_restart_redelivers_what_was_unsettled_and_skips_what_was_settled() {
    let mut group = unordered();
    let member = group.join(4).unwrap();
    let all = events(1, 10, &["u"]);
    group.next_deliveries(member, 0, scan(&all)).unwrap(); // 1..=4
    group.ack(member, &[1, 3]).unwrap();
    let bytes = group.snapshot();

    let mut restored = Group::restore(&bytes, Limits::default()).unwrap();
    assert_eq!(restored.acked_through(), 1);
    assert_eq!(restored.read_cursor(), 2);
    assert_eq!(
        restored.stats(5).pending,
        2 + 5,
        "2 and 4 unsettled, 5..=9 unread"
    );
    let member = restored.join(10).unwrap();
    let got = restored
        .next_deliveries(member, 0, scan(&all[1..]))
        .unwrap();
    assert_eq!(
        got,
        [
            Delivery {
                sequence: 2,
                attempt: 2
            },
            Delivery {
                sequence: 4,
                attempt: 2
            },
            Delivery {
                sequence: 5,
                attempt: 1
            },
            Delivery {
                sequence: 6,
                attempt: 1
            },
            Delivery {
                sequence: 7,
                attempt: 1
            },
            Delivery {
                sequence: 8,
                attempt: 1
            },
            Delivery {
                sequence: 9,
                attempt: 1
            },
        ]
    );
    assert_eq!(restored.counters().acks, 2);
}

#[test]
fn stats_describe_the_group() {
    let mut group = unordered();
    let (a, _b) = (group.join(2).unwrap(), group.join(2).unwrap());
    let all = events(1, 5, &["u"]);
    group.next_deliveries(a, 0, scan(&all)).unwrap();
    group.ack(a, &[1]).unwrap();
    let stats = group.stats(2);
    assert_eq!(stats.acked_through, 1);
    assert_eq!(stats.pending, 1 + 2, "2 in flight, 3 and 4 unread");
    assert_eq!((stats.in_flight, stats.members), (1, 2));
    assert_eq!(stats.counters.acks, 1);
}

// ---------------------------------------------------------------------------------------
// Model test.

/// One event of the simulated log.
#[derive(Debug, Clone)]
struct LogEntry {
    user: &'static str,
    matching: bool,
}

const USERS: [&str; 3] = ["ann", "bob", "cy"];

#[derive(Debug, Clone)]
enum Op {
    Join(u32),
    Leave(usize),
    Deliver(usize, usize),
    Ack(usize, usize),
    AckUnknown(u64),
    Nak(usize, usize, Micros),
    Term(usize, usize),
    Advance(Micros),
    Trim(u64),
    Erase(usize),
    Seek(u64),
    Snapshot,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let member = 0usize..3;
    prop_oneof![
        2 => (1u32..=3).prop_map(Op::Join),
        1 => member.clone().prop_map(Op::Leave),
        8 => (member.clone(), 1usize..8).prop_map(|(m, page)| Op::Deliver(m, page)),
        6 => (member.clone(), any::<usize>()).prop_map(|(m, k)| Op::Ack(m, k)),
        1 => (0u64..50).prop_map(Op::AckUnknown),
        2 => (member.clone(), any::<usize>(), 0..50i64).prop_map(|(m, k, d)| Op::Nak(m, k, d)),
        1 => (member, any::<usize>()).prop_map(|(m, k)| Op::Term(m, k)),
        3 => (1..60i64).prop_map(Op::Advance),
        1 => (1u64..4).prop_map(Op::Trim),
        1 => (0usize..3).prop_map(Op::Erase),
        1 => (0u64..45).prop_map(Op::Seek),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug)]
struct SimMember {
    id: MemberId,
    max_in_flight: u32,
    /// Deliveries it got and has not answered.
    held: BTreeSet<u64>,
}

/// The last delivery of an event since the last seek or restart.
#[derive(Debug, Clone)]
struct LastDelivery {
    member: MemberId,
    at: Micros,
    /// Its member naked it or left: it may go out again from then on (else only after
    /// its `ack_wait`).
    released: Option<Micros>,
}

/// What the model knows at a snapshot.
#[derive(Debug, Clone)]
struct Saved {
    bytes: Vec<u8>,
    settled: HashSet<u64>,
    attempts: HashMap<u64, u32>,
}

/// A backend and its members driving one group, with a model of what must hold.
struct Sim {
    group: Group,
    log: Vec<LogEntry>,
    limits: Limits,
    ack_wait: Micros,
    per_user: bool,
    now: Micros,
    retained_from: u64,
    erased: HashSet<&'static str>,
    members: Vec<SimMember>,
    /// Largest total max_in_flight of the members present at once.
    peak_room: usize,
    settled: HashSet<u64>,
    last: HashMap<u64, LastDelivery>,
    attempts: HashMap<u64, u32>,
    /// Last first delivery, overall (unordered) or per user.
    first_delivered: HashMap<&'static str, u64>,
    saved: Option<Saved>,
}

impl Sim {
    fn new(log: Vec<LogEntry>, per_user: bool, ack_wait: Micros, max_waiting: usize) -> Self {
        let ordering = if per_user {
            Ordering::PerUser
        } else {
            Ordering::Unordered
        };
        let limits = Limits {
            max_waiting,
            ..Limits::default()
        };
        let config = GroupConfig::new(GroupFilter::default(), ordering, ack_wait).unwrap();
        let name = GroupName::parse("model").unwrap();
        Self {
            group: Group::create(name, config, 0, 1, limits),
            log,
            limits,
            ack_wait,
            per_user,
            now: 0,
            retained_from: 1,
            erased: HashSet::new(),
            members: Vec::new(),
            peak_room: 0,
            settled: HashSet::new(),
            last: HashMap::new(),
            attempts: HashMap::new(),
            first_delivered: HashMap::new(),
            saved: None,
        }
    }

    fn entry(&self, sequence: u64) -> Option<&LogEntry> {
        self.log.get((sequence as usize).checked_sub(1)?)
    }

    /// Whether the event is in the log and the group's business.
    fn live(&self, sequence: u64) -> bool {
        sequence >= self.retained_from
            && self
                .entry(sequence)
                .is_some_and(|e| e.matching && !self.erased.contains(e.user))
    }

    fn end(&self) -> u64 {
        self.log.len() as u64 + 1
    }

    fn matching_unread(&self, from: u64, to: u64) -> u64 {
        (from.max(self.retained_from)..to.min(self.end()))
            .filter(|&s| self.live(s))
            .count() as u64
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Join(max) if self.members.len() < 3 => self.join(max),
            Op::Leave(i) if i < self.members.len() => self.leave(i),
            Op::Deliver(i, page) if i < self.members.len() => self.deliver(i, page)?,
            Op::Ack(i, k) if i < self.members.len() => self.answer(i, k, Answer::Ack)?,
            Op::Term(i, k) if i < self.members.len() => self.answer(i, k, Answer::Term)?,
            Op::Nak(i, k, delay) if i < self.members.len() => {
                self.answer(i, k, Answer::Nak(delay))?
            }
            Op::AckUnknown(sequence) if !self.members.is_empty() => {
                let id = self.members[0].id;
                let settled = self.group.ack(id, &[sequence]).unwrap();
                self.record_settled(sequence, settled.applied == 1)?;
                self.members[0].held.remove(&sequence);
            }
            Op::Advance(by) => self.now += by,
            Op::Trim(by) => self.trim(by),
            Op::Erase(user) => {
                self.erased.insert(USERS[user]);
                self.group.erase_user(USERS[user]);
            }
            Op::Seek(to) => self.seek(to.max(self.retained_from).min(self.end())),
            Op::Snapshot => self.save()?,
            Op::Restart => self.restart(),
            _ => {}
        }
        self.check()
    }

    fn join(&mut self, max_in_flight: u32) {
        let id = self.group.join(max_in_flight).unwrap();
        self.members.push(SimMember {
            id,
            max_in_flight,
            held: BTreeSet::new(),
        });
        let room = self.members.iter().map(|m| m.max_in_flight as usize).sum();
        self.peak_room = self.peak_room.max(room);
    }

    fn leave(&mut self, i: usize) {
        let member = self.members.remove(i);
        self.group.leave(member.id, self.now);
        for last in self.last.values_mut() {
            if last.member == member.id && last.released.is_none() {
                last.released = Some(self.now);
            }
        }
    }

    /// Reads up to `page` log entries from the group's cursor, as a backend would.
    fn deliver(&mut self, i: usize, page: usize) -> Result<(), TestCaseError> {
        let from = self.group.read_cursor().max(self.retained_from);
        let to = (from + page as u64).min(self.end());
        let matching: Vec<Candidate> = (from..to)
            .filter(|&s| self.live(s))
            .map(|sequence| Candidate {
                sequence,
                user: Arc::from(self.log[sequence as usize - 1].user),
            })
            .collect();
        let id = self.members[i].id;
        let read = Scan {
            matching: &matching,
            end: to,
        };
        let deliveries = self.group.next_deliveries(id, self.now, read).unwrap();
        for delivery in deliveries {
            self.check_delivery(i, delivery)?;
        }
        Ok(())
    }

    fn check_delivery(&mut self, i: usize, delivery: Delivery) -> Result<(), TestCaseError> {
        let Delivery { sequence, attempt } = delivery;
        let member = self.members[i].id;
        prop_assert!(
            self.live(sequence),
            "{sequence} handed out but gone or not matching"
        );
        prop_assert!(
            !self.settled.contains(&sequence),
            "settled {sequence} came back"
        );
        if let Some(last) = self.last.get(&sequence) {
            let free_from = last.released.unwrap_or(last.at + self.ack_wait);
            prop_assert!(
                self.now >= free_from,
                "{sequence} out again at {} before {free_from}: two members at once, or \
                 a nak's delay not kept",
                self.now
            );
        }
        let attempts = self.attempts.entry(sequence).or_default();
        prop_assert_eq!(attempt, *attempts + 1, "attempt of {}", sequence);
        *attempts += 1;
        let user = self.log[sequence as usize - 1].user;
        if attempt == 1 {
            let key = if self.per_user { user } else { "" };
            let previous = self.first_delivered.insert(key, sequence);
            prop_assert!(
                previous.is_none_or(|p| p < sequence),
                "first deliveries out of order: {previous:?} then {sequence}"
            );
        }
        if self.per_user {
            self.check_user_order(sequence, user)?;
        }
        self.last.insert(
            sequence,
            LastDelivery {
                member,
                at: self.now,
                released: None,
            },
        );
        let held = &mut self.members[i].held;
        held.insert(sequence);
        prop_assert!(
            held.len() <= self.members[i].max_in_flight as usize,
            "max_in_flight"
        );
        Ok(())
    }

    /// Per-user ordering: when one of a user's events goes out, every earlier one is
    /// settled and no other one is delivered and unsettled.
    fn check_user_order(&self, sequence: u64, user: &str) -> Result<(), TestCaseError> {
        for other in 1..self.end() {
            if other == sequence || self.log[other as usize - 1].user != user {
                continue;
            }
            if !self.live(other) || self.settled.contains(&other) {
                continue;
            }
            prop_assert!(
                other > sequence,
                "{user}: {sequence} before unsettled {other}"
            );
            prop_assert!(
                !self.last.contains_key(&other),
                "{user}: {sequence} and {other} out at once"
            );
        }
        Ok(())
    }

    fn answer(&mut self, i: usize, k: usize, answer: Answer) -> Result<(), TestCaseError> {
        let member = &self.members[i];
        let Some(&sequence) = member.held.iter().nth(k % member.held.len().max(1)) else {
            return Ok(());
        };
        let id = member.id;
        let applied = match answer {
            Answer::Ack => self.group.ack(id, &[sequence]).unwrap().applied == 1,
            Answer::Term => self.group.term(id, &[sequence]).unwrap().applied == 1,
            Answer::Nak(delay) => {
                let applied = self.group.nak(id, &[sequence], delay, self.now).unwrap();
                if applied.applied == 1 {
                    let last = self.last.get_mut(&sequence);
                    prop_assert!(
                        last.as_ref().is_some_and(|l| l.member == id),
                        "nak by non-holder"
                    );
                    if let Some(last) = last {
                        last.released = Some(self.now + delay);
                    }
                }
                false
            }
        };
        self.members[i].held.remove(&sequence);
        self.record_settled(sequence, applied)
    }

    fn record_settled(&mut self, sequence: u64, applied: bool) -> Result<(), TestCaseError> {
        if applied {
            prop_assert!(
                self.last.contains_key(&sequence),
                "settled {sequence}, never delivered"
            );
            prop_assert!(self.settled.insert(sequence), "settled {sequence} twice");
        }
        Ok(())
    }

    fn trim(&mut self, by: u64) {
        let oldest = (self.retained_from + by).min(self.end());
        let unread = self.matching_unread(self.group.unread_from(), oldest);
        self.retained_from = oldest;
        self.group.expire_before(oldest, unread);
    }

    fn seek(&mut self, position: u64) {
        self.group.seek(position);
        self.settled = (1..position).collect();
        self.last.clear();
        self.attempts.clear();
        self.first_delivered.clear();
    }

    fn save(&mut self) -> Result<(), TestCaseError> {
        let bytes = self.group.snapshot();
        let restored = Group::restore(&bytes, self.limits).unwrap();
        prop_assert_eq!(&restored.snapshot(), &bytes, "snapshot round trip");
        self.saved = Some(Saved {
            bytes,
            settled: self.settled.clone(),
            attempts: self.attempts.clone(),
        });
        Ok(())
    }

    /// A crash: every member is gone and the group comes back from the last snapshot
    /// (or from scratch, as its creation is durable, when there is none).
    fn restart(&mut self) {
        let Some(saved) = self.saved.clone() else {
            return;
        };
        self.group = Group::restore(&saved.bytes, self.limits).unwrap();
        self.group.expire_before(self.retained_from, 0);
        self.members.clear();
        self.settled = saved.settled;
        self.attempts = saved.attempts;
        self.last.clear();
        self.first_delivered.clear();
    }

    fn check(&self) -> Result<(), TestCaseError> {
        self.group.check_invariants();
        for member in &self.members {
            let room = member.max_in_flight as usize - member.held.len();
            prop_assert_eq!(self.group.room(member.id).unwrap(), room, "room");
        }
        let unsettled = self.group.stats(0).pending as usize;
        prop_assert!(
            unsettled <= self.limits.max_waiting + self.peak_room,
            "{unsettled} unsettled events over the bound"
        );
        let through = self.group.acked_through();
        for sequence in 1..=through.min(self.end() - 1) {
            prop_assert!(
                !self.live(sequence) || self.settled.contains(&sequence),
                "acked_through {through} passed unsettled {sequence}"
            );
        }
        Ok(())
    }

    /// Members that ack everything: every event of the log ends settled or expired.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..500 {
            if self.members.is_empty() {
                self.join(3);
            }
            self.now += self.ack_wait + 60;
            for i in 0..self.members.len() {
                self.deliver(i, 16)?;
                let held: Vec<u64> = self.members[i].held.iter().copied().collect();
                for sequence in held {
                    let applied = self.group.ack(self.members[i].id, &[sequence]).unwrap();
                    self.record_settled(sequence, applied.applied == 1)?;
                    self.members[i].held.remove(&sequence);
                }
            }
            self.check()?;
            let unread = self.matching_unread(self.group.unread_from(), self.end());
            if self.group.stats(unread).pending == 0 && self.group.read_cursor() >= self.end() {
                break;
            }
        }
        let unread = self.matching_unread(self.group.unread_from(), self.end());
        prop_assert_eq!(
            self.group.stats(unread).pending,
            0,
            "work left after draining"
        );
        for sequence in 1..self.end() {
            prop_assert!(
                !self.live(sequence) || self.settled.contains(&sequence),
                "{sequence} never settled"
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Ack,
    Term,
    Nak(Micros),
}

fn log_entries() -> impl Strategy<Value = Vec<LogEntry>> {
    proptest::collection::vec(
        (0usize..3, proptest::bool::weighted(0.8)).prop_map(|(user, matching)| LogEntry {
            user: USERS[user],
            matching,
        }),
        1..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn every_run_keeps_the_guarantees_and_loses_nothing(
        log in log_entries(),
        per_user in any::<bool>(),
        ack_wait in 20..100i64,
        max_waiting in 1usize..6,
        ops in proptest::collection::vec(op(), 0..150),
    ) {
        let mut sim = Sim::new(log, per_user, ack_wait, max_waiting);
        for op in &ops {
            sim.apply(op)?;
        }
        sim.drain()?;
    }
}
