//! One consumer group's state: its read cursor, its unsettled events and its members.
//!
//! Every event the group has read (sequence below `cursor`) is either settled (acked,
//! termed, expired, erased, or not matching the filter) or *unsettled*, an entry of
//! `outstanding`: queued behind its user (per-user ordering), waiting for a redelivery,
//! or in flight to one member. So the group's position, `acked_through`, is just below
//! its first unsettled event, and no set of acked sequences is kept: what is settled is
//! everything read that is not outstanding. After a restart from a snapshot, `replay`
//! holds the events unsettled when it was taken, until the cursor has read past them.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{
    config::{DEFAULT_MAX_IN_FLIGHT, GroupConfig, GroupError, GroupName, Limits, Ordering},
    ordering::Lanes,
    sorted::{Deadlines, SortedQueue},
};
use crate::events::time::Micros;

/// A member of one group, as [`Group::join`] numbered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberId(u64);

impl MemberId {
    pub fn get(self) -> u64 {
        self.0
    }

    /// A member numbered by a backend that keeps no [`Group`] (NATS: JetStream keeps it).
    pub(crate) fn numbered(id: u64) -> Self {
        Self(id)
    }
}

/// A matching event the backend read at or after the group's [`Group::read_cursor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub sequence: u64,
    /// Its `application_user_id`: per-user ordering and erasure need it.
    pub user: Arc<str>,
}

/// What the backend read for one [`Group::next_deliveries`]: it looked at every log entry
/// from [`Group::read_cursor`] up to `end` (exclusive), and `matching` are those that
/// match the group's filter, in strictly increasing sequence order. Candidates below the
/// cursor (a stale buffer) are skipped; the cursor advances to `end` only when every
/// candidate was taken, so the backend keeps the rest for the next call.
#[derive(Debug, Clone, Copy)]
pub struct Scan<'a> {
    pub matching: &'a [Candidate],
    pub end: u64,
}

impl Scan<'_> {
    /// Nothing read: only redeliveries and queued events can go out.
    pub const NONE: Scan<'static> = Scan {
        matching: &[],
        end: 0,
    };

    fn validate(&self) -> Result<(), GroupError> {
        if let Some(pair) = self
            .matching
            .windows(2)
            .find(|pair| pair[0].sequence >= pair[1].sequence)
        {
            return Err(GroupError::InvalidScan(format!(
                "candidates out of order: {} before {}",
                pair[0].sequence, pair[1].sequence
            )));
        }
        match self.matching.last() {
            Some(last) if self.end <= last.sequence => Err(GroupError::InvalidScan(format!(
                "end {} is not past the last candidate {}",
                self.end, last.sequence
            ))),
            _ => Ok(()),
        }
    }
}

/// One event for one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub sequence: u64,
    /// 1 on the first delivery to the group, then one more per redelivery.
    pub attempt: u32,
}

/// What one ack, nak or term message did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub applied: usize,
    /// Sequences not in flight for the group (or, for a nak, not to this member).
    pub ignored: usize,
}

/// The group's counters; durable, in the snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub acks: u64,
    pub naks: u64,
    /// Deliveries with an attempt above 1.
    pub redeliveries: u64,
    pub terminated: u64,
    /// Events removed by retention before the group settled them.
    pub expired: u64,
}

/// One row of `ListConsumerGroups` (SPEC §4.4), less what the group's config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStats {
    /// Every matching event up to it is settled.
    pub acked_through: u64,
    /// Matching events after `acked_through` not yet settled.
    pub pending: u64,
    pub in_flight: u64,
    pub members: u64,
    pub counters: Counters,
}

/// The durable part of a group: what a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Durable {
    pub name: GroupName,
    pub config: GroupConfig,
    pub created_at: Micros,
    /// Every event below it was read; those not in `unsettled` are settled.
    pub read_position: u64,
    /// Unsettled events below `read_position`, with the attempts made so far.
    pub unsettled: BTreeMap<u64, u32>,
    pub counters: Counters,
}

#[derive(Debug)]
struct Pending {
    user: Arc<str>,
    /// Deliveries so far.
    attempts: u32,
    state: PendingState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingState {
    /// Read, never delivered: behind an earlier event of its user (per-user ordering).
    Queued,
    /// Delivered before; goes out again at `due`.
    Waiting {
        due: Micros,
    },
    InFlight {
        member: MemberId,
        deadline: Micros,
    },
}

#[derive(Debug)]
struct Member {
    max_in_flight: u32,
    /// Events in flight to this member.
    in_flight: u32,
    /// Events this member was given that the group took back while the member may still
    /// be working on them (`ack_wait` passed, erasure, seek, another member's ack). They
    /// count against its `max_in_flight` until it acks, naks or terms them, so a member
    /// that stops acking stops receiving. At most `max_in_flight` of them.
    stale: BTreeSet<u64>,
}

impl Member {
    fn room(&self) -> usize {
        (self.max_in_flight as usize).saturating_sub(self.in_flight as usize + self.stale.len())
    }
}

/// After a restart: the events that were unsettled when the snapshot was taken.
#[derive(Debug, Default)]
struct Replay {
    /// The snapshot's read position; reading below it consults `unsettled`.
    until: u64,
    unsettled: BTreeMap<u64, u32>,
}

/// What the group knew of a candidate before its restart.
enum Known {
    /// Read after the snapshot's read position (or no restart): a first delivery.
    New,
    /// Settled before the snapshot: skipped.
    Settled,
    /// Unsettled at the snapshot, after this many attempts.
    Unsettled(u32),
}

impl Replay {
    fn take(&mut self, sequence: u64) -> Known {
        if sequence >= self.until {
            return Known::New;
        }
        self.unsettled
            .remove(&sequence)
            .map_or(Known::Settled, Known::Unsettled)
    }

    /// Forgets the events below `cursor`: the backend read past them without finding
    /// them, so they left the log (erased or expired). Returns how many.
    fn trim_below(&mut self, cursor: u64) -> u64 {
        let kept = self.unsettled.split_off(&cursor);
        std::mem::replace(&mut self.unsettled, kept).len() as u64
    }
}

/// Whether `sequence` is in flight with this `deadline` (else its deadline entry is stale).
fn holds_until(outstanding: &SortedQueue<Pending>, sequence: u64, deadline: Micros) -> bool {
    outstanding.get(sequence).is_some_and(
        |p| matches!(p.state, PendingState::InFlight { deadline: d, .. } if d == deadline),
    )
}

/// One consumer group: pure state, driven by a backend that reads the log, keeps the time
/// and talks to the members. See the module docs of [`super`].
#[derive(Debug)]
pub struct Group {
    name: GroupName,
    config: GroupConfig,
    created_at: Micros,
    limits: Limits,
    /// The next sequence to read for first deliveries.
    cursor: u64,
    replay: Replay,
    /// Every unsettled event below `cursor`. Bounded: see the module docs. Inserted in
    /// sequence order (at the cursor), hence a sorted queue rather than a B-tree.
    outstanding: SortedQueue<Pending>,
    /// `InFlight` entries by deadline, for `ack_wait` expiry. Set in time order (one
    /// `ack_wait` per group), hence a queue; its front is always in flight.
    deadlines: Deadlines,
    /// `Waiting` entries by due time: redeliveries, earliest first.
    due: BTreeSet<(Micros, u64)>,
    /// Per-user ordering only; empty otherwise.
    lanes: Lanes,
    members: BTreeMap<MemberId, Member>,
    next_member: u64,
    /// Events below it are gone from the log: an in-flight one that comes back expires.
    retained_from: u64,
    /// Number of `InFlight` entries.
    in_flight: usize,
    counters: Counters,
    /// Bumped by every change of the durable part.
    changes: u64,
}

impl Group {
    /// A new group whose first delivery is the first matching event at or after
    /// `position` (the backend resolves the open's start to it).
    pub fn create(
        name: GroupName,
        config: GroupConfig,
        created_at: Micros,
        position: u64,
        limits: Limits,
    ) -> Self {
        Self::from_durable(
            Durable {
                name,
                config,
                created_at,
                read_position: position,
                unsettled: BTreeMap::new(),
                counters: Counters::default(),
            },
            limits,
        )
    }

    /// A group restored from its durable part: reading starts again at its first unsettled
    /// event, skipping those settled before.
    pub(super) fn from_durable(durable: Durable, limits: Limits) -> Self {
        let cursor = durable
            .unsettled
            .first_key_value()
            .map_or(durable.read_position, |(&first, _)| first);
        Self {
            name: durable.name,
            config: durable.config,
            created_at: durable.created_at,
            limits,
            cursor,
            replay: Replay {
                until: durable.read_position,
                unsettled: durable.unsettled,
            },
            outstanding: SortedQueue::default(),
            deadlines: Deadlines::default(),
            due: BTreeSet::new(),
            lanes: Lanes::default(),
            members: BTreeMap::new(),
            next_member: 1,
            retained_from: 0,
            in_flight: 0,
            counters: durable.counters,
            changes: 0,
        }
    }

    pub(super) fn durable(&self) -> Durable {
        let mut unsettled = self.replay.unsettled.clone();
        unsettled.extend(self.outstanding.iter().map(|(s, p)| (s, p.attempts)));
        Durable {
            name: self.name.clone(),
            config: self.config.clone(),
            created_at: self.created_at,
            read_position: self.unread_from(),
            unsettled,
            counters: self.counters,
        }
    }

    pub fn name(&self) -> &GroupName {
        &self.name
    }

    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    pub fn created_at(&self) -> Micros {
        self.created_at
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Bumped by every change of what [`Group::snapshot`] holds: a backend persists when
    /// it moved (in batches, say once a second).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// A later open of this group: `FAILED_PRECONDITION` when its filter or ordering
    /// differs; its start and `ack_wait` are ignored.
    pub fn check_open(&self, requested: &GroupConfig) -> Result<(), GroupError> {
        match self.config.difference(requested) {
            None => Ok(()),
            Some(difference) => Err(GroupError::Mismatch {
                group: self.name.to_string(),
                difference,
            }),
        }
    }

    fn per_user(&self) -> bool {
        self.config.ordering == Ordering::PerUser
    }

    /// A new member holding at most `max_in_flight` unacked deliveries (0 = 64, or the
    /// limit when that is lower).
    pub fn join(&mut self, max_in_flight: u32) -> Result<MemberId, GroupError> {
        let max_in_flight = match max_in_flight {
            0 => DEFAULT_MAX_IN_FLIGHT.min(self.limits.max_in_flight).max(1),
            n if n > self.limits.max_in_flight => {
                return Err(GroupError::MaxInFlightTooLarge {
                    requested: n,
                    limit: self.limits.max_in_flight,
                });
            }
            n => n,
        };
        let id = MemberId(self.next_member);
        self.next_member += 1;
        self.members.insert(
            id,
            Member {
                max_in_flight,
                in_flight: 0,
                stale: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    /// The member's stream ended: what it held is due again at once, with its attempt
    /// count kept. Returns how many went back; leaving twice is harmless.
    pub fn leave(&mut self, member: MemberId, now: Micros) -> usize {
        if self.members.remove(&member).is_none() {
            return 0;
        }
        let held: Vec<u64> = self
            .outstanding
            .iter()
            .filter(
                |(_, p)| matches!(p.state, PendingState::InFlight { member: m, .. } if m == member),
            )
            .map(|(sequence, _)| sequence)
            .collect();
        for &sequence in &held {
            self.release_in_flight(sequence, false);
            self.requeue(sequence, now);
        }
        held.len()
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// How many more deliveries `member` may take now.
    pub fn room(&self, member: MemberId) -> Result<usize, GroupError> {
        self.members
            .get(&member)
            .map(Member::room)
            .ok_or(GroupError::UnknownMember(member.0))
    }

    /// Where the backend reads the next candidates from.
    pub fn read_cursor(&self) -> u64 {
        self.cursor
    }

    /// Where the backend counts the matching events the group has not read, for
    /// [`Group::stats`] and [`Group::expire_before`].
    pub fn unread_from(&self) -> u64 {
        self.cursor.max(self.replay.until)
    }

    /// What `member` gets now, in this order: redeliveries that are due (earliest due
    /// first), events queued behind a user who is free again (per-user ordering), then
    /// first deliveries from `scan` in sequence order; never beyond the member's room.
    /// Expires the deliveries whose `ack_wait` passed first.
    pub fn next_deliveries(
        &mut self,
        member: MemberId,
        now: Micros,
        scan: Scan<'_>,
    ) -> Result<Vec<Delivery>, GroupError> {
        scan.validate()?;
        let mut room = self.room(member)?;
        self.expire_deadlines(now);
        let mut out = Vec::new();
        self.take_redeliveries(member, now, &mut room, &mut out);
        self.take_ready(member, now, &mut room, &mut out);
        self.take_candidates(member, now, &mut room, scan, &mut out);
        Ok(out)
    }

    fn take_redeliveries(
        &mut self,
        member: MemberId,
        now: Micros,
        room: &mut usize,
        out: &mut Vec<Delivery>,
    ) {
        while *room > 0 {
            let Some(&(due, sequence)) = self.due.first() else {
                return;
            };
            if due > now {
                return;
            }
            self.due.pop_first();
            out.extend(self.dispatch(sequence, member, now));
            *room -= 1;
        }
    }

    fn take_ready(
        &mut self,
        member: MemberId,
        now: Micros,
        room: &mut usize,
        out: &mut Vec<Delivery>,
    ) {
        while *room > 0 {
            let Some(sequence) = self.lanes.pop_ready() else {
                return;
            };
            out.extend(self.dispatch(sequence, member, now));
            *room -= 1;
        }
    }

    fn take_candidates(
        &mut self,
        member: MemberId,
        now: Micros,
        room: &mut usize,
        scan: Scan<'_>,
        out: &mut Vec<Delivery>,
    ) {
        for candidate in scan.matching {
            let sequence = candidate.sequence;
            if sequence < self.cursor {
                continue;
            }
            if *room == 0 {
                return self.stop_reading_at(sequence);
            }
            let attempts = match self.replay.take(sequence) {
                Known::Settled => {
                    self.advance_cursor(sequence + 1);
                    continue;
                }
                // Already counted by the window: it was unsettled before the restart.
                Known::Unsettled(attempts) => attempts,
                Known::New if self.held() >= self.limits.max_waiting.max(1) => {
                    return self.stop_reading_at(sequence);
                }
                Known::New => 0,
            };
            self.advance_cursor(sequence + 1);
            self.outstanding.insert(
                sequence,
                Pending {
                    user: candidate.user.clone(),
                    attempts,
                    state: PendingState::Queued,
                },
            );
            if self.per_user() {
                if !self.lanes.is_free(&candidate.user) {
                    self.lanes.enqueue(&candidate.user, sequence);
                    continue;
                }
                self.lanes.activate(&candidate.user, sequence);
            }
            out.extend(self.dispatch(sequence, member, now));
            *room -= 1;
        }
        self.advance_cursor(scan.end);
    }

    /// Unsettled events not in flight: waiting or queued (the window of [`Limits`]).
    fn held(&self) -> usize {
        self.outstanding.len() - self.in_flight
    }

    fn stop_reading_at(&mut self, sequence: u64) {
        self.advance_cursor(sequence);
    }

    fn advance_cursor(&mut self, to: u64) {
        if to > self.cursor {
            self.cursor = to;
            self.replay.trim_below(to);
            self.changes += 1;
        }
    }

    /// Hands the unsettled `sequence` to `member`.
    fn dispatch(&mut self, sequence: u64, member: MemberId, now: Micros) -> Option<Delivery> {
        let pending = self.outstanding.get_mut(sequence)?;
        let deadline = self
            .deadlines
            .push(now.saturating_add(self.config.ack_wait), sequence);
        pending.attempts = pending.attempts.saturating_add(1);
        pending.state = PendingState::InFlight { member, deadline };
        let attempt = pending.attempts;
        if attempt > 1 {
            self.counters.redeliveries += 1;
        }
        if let Some(member) = self.members.get_mut(&member) {
            member.in_flight += 1;
            member.stale.remove(&sequence);
        }
        self.in_flight += 1;
        self.changes += 1;
        Some(Delivery { sequence, attempt })
    }

    /// Takes `sequence` off its member if it is in flight, keeping it on the member's
    /// count (`stale`) when the member may still be working on it. Leaves its entry
    /// `Queued`, in no index, for the caller to requeue or remove.
    fn release_in_flight(&mut self, sequence: u64, still_held: bool) -> bool {
        let Some(pending) = self.outstanding.get_mut(sequence) else {
            return false;
        };
        let PendingState::InFlight { member, .. } = pending.state else {
            return false;
        };
        pending.state = PendingState::Queued;
        self.in_flight -= 1;
        let outstanding = &self.outstanding;
        self.deadlines
            .pop_stale(self.in_flight, |deadline, sequence| {
                holds_until(outstanding, sequence, deadline)
            });
        if let Some(member) = self.members.get_mut(&member) {
            member.in_flight -= 1;
            if still_held {
                member.stale.insert(sequence);
            }
        }
        true
    }

    /// A released delivery waits for its redelivery at `due`, unless retention removed it
    /// meanwhile.
    fn requeue(&mut self, sequence: u64, due: Micros) {
        if sequence < self.retained_from {
            self.remove_entry(sequence, false);
            self.counters.expired += 1;
            return;
        }
        if let Some(pending) = self.outstanding.get_mut(sequence) {
            pending.state = PendingState::Waiting { due };
            self.due.insert((due, sequence));
            self.changes += 1;
        }
    }

    /// Takes `sequence` out of the group's unsettled work (see [`Group::release_in_flight`]
    /// for `still_held`).
    fn remove_entry(&mut self, sequence: u64, still_held: bool) -> Option<Pending> {
        self.release_in_flight(sequence, still_held);
        let pending = self.outstanding.remove(sequence)?;
        if let PendingState::Waiting { due } = pending.state {
            self.due.remove(&(due, sequence));
        }
        if self.per_user() {
            self.lanes.remove(&pending.user, sequence);
        }
        self.changes += 1;
        Some(pending)
    }

    fn member_mut(&mut self, member: MemberId) -> Result<&mut Member, GroupError> {
        self.members
            .get_mut(&member)
            .ok_or(GroupError::UnknownMember(member.0))
    }

    /// `ack`: processed, never delivered to the group again. Applies to any event the
    /// group delivered and has not settled (in flight to any member, or waiting for a
    /// redelivery after its `ack_wait`): the work is done, whoever did it.
    pub fn ack(&mut self, member: MemberId, sequences: &[u64]) -> Result<Settled, GroupError> {
        let settled = self.settle(member, sequences)?;
        self.counters.acks += settled.applied as u64;
        Ok(settled)
    }

    /// `term`: given up, never delivered again, counted. Applies like [`Group::ack`].
    pub fn term(&mut self, member: MemberId, sequences: &[u64]) -> Result<Settled, GroupError> {
        let settled = self.settle(member, sequences)?;
        self.counters.terminated += settled.applied as u64;
        Ok(settled)
    }

    fn settle(&mut self, member: MemberId, sequences: &[u64]) -> Result<Settled, GroupError> {
        self.member_mut(member)?;
        let mut settled = Settled::default();
        for &sequence in sequences {
            if let Ok(this) = self.member_mut(member) {
                this.stale.remove(&sequence);
            }
            let still_held = match self.outstanding.get(sequence).map(|p| p.state) {
                Some(PendingState::InFlight { member: holder, .. }) => holder != member,
                Some(PendingState::Waiting { .. }) => false,
                // Never delivered, or not the group's: ignored (SPEC §4.3).
                Some(PendingState::Queued) | None => {
                    settled.ignored += 1;
                    continue;
                }
            };
            self.remove_entry(sequence, still_held);
            settled.applied += 1;
        }
        Ok(settled)
    }

    /// `nak`: deliver again, to any member, once `delay` has passed. Applies only to
    /// events in flight to this member: a late nak from a member whose delivery already
    /// went to another must not take it away from that one.
    pub fn nak(
        &mut self,
        member: MemberId,
        sequences: &[u64],
        delay: Micros,
        now: Micros,
    ) -> Result<Settled, GroupError> {
        if delay < 0 {
            return Err(GroupError::NegativeDuration("nak delay"));
        }
        self.member_mut(member)?;
        let due = now.saturating_add(delay);
        let mut settled = Settled::default();
        for &sequence in sequences {
            if let Ok(this) = self.member_mut(member) {
                this.stale.remove(&sequence);
            }
            match self.outstanding.get(sequence).map(|p| p.state) {
                Some(PendingState::InFlight { member: holder, .. }) if holder == member => {
                    self.release_in_flight(sequence, false);
                    self.requeue(sequence, due);
                    settled.applied += 1;
                }
                _ => settled.ignored += 1,
            }
        }
        self.counters.naks += settled.applied as u64;
        Ok(settled)
    }

    /// Deliveries whose `ack_wait` passed by `now` go back to the group, due at once; their
    /// members keep them on their count until they answer. Returns how many.
    pub fn expire_deadlines(&mut self, now: Micros) -> usize {
        let mut expired = 0;
        while let Some((deadline, sequence)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            // Live (the front always is): releasing it drops it and any stale entry behind.
            self.deadlines.pop_first();
            if self.release_in_flight(sequence, true) {
                self.requeue(sequence, now);
                expired += 1;
            }
        }
        expired
    }

    /// When time alone next changes something: a deadline, or a redelivery coming due
    /// after `now`. Redeliveries already due wait for a member with room, which an ack, a
    /// nak, a term or a join brings, not time.
    pub fn next_wakeup(&self, now: Micros) -> Option<Micros> {
        let deadline = self.deadlines.first().map(|(at, _)| at);
        let due = self
            .due
            .range((now.saturating_add(1), 0)..)
            .next()
            .map(|&(at, _)| at);
        deadline.into_iter().chain(due).min()
    }

    /// Retention removed every event below `oldest_retained`: the unsettled ones the
    /// group holds are skipped (those in flight expire when they come back unacked), and
    /// counted as expired together with `unread_matching`, the matching events from
    /// [`Group::unread_from`] up to `oldest_retained` that the backend removed (0 when it
    /// cannot know). Call it before reading again after a restore. Returns the count.
    pub fn expire_before(&mut self, oldest_retained: u64, unread_matching: u64) -> u64 {
        self.retained_from = self.retained_from.max(oldest_retained);
        let gone: Vec<u64> = self
            .outstanding
            .iter()
            .take_while(|&(sequence, _)| sequence < oldest_retained)
            .filter(|(_, p)| !matches!(p.state, PendingState::InFlight { .. }))
            .map(|(sequence, _)| sequence)
            .collect();
        for &sequence in &gone {
            self.remove_entry(sequence, false);
        }
        let replayed = self.replay.trim_below(oldest_retained);
        self.advance_cursor(oldest_retained);
        let expired = gone.len() as u64 + replayed + unread_matching;
        if expired > 0 {
            self.counters.expired += expired;
            self.changes += 1;
        }
        expired
    }

    /// Erasure of `user`: their unsettled events leave the group (a member holding one
    /// keeps it on its count until it answers). Returns how many.
    pub fn erase_user(&mut self, user: &str) -> usize {
        let gone: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, p)| &*p.user == user)
            .map(|(sequence, _)| sequence)
            .collect();
        for &sequence in &gone {
            self.remove_entry(sequence, true);
        }
        gone.len()
    }

    /// The backend could not hand out a delivery because its event left the log between
    /// [`Group::next_deliveries`] and its read: the group forgets it, counted as expired.
    pub fn discard(&mut self, sequence: u64) -> bool {
        let removed = self.remove_entry(sequence, false).is_some();
        if removed {
            self.counters.expired += 1;
        }
        removed
    }

    /// `SeekConsumerGroup`: reading starts again at `position`; unsettled events are
    /// forgotten (members keep what they hold on their count until they answer; their
    /// answers are then ignored). Counters are kept.
    pub fn seek(&mut self, position: u64) {
        let in_flight: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, p)| matches!(p.state, PendingState::InFlight { .. }))
            .map(|(sequence, _)| sequence)
            .collect();
        for sequence in in_flight {
            self.release_in_flight(sequence, true);
        }
        self.outstanding.clear();
        self.due.clear();
        self.lanes.clear();
        self.replay = Replay::default();
        self.cursor = position;
        self.changes += 1;
    }

    /// Every matching event up to this sequence is settled.
    pub fn acked_through(&self) -> u64 {
        let first_unsettled = [
            self.outstanding.first().map(|(sequence, _)| sequence),
            self.replay.unsettled.keys().next().copied(),
            Some(self.cursor),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.cursor);
        first_unsettled.saturating_sub(1)
    }

    /// The group's row for `ListConsumerGroups`. `matching_unread` is the backend's count
    /// of matching events at or after [`Group::unread_from`].
    pub fn stats(&self, matching_unread: u64) -> GroupStats {
        let known = self.outstanding.len() + self.replay.unsettled.len();
        GroupStats {
            acked_through: self.acked_through(),
            pending: known as u64 + matching_unread,
            in_flight: self.in_flight as u64,
            members: self.members.len() as u64,
            counters: self.counters,
        }
    }
}

#[cfg(test)]
impl Group {
    /// Checks every internal index against `outstanding`, for the model tests.
    pub(super) fn check_invariants(&self) {
        use std::collections::HashMap;
        let mut deadlines = BTreeSet::new();
        let mut due = BTreeSet::new();
        let mut per_member: HashMap<MemberId, u32> = HashMap::new();
        let mut delivered_users = HashMap::new();
        for (sequence, pending) in self.outstanding.iter() {
            assert!(sequence < self.cursor, "{sequence} unsettled but not read");
            match pending.state {
                PendingState::Queued => {
                    assert!(self.per_user(), "queued without per-user ordering")
                }
                PendingState::Waiting { due: at } => {
                    due.insert((at, sequence));
                }
                PendingState::InFlight { member, deadline } => {
                    assert!(self.members.contains_key(&member), "held by a gone member");
                    deadlines.insert((deadline, sequence));
                    *per_member.entry(member).or_default() += 1;
                }
            }
            if pending.state != PendingState::Queued {
                let previous = delivered_users.insert(pending.user.clone(), sequence);
                assert!(
                    !self.per_user() || previous.is_none(),
                    "two delivered events of one user under per-user ordering"
                );
            }
        }
        let live: BTreeSet<(Micros, u64)> = self
            .deadlines
            .entries()
            .filter(|&(d, s)| holds_until(&self.outstanding, s, d))
            .collect();
        assert_eq!(deadlines, live);
        if let Some((deadline, sequence)) = self.deadlines.first() {
            assert!(
                holds_until(&self.outstanding, sequence, deadline),
                "a stale deadline at the front"
            );
        }
        assert_eq!(due, self.due);
        assert_eq!(
            per_member.values().map(|&n| n as usize).sum::<usize>(),
            self.in_flight
        );
        for (id, member) in &self.members {
            assert_eq!(per_member.get(id).copied().unwrap_or(0), member.in_flight);
            assert!(
                member.in_flight as usize + member.stale.len() <= member.max_in_flight as usize
            );
        }
        assert!(
            self.replay
                .unsettled
                .keys()
                .all(|&s| s >= self.cursor && s < self.replay.until)
        );
        if self.per_user() {
            let users = self
                .outstanding
                .iter()
                .map(|(s, p)| (s, p.user.clone()))
                .collect();
            self.lanes.check(&users);
        }
    }
}
