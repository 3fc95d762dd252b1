//! [`SortedQueue`]: the ordered map under a group's hot path.
//!
//! A group keeps its unsettled events by sequence and its in-flight deadlines by time,
//! and both are inserted in increasing order almost always: a group reads forward, so a
//! new unsettled event is above every one it holds, and `ack_wait` is one per group, so a
//! new deadline is the latest. Their removals (acks) come in any order. A B-tree pays a
//! pointer walk and node reshuffles for each of those; a sorted queue appends at the back,
//! finds by binary search over contiguous memory, and removes by leaving a hole. Measured
//! in the groups bench, the B-tree operations were about a quarter of the gateway's CPU
//! per acknowledged delivery.

use std::collections::VecDeque;

/// Holes are compacted away once there are more than this many beyond the live count,
/// so a queue holds at most twice its live entries plus this.
const SLACK: usize = 64;

/// An ordered map with its keys in a [`VecDeque`]: O(1) amortised insertion of a key
/// above every present one, O(log n) lookup and removal (a removal leaves a hole, popped
/// at either end and compacted once holes outnumber live entries), O(n) insertion out of
/// order (rare by its users' design; correct anyway).
#[derive(Debug, Clone)]
pub(super) struct SortedQueue<K, V> {
    /// Sorted by key, unique; `None` marks a removed entry. Never a hole at either end.
    slots: VecDeque<(K, Option<V>)>,
    /// Entries that are not holes.
    live: usize,
}

impl<K, V> Default for SortedQueue<K, V> {
    fn default() -> Self {
        Self {
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

impl<K: Ord + Copy, V> SortedQueue<K, V> {
    /// Where `key` is, or where it would go.
    fn search(&self, key: K) -> Result<usize, usize> {
        let at = self.slots.partition_point(|(k, _)| *k < key);
        match self.slots.get(at) {
            Some((k, _)) if *k == key => Ok(at),
            _ => Err(at),
        }
    }

    pub fn get(&self, key: K) -> Option<&V> {
        self.slots[self.search(key).ok()?].1.as_ref()
    }

    pub fn get_mut(&mut self, key: K) -> Option<&mut V> {
        let at = self.search(key).ok()?;
        self.slots[at].1.as_mut()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
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

    pub fn remove(&mut self, key: K) -> Option<V> {
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
    pub fn first(&self) -> Option<(K, &V)> {
        self.iter().next()
    }

    /// Live entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (K, &V)> {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{SLACK, SortedQueue};

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u16>(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            any::<u16>().prop_map(Op::Remove),
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
                for k in [0, 1, 1000, u16::MAX] {
                    prop_assert_eq!(queue.get(k), model.get(&k));
                }
            }
            let listed: Vec<(u16, &u32)> = queue.iter().collect();
            let expected: Vec<(u16, &u32)> = model.iter().map(|(k, v)| (*k, v)).collect();
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
}
