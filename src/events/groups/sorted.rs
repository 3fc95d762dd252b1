//! The two indexes under a group's hot path: [`SortedQueue`] (unsettled events by
//! sequence) and [`Deadlines`] (in-flight deliveries by `ack_wait` deadline).
//!
//! Both are inserted in increasing order: a group reads forward, so a new unsettled event
//! is above every one it holds, and `ack_wait` is one per group, so a new deadline is the
//! latest. Their removals (acks) come in any order. A B-tree pays a pointer walk and node
//! reshuffles for each; a queue appends at the back, finds by offset (or binary search)
//! in contiguous memory, and removes by leaving a hole. Measured in the groups bench, the
//! B-tree operations were about a quarter of the gateway's CPU per acknowledged delivery.

use std::collections::VecDeque;

use crate::events::time::Micros;

/// Holes are compacted away once there are more than this many beyond the live count,
/// so a queue holds at most twice its live entries plus this.
const SLACK: usize = 64;

/// An ordered map of sequences with its keys in a [`VecDeque`]: O(1) amortised insertion
/// of a key above every present one; lookup and removal in O(1) while the keys are dense
/// (a key's offset from the first is its index: no filter, no compaction since) and
/// O(log n) otherwise (a removal leaves a hole, popped at either end and compacted once
/// holes outnumber live entries); O(n) insertion out of order (never by its user's design;
/// correct anyway).
#[derive(Debug, Clone)]
pub(super) struct SortedQueue<V> {
    /// Sorted by key, unique; `None` marks a removed entry. Never a hole at either end.
    slots: VecDeque<(u64, Option<V>)>,
    /// Entries that are not holes.
    live: usize,
}

impl<V> Default for SortedQueue<V> {
    fn default() -> Self {
        Self {
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

impl<V> SortedQueue<V> {
    /// Where `key` is, or where it would go.
    fn search(&self, key: u64) -> Result<usize, usize> {
        let Some(&(first, _)) = self.slots.front() else {
            return Err(0);
        };
        let Some(offset) = key.checked_sub(first) else {
            return Err(0);
        };
        let guess = usize::try_from(offset).unwrap_or(usize::MAX);
        if self.slots.get(guess).is_some_and(|(k, _)| *k == key) {
            return Ok(guess);
        }
        let at = self.slots.partition_point(|(k, _)| *k < key);
        match self.slots.get(at) {
            Some((k, _)) if *k == key => Ok(at),
            _ => Err(at),
        }
    }

    pub fn get(&self, key: u64) -> Option<&V> {
        self.slots[self.search(key).ok()?].1.as_ref()
    }

    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        let at = self.search(key).ok()?;
        self.slots[at].1.as_mut()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        if self.slots.back().is_none_or(|(last, _)| *last < key) {
            self.slots.push_back((key, Some(value)));
            self.live += 1;
            return None;
        }
        match self.search(key) {
            Ok(at) => {
                let previous = self.slots[at].1.replace(value);
                if previous.is_none() {
                    self.live += 1;
                }
                previous
            }
            Err(at) => {
                self.slots.insert(at, (key, Some(value)));
                self.live += 1;
                None
            }
        }
    }

    pub fn remove(&mut self, key: u64) -> Option<V> {
        let at = self.search(key).ok()?;
        let removed = self.slots[at].1.take()?;
        self.live -= 1;
        self.tidy();
        Some(removed)
    }

    /// Pops the holes at both ends; compacts when holes outnumber live entries.
    fn tidy(&mut self) {
        while self.slots.front().is_some_and(|(_, v)| v.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|(_, v)| v.is_none()) {
            self.slots.pop_back();
        }
        if self.slots.len() > 2 * self.live + SLACK {
            self.slots.retain(|(_, v)| v.is_some());
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    /// The smallest key (never a hole: there is none at the front).
    pub fn first(&self) -> Option<(u64, &V)> {
        self.iter().next()
    }

    /// Live entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.slots
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.live = 0;
    }

    /// Slots in use, holes included, for the bound's test.
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.slots.len()
    }
}

/// The deadlines of in-flight deliveries, in the order they were set: a FIFO, so setting
/// one is a push and the earliest is at the front. A delivery that is answered leaves its
/// entry behind (finding it would cost a search per ack); the group drops such stale
/// entries when they reach the front ([`Deadlines::pop_stale`], so the front is always
/// live) and compacts when they outnumber the live ones, so the queue holds at most twice
/// the deliveries in flight plus a constant.
#[derive(Debug, Clone, Default)]
pub(super) struct Deadlines {
    queue: VecDeque<(Micros, u64)>,
}

impl Deadlines {
    /// Sets `sequence`'s deadline, never before the latest one set (so a clock that steps
    /// back lengthens this `ack_wait` by the step instead of breaking the order). Returns
    /// the deadline set.
    pub fn push(&mut self, deadline: Micros, sequence: u64) -> Micros {
        let deadline = self
            .queue
            .back()
            .map_or(deadline, |&(latest, _)| deadline.max(latest));
        self.queue.push_back((deadline, sequence));
        deadline
    }

    /// The earliest entry.
    pub fn first(&self) -> Option<(Micros, u64)> {
        self.queue.front().copied()
    }

    pub fn pop_first(&mut self) -> Option<(Micros, u64)> {
        self.queue.pop_front()
    }

    /// Drops the stale entries at the front, and every stale one once more than
    /// `2 * in_flight + SLACK` entries are kept; `live` tells an entry that still holds.
    pub fn pop_stale(&mut self, in_flight: usize, live: impl Fn(Micros, u64) -> bool) {
        while self.first().is_some_and(|(d, s)| !live(d, s)) {
            self.queue.pop_front();
        }
        if self.queue.len() > 2 * in_flight + SLACK {
            self.queue.retain(|&(d, s)| live(d, s));
        }
    }

    /// Every entry, stale ones included, in order.
    #[cfg(test)]
    pub fn entries(&self) -> impl Iterator<Item = (Micros, u64)> {
        self.queue.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{Deadlines, SLACK, SortedQueue};

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
    }

    fn key() -> impl Strategy<Value = u64> {
        prop_oneof![0..64u64, any::<u16>().prop_map(u64::from), Just(u64::MAX)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Dense and sparse keys alike, so both ways of finding one are exercised.
            (key(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key().prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Every operation answers as a `BTreeMap` does, and the queue iterates as it does.
        #[test]
        fn it_behaves_as_a_btree_map(ops in proptest::collection::vec(op(), 0..400)) {
            let (mut queue, mut model) = (SortedQueue::default(), BTreeMap::new());
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(queue.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(queue.remove(k), model.remove(&k)),
                }
                prop_assert_eq!(queue.len(), model.len());
                prop_assert_eq!(queue.first(), model.first_key_value().map(|(k, v)| (*k, v)));
                for k in [0, 1, 63, 1000, u64::MAX] {
                    prop_assert_eq!(queue.get(k), model.get(&k));
                }
            }
            let listed: Vec<(u64, &u32)> = queue.iter().collect();
            let expected: Vec<(u64, &u32)> = model.iter().map(|(k, v)| (*k, v)).collect();
            prop_assert_eq!(listed, expected);
        }
    }

    /// The hot path's pattern: appended in order and removed behind one entry that stays
    /// stuck at the front the whole time. The holes behind it are compacted away.
    #[test]
    fn holes_behind_a_stuck_entry_stay_bounded() {
        let mut queue = SortedQueue::default();
        queue.insert(0u64, ());
        for sequence in 1..100_000u64 {
            queue.insert(sequence, ());
            if sequence > 10 {
                assert_eq!(queue.remove(sequence - 10), Some(()));
            }
            assert!(queue.slots() <= 2 * queue.len() + SLACK + 1);
        }
        assert_eq!(queue.first(), Some((0, &())));
        assert_eq!(queue.len(), 11);
    }

    /// Deadlines keep their order when the clock steps back, and answered ones are dropped
    /// at the front and compacted away.
    #[test]
    fn deadlines_stay_ordered_and_bounded() {
        let mut deadlines = Deadlines::default();
        assert_eq!(deadlines.push(100, 1), 100);
        assert_eq!(deadlines.push(90, 2), 100, "a step back keeps the order");
        assert_eq!(deadlines.push(110, 3), 110);
        deadlines.pop_stale(3, |_, s| s != 1);
        assert_eq!(deadlines.first(), Some((100, 2)));
        // 10,000 deliveries, every one but the first answered: at most 2 * 1 + SLACK kept.
        let mut deadlines = Deadlines::default();
        for sequence in 0..10_000 {
            deadlines.push(sequence as i64, sequence);
            deadlines.pop_stale(1, |_, s| s == 0 || s == sequence);
            assert!(deadlines.entries().count() <= 2 + SLACK + 1);
        }
        assert_eq!(deadlines.first(), Some((0, 0)));
    }
}
