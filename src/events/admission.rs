//! The admission rule the local backends (`memory`, `embedded`) share, written once: dedup
//! within the window, the tip's sequence and `received_at` ([`super::place_at_tip`]), and
//! what erasure takes out of the dedup index. NATS keeps its own (JetStream's msg ids).
//!
//! The dedup index lives in memory. An event id of this release's form (`main-`, `lab-` or
//! `nutrition-` and 32 lowercase hex digits, which also covers 0.1's ids) is held as its
//! 128 bits in a per-prefix [`Compact`] index: the key is the id itself, so a hit is exact
//! by construction, never a hash collision. About 25 bytes per entry (16 of key, a 4-byte
//! slot in a hash table of positions, and one run record per commit); see the README's
//! "Storage". Anything else (dead-letter keys, ids of another form) goes to an exact
//! string map, which is only ever as large as the dead letters of one window.
//!
//! An event's entry is first seen at its stored `received_at`, so an index rebuilt from the
//! log at start-up (embedded) is the same index the running process had.

use std::collections::{HashMap, VecDeque};

use hashbrown::HashTable;

use super::{AppendOutcome, NewEvent, place_at_tip, time::Micros};
use crate::proto::Event;

/// The event-id prefixes of the compact index, one [`Compact`] each.
const PREFIXES: [&str; 3] = ["main", "lab", "nutrition"];
/// Keys per block of a [`Compact`] index's key log: a 64 KiB allocation, so growth never
/// doubles a large buffer and at most one partly used block is wasted.
const BLOCK: usize = 4096;

/// An id of the compact form as (prefix index, its 128 bits); `None` for any other string.
/// Only lowercase hex is taken, so the mapping is one-to-one.
fn compact_key(id: &str) -> Option<(usize, u128)> {
    let (prefix, hex) = id.split_once('-')?;
    let kind = PREFIXES.iter().position(|p| *p == prefix)?;
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if hex.len() != 32 || !hex.bytes().all(lower_hex) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().map(|bits| (kind, bits))
}

/// What the index knows of a key: the sequence (or letter id) first stored under it, and
/// when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hit {
    pub id: u64,
    pub first_seen: Micros,
}

/// A key as the index holds it: a compact id as its prefix (an index of [`PREFIXES`]) and
/// 128 bits, anything else as the string. What a checkpoint stores, so it never re-parses
/// ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Key<'a> {
    Compact(usize, u128),
    Other(&'a str),
}

/// Consecutive positions of a [`Compact`] index remembered at one time with consecutive
/// ids: one per commit, so time and id cost well under a byte per entry.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    first_seen: Micros,
    first_id: u64,
}

/// Exact 128-bit keys in the order they were remembered, with a hash table of their
/// positions. Entries leave from the front as they expire; erasure unindexes a key and
/// leaves its slot to expire.
#[derive(Default)]
struct Compact {
    /// The key log, in blocks of [`BLOCK`]; `front` is the absolute position of the first
    /// slot of the first block, `base` that of the first live entry.
    blocks: VecDeque<Vec<u128>>,
    front: u64,
    base: u64,
    /// Absolute positions (low 32 bits; fewer than 2³² entries are ever live) of indexed
    /// keys, hashed by the key's low 64 bits (already uniform: they are SHA-256 output).
    table: HashTable<u32>,
    runs: VecDeque<Run>,
}

/// The table's hash of a slot (its key's low 64 bits), for when the table rehashes. Takes
/// the key log's fields, not `&Compact`, because the table is borrowed mutably meanwhile.
fn slot_hash(blocks: &VecDeque<Vec<u128>>, front: u64, base: u64) -> impl Fn(&u32) -> u64 + '_ {
    move |slot| {
        let at = base + u64::from(slot.wrapping_sub(base as u32));
        let rel = (at - front) as usize;
        blocks[rel / BLOCK][rel % BLOCK] as u64
    }
}

impl Compact {
    /// One past the last position. Every block but the last is full (blocks are added when
    /// the last is full, and removed whole from either end), so this is O(1): summing the
    /// block lengths cost a pass over ~2,400 blocks per push at 10 M entries.
    fn end(&self) -> u64 {
        let full = self.blocks.len().saturating_sub(1) * BLOCK;
        self.front + (full + self.blocks.back().map_or(0, Vec::len)) as u64
    }

    fn key_at(&self, at: u64) -> u128 {
        let rel = (at - self.front) as usize;
        self.blocks[rel / BLOCK][rel % BLOCK]
    }

    fn resolve(&self, slot: u32) -> u64 {
        self.base + u64::from(slot.wrapping_sub(self.base as u32))
    }

    fn find(&self, key: u128) -> Option<u64> {
        let slot = self
            .table
            .find(key as u64, |&s| self.key_at(self.resolve(s)) == key)?;
        Some(self.resolve(*slot))
    }

    fn hit_at(&self, at: u64) -> Hit {
        let run = self.runs[self.runs.partition_point(|r| r.start <= at) - 1];
        Hit {
            id: run.first_id + (at - run.start),
            first_seen: run.first_seen,
        }
    }

    fn get(&self, key: u128) -> Option<Hit> {
        self.find(key).map(|at| self.hit_at(at))
    }

    fn push(&mut self, key: u128, id: u64, first_seen: Micros) {
        let at = self.end();
        if self.blocks.back().is_none_or(|b| b.len() == BLOCK) {
            self.blocks.push_back(Vec::with_capacity(BLOCK));
        }
        self.blocks
            .back_mut()
            .expect("a block was ensured")
            .push(key);
        let extends = self.runs.back().is_some_and(|r| {
            r.first_seen == first_seen && r.first_id + (at - r.start) == id && r.start >= self.base
        });
        if !extends {
            self.runs.push_back(Run {
                start: at,
                first_seen,
                first_id: id,
            });
        }
        self.unindex(key);
        let Self {
            table,
            blocks,
            front,
            base,
            ..
        } = self;
        table.insert_unique(key as u64, at as u32, slot_hash(blocks, *front, *base));
    }

    /// Removes `key` from the table (its slot stays until it expires); whether it was there.
    fn unindex(&mut self, key: u128) -> bool {
        let Some(at) = self.find(key) else {
            return false;
        };
        self.unindex_at(key, at)
    }

    fn unindex_at(&mut self, key: u128, at: u64) -> bool {
        match self.table.find_entry(key as u64, |&s| s == at as u32) {
            Ok(entry) => {
                entry.remove();
                true
            }
            Err(_) => false,
        }
    }

    fn len(&self) -> u64 {
        self.end() - self.base
    }

    /// The indexed entries in the order they were remembered. Slots erasure unindexed, or
    /// that a later push of the same key superseded, are left out: no lookup finds them.
    fn indexed(&self) -> impl Iterator<Item = (u128, Hit)> + '_ {
        let mut run = 0;
        (self.base..self.end()).filter_map(move |at| {
            // Runs are ordered by start and the walk is too, so one forward pass.
            while self.runs.get(run + 1).is_some_and(|r| r.start <= at) {
                run += 1;
            }
            let key = self.key_at(at);
            if self.find(key) != Some(at) {
                return None;
            }
            let r = self.runs[run];
            let hit = Hit {
                id: r.first_id + (at - r.start),
                first_seen: r.first_seen,
            };
            Some((key, hit))
        })
    }

    /// Room for `additional` more keys in the table, so a bulk load does not rehash as it
    /// grows.
    fn reserve(&mut self, additional: usize) {
        let Self {
            table,
            blocks,
            front,
            base,
            ..
        } = self;
        table.reserve(additional, slot_hash(blocks, *front, *base));
    }

    /// Drops the oldest entry.
    fn pop_front(&mut self) {
        let at = self.base;
        let key = self.key_at(at);
        self.unindex_at(key, at);
        self.base += 1;
        if self.base - self.front == BLOCK as u64 {
            self.blocks.pop_front();
            self.front = self.base;
        }
        while self.runs.len() > 1 && self.runs[1].start <= self.base {
            self.runs.pop_front();
        }
        if self.len() == 0 {
            self.runs.clear();
        }
    }

    /// Drops entries first seen at or before `cutoff`, and the oldest beyond `max`.
    fn expire(&mut self, cutoff: Micros, max: u64) {
        while self.len() > 0 {
            let run = self.runs[0];
            if run.first_seen > cutoff && self.len() <= max {
                return;
            }
            self.pop_front();
        }
    }

    /// Forgets every entry from position `end` on (a commit that failed).
    fn truncate(&mut self, end: u64) {
        while self.end() > end.max(self.base) {
            let at = self.end() - 1;
            let key = self.key_at(at);
            self.unindex_at(key, at);
            let back = self.blocks.back_mut().expect("end > front");
            back.pop();
            if back.is_empty() {
                self.blocks.pop_back();
            }
        }
        while self.runs.back().is_some_and(|r| r.start >= self.end()) {
            self.runs.pop_back();
        }
    }

    /// Bytes allocated, for the documented bound.
    fn allocated(&self) -> usize {
        self.blocks.len() * BLOCK * 16
            + self.table.allocation_size()
            + self.runs.capacity() * std::mem::size_of::<Run>()
    }
}

/// Keys that are not of the compact form, exactly, with their expiry order.
#[derive(Default)]
struct Exact {
    map: HashMap<Box<str>, Hit>,
    order: VecDeque<(Micros, Box<str>)>,
}

impl Exact {
    fn insert(&mut self, key: &str, hit: Hit) {
        self.map.insert(key.into(), hit);
        self.order.push_back((hit.first_seen, key.into()));
    }

    /// The entries a lookup finds, in the order they were remembered.
    fn indexed(&self) -> impl Iterator<Item = (&str, Hit)> + '_ {
        self.order.iter().filter_map(|(first_seen, key)| {
            let hit = *self.map.get(key)?;
            (hit.first_seen == *first_seen).then_some((&**key, hit))
        })
    }

    fn pop_front(&mut self) {
        let Some((first_seen, key)) = self.order.pop_front() else {
            return;
        };
        // Only the entry this queue entry made, not a newer one under the same key.
        if self
            .map
            .get(&key)
            .is_some_and(|h| h.first_seen == first_seen)
        {
            self.map.remove(&key);
        }
    }

    fn expire(&mut self, cutoff: Micros, max: usize) {
        while let Some((first_seen, _)) = self.order.front() {
            if *first_seen > cutoff && self.order.len() <= max {
                return;
            }
            self.pop_front();
        }
    }

    fn truncate(&mut self, len: usize) {
        while self.order.len() > len {
            let (first_seen, key) = self.order.pop_back().expect("len > 0");
            if self
                .map
                .get(&key)
                .is_some_and(|h| h.first_seen == first_seen)
            {
                self.map.remove(&key);
            }
        }
    }
}

/// Where the index and the tip stood before a group of writes; see [`Gate::rollback`].
pub(super) struct Mark {
    compact: [u64; PREFIXES.len()],
    exact: usize,
    next: u64,
    last_received: Micros,
}

/// The admission rule and its state: the tip of the log and the dedup index.
pub(super) struct Gate {
    compact: [Compact; PREFIXES.len()],
    exact: Exact,
    /// The sequence of the next appended event.
    pub next: u64,
    /// Largest `received_at` placed, so `received_at` never decreases along the log.
    pub last_received: Micros,
    window: Micros,
    /// Entries first seen before this may hold 0.1-rule ids (embedded stores upgraded from
    /// 0.1); `None` for every store created since.
    legacy_ids_before: Option<Micros>,
    /// Most entries kept, whatever the window (memory bounds its index by its capacity).
    max_entries: usize,
}

impl Gate {
    pub(super) fn new(next: u64, last_received: Micros, window: Micros) -> Self {
        Self {
            compact: Default::default(),
            exact: Exact::default(),
            next,
            last_received,
            window,
            legacy_ids_before: None,
            max_entries: usize::MAX,
        }
    }

    pub(super) fn with_legacy_ids_before(mut self, before: Option<Micros>) -> Self {
        self.legacy_ids_before = before;
        self
    }

    pub(super) fn with_max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }

    /// What `key` was first stored as, if within the window at `now`.
    pub(super) fn seen(&self, key: &str, now: Micros) -> Option<Hit> {
        let hit = match compact_key(key) {
            Some((kind, bits)) => self.compact[kind].get(bits),
            None => self.exact.map.get(key).copied(),
        };
        hit.filter(|h| self.inside(h.first_seen, now))
    }

    /// Whether an entry first seen at `first_seen` still counts at `now`: the window rule,
    /// for lookups and for loading a checkpoint.
    pub(super) fn inside(&self, first_seen: Micros, now: Micros) -> bool {
        first_seen + self.window > now
    }

    /// The compact indexes' prefixes, in the order [`Key::Compact`] numbers them.
    pub(super) fn prefixes() -> &'static [&'static str] {
        &PREFIXES
    }

    /// What a lookup can find, per compact index (in [`PREFIXES`] order) and then the
    /// other keys, each in the order remembered: re-remembering them in that order gives an
    /// index that answers every lookup the same way.
    pub(super) fn indexed_compact(&self, prefix: usize) -> impl Iterator<Item = (u128, Hit)> + '_ {
        self.compact[prefix].indexed()
    }

    pub(super) fn indexed_other(&self) -> impl Iterator<Item = (&str, Hit)> + '_ {
        self.exact.indexed()
    }

    /// Remembers `key` as [`Gate::remember`] does, from the form the index holds.
    pub(super) fn restore(&mut self, key: Key<'_>, hit: Hit) {
        match key {
            Key::Compact(prefix, bits) => self.compact[prefix].push(bits, hit.id, hit.first_seen),
            Key::Other(key) => self.exact.insert(key, hit),
        }
    }

    /// How many keys compact index `prefix` indexes (what a lookup can find).
    pub(super) fn indexed_len(&self, prefix: usize) -> usize {
        self.compact[prefix].table.len()
    }

    /// Room for `additional` more keys in compact index `prefix`.
    pub(super) fn reserve(&mut self, prefix: usize, additional: usize) {
        self.compact[prefix].reserve(additional);
    }

    /// Remembers `key` as first stored under `id` at `first_seen`.
    pub(super) fn remember(&mut self, key: &str, id: u64, first_seen: Micros) {
        let key = match compact_key(key) {
            Some((kind, bits)) => Key::Compact(kind, bits),
            None => Key::Other(key),
        };
        self.restore(key, Hit { id, first_seen });
    }

    /// Until when the index may hold 0.1-rule ids: the window after the first start of this
    /// release on an older store. `None` for every store created since.
    pub(super) fn legacy_ids_until(&self) -> Option<Micros> {
        self.legacy_ids_before.map(|before| before + self.window)
    }

    /// The sequence `new` was first appended at within the window: by its `event_id`, or
    /// while 0.1-rule ids may be indexed, by its `legacy_event_id` first seen before then.
    fn duplicate_of(&self, new: &NewEvent, now: Micros) -> Option<u64> {
        if let Some(hit) = self.seen(&new.event.event_id, now) {
            return Some(hit.id);
        }
        let before = self.legacy_ids_before?;
        if self.legacy_ids_until()? <= now {
            return None;
        }
        let hit = self.seen(new.legacy_event_id.as_deref()?, now)?;
        (hit.first_seen < before).then_some(hit.id)
    }

    /// The admission rule for one event: a duplicate within the window, or the event placed
    /// at the tip (sequence, `received_at`) and remembered. Returns the stored
    /// `received_at` with the placed event.
    pub(super) fn admit_event(
        &mut self,
        new: NewEvent,
        now: Micros,
    ) -> Result<(Event, Micros), AppendOutcome> {
        if let Some(sequence) = self.duplicate_of(&new, now) {
            return Err(AppendOutcome::Duplicate { sequence });
        }
        let mut event = new.event;
        let received = place_at_tip(&mut event, now, &mut self.next, &mut self.last_received);
        self.remember(&event.event_id, event.sequence, received);
        Ok((event, received))
    }

    /// The erasure rule's part in the index: forgets `key`; whether it was indexed.
    pub(super) fn forget(&mut self, key: &str) -> bool {
        match compact_key(key) {
            Some((kind, bits)) => self.compact[kind].unindex(bits),
            None => self.exact.map.remove(key).is_some(),
        }
    }

    /// Forgets entries first seen a window or more before `now`, and the oldest beyond
    /// the entry bound.
    pub(super) fn expire(&mut self, now: Micros) {
        let cutoff = now.saturating_sub(self.window);
        let max = self.max_entries;
        for index in &mut self.compact {
            index.expire(cutoff, max as u64);
        }
        self.exact.expire(cutoff, max);
    }

    pub(super) fn mark(&self) -> Mark {
        Mark {
            compact: std::array::from_fn(|i| self.compact[i].end()),
            exact: self.exact.order.len(),
            next: self.next,
            last_received: self.last_received,
        }
    }

    /// Undoes everything remembered and placed since `mark`: its commit failed.
    pub(super) fn rollback(&mut self, mark: Mark) {
        for (index, end) in self.compact.iter_mut().zip(mark.compact) {
            index.truncate(end);
        }
        self.exact.truncate(mark.exact);
        self.next = mark.next;
        self.last_received = mark.last_received;
    }

    /// Entries held (live or erased but not yet expired).
    #[cfg(test)]
    pub fn entries(&self) -> u64 {
        self.compact.iter().map(Compact::len).sum::<u64>() + self.exact.order.len() as u64
    }

    /// Bytes the index has allocated (the compact part exactly, the exact map roughly).
    pub fn allocated_bytes(&self) -> usize {
        let exact = self.exact.order.capacity() * 40
            + self.exact.map.capacity() * 48
            + self.exact.map.keys().map(|k| k.len() * 2).sum::<usize>();
        self.compact.iter().map(Compact::allocated).sum::<usize>() + exact
    }
}

/// The erasure rule's test for events: an event belongs to `user` by its
/// `application_user_id`.
pub(super) fn event_of(event: &Event, user: &str) -> bool {
    event.application_user_id == user
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> String {
        format!("main-{n:032x}")
    }

    fn new(id: &str) -> NewEvent {
        Event {
            event_id: id.into(),
            ..Event::default()
        }
        .into()
    }

    #[test]
    fn only_the_canonical_form_is_compact_so_the_mapping_is_exact() {
        assert_eq!(compact_key(&id(7)), Some((0, 7)));
        assert_eq!(compact_key(&format!("lab-{:032x}", 7)), Some((1, 7)));
        assert_eq!(compact_key(&format!("main-{:032X}", u128::MAX)), None);
        assert_eq!(compact_key("main-abc"), None);
        assert_eq!(compact_key("dead-letter:main:00"), None);
        let mut gate = Gate::new(1, 0, 100);
        gate.remember(&format!("lab-{:032x}", 7), 1, 10);
        gate.remember(&format!("main-{:032X}", 0xab), 2, 10);
        assert_eq!(gate.seen(&id(7), 20), None, "another prefix is another id");
        assert_eq!(gate.seen(&format!("main-{:032x}", 0xab), 20), None);
        assert_eq!(gate.seen(&format!("main-{:032X}", 0xab), 20).unwrap().id, 2);
    }

    #[test]
    fn duplicates_expire_with_the_window_and_sequences_follow_the_tip() {
        let mut gate = Gate::new(5, 0, 100);
        let (first, received) = gate.admit_event(new(&id(1)), 10).unwrap();
        assert_eq!((first.sequence, received), (5, 10));
        assert_eq!(
            gate.admit_event(new(&id(1)), 50).unwrap_err(),
            AppendOutcome::Duplicate { sequence: 5 }
        );
        let (second, _) = gate.admit_event(new(&id(2)), 50).unwrap();
        assert_eq!(second.sequence, 6);
        gate.expire(110);
        assert_eq!(gate.entries(), 1, "the entry first seen at 10 expired");
        let (again, _) = gate.admit_event(new(&id(1)), 110).unwrap();
        assert_eq!(again.sequence, 7);
        assert_eq!(gate.seen(&id(2), 120).unwrap().id, 6);
    }

    #[test]
    fn rollback_forgets_a_failed_group_and_forget_survives_expiry() {
        let mut gate = Gate::new(1, 0, 1000);
        for n in 0..10_000 {
            gate.admit_event(new(&id(n)), 1 + n as i64 / 100).unwrap();
        }
        let mark = gate.mark();
        gate.admit_event(new(&id(20_000)), 500).unwrap();
        gate.remember("dead-letter:main:ab", 1, 500);
        gate.rollback(mark);
        assert_eq!(gate.next, 10_001);
        assert_eq!(gate.seen(&id(20_000), 500), None);
        assert_eq!(gate.seen("dead-letter:main:ab", 500), None);
        assert!(gate.forget(&id(9_999)));
        assert!(!gate.forget(&id(9_999)));
        for n in [0, 4_095, 4_096, 9_998] {
            assert_eq!(gate.seen(&id(n), 500).unwrap().id, n as u64 + 1);
        }
        gate.expire(1000 + 50);
        assert_eq!(gate.seen(&id(4_999), 1050), None);
        assert_eq!(gate.seen(&id(5_000), 1050).unwrap().id, 5_001);
        assert_eq!(gate.entries(), 5_000);
    }

    #[test]
    fn the_entry_bound_drops_the_oldest() {
        let mut gate = Gate::new(1, 0, 1000).with_max_entries(3);
        for n in 0..5 {
            gate.admit_event(new(&id(n)), 1).unwrap();
        }
        gate.expire(2);
        assert_eq!(gate.entries(), 3);
        assert_eq!(gate.seen(&id(1), 2), None);
        assert_eq!(gate.seen(&id(2), 2).unwrap().id, 3);
    }

    #[test]
    fn an_index_of_a_million_entries_stays_within_32_bytes_each() {
        let mut gate = Gate::new(1, 0, i64::MAX / 2);
        for n in 0..1_000_000u128 {
            let key = n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
            gate.admit_event(new(&id(key)), 1 + (n / 20) as i64)
                .unwrap();
        }
        let per_entry = gate.allocated_bytes() as f64 / gate.entries() as f64;
        assert!(per_entry <= 32.0, "{per_entry} bytes per entry");
    }
}
