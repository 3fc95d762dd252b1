//! Per-user lanes for `CONSUME_ORDERING_PER_USER`.
//!
//! A user has a lane while any of their events is unsettled in the group. The lane's
//! `active` event is the one delivered (in flight, or waiting to be redelivered); later
//! events of the user queue behind it, in sequence order, until it is acked or termed.
//! So one user's events go out in sequence order and never two at once, while other
//! users' events pass the queue. A lane whose `active` is settled offers its queue's
//! first event as *ready*; the group delivers ready events before reading new ones.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
};

#[derive(Debug, Default)]
pub(super) struct Lanes {
    lanes: HashMap<Arc<str>, Lane>,
    /// The first queued event of every lane with no active event, with its user:
    /// deliverable now, in sequence order. Invariant:
    /// `ready = { lane.queue[0] | lane.active is None }`.
    ready: BTreeMap<u64, Arc<str>>,
}

#[derive(Debug, Default)]
struct Lane {
    active: Option<u64>,
    /// Sequence order; the group appends in the order it reads.
    queue: VecDeque<u64>,
}

impl Lanes {
    /// Whether an event of `user` read now may be delivered at once.
    pub(super) fn is_free(&self, user: &str) -> bool {
        !self.lanes.contains_key(user)
    }

    /// `sequence`, of a free user, goes out now.
    pub(super) fn activate(&mut self, user: &Arc<str>, sequence: u64) {
        debug_assert!(self.is_free(user));
        self.lanes.insert(
            user.clone(),
            Lane {
                active: Some(sequence),
                queue: VecDeque::new(),
            },
        );
    }

    /// `sequence` waits behind the user's earlier events.
    pub(super) fn enqueue(&mut self, user: &Arc<str>, sequence: u64) {
        let lane = self.lanes.entry(user.clone()).or_default();
        debug_assert!(lane.queue.back().is_none_or(|&last| last < sequence));
        lane.queue.push_back(sequence);
        if lane.active.is_none() && lane.queue.len() == 1 {
            self.ready.insert(sequence, user.clone());
        }
    }

    /// Takes the smallest ready sequence, if any: it goes out now, as its lane's active
    /// event.
    pub(super) fn pop_ready(&mut self) -> Option<u64> {
        let (sequence, user) = self.ready.pop_first()?;
        if let Some(lane) = self.lanes.get_mut(&user) {
            debug_assert_eq!(lane.queue.front(), Some(&sequence));
            lane.queue.pop_front();
            lane.active = Some(sequence);
        }
        Some(sequence)
    }

    /// `sequence` of `user` leaves the group (settled, expired or erased), whether it was
    /// the active event or still queued. The user's next event, if any, becomes ready.
    pub(super) fn remove(&mut self, user: &str, sequence: u64) {
        let Some(lane) = self.lanes.get_mut(user) else {
            return;
        };
        if lane.active == Some(sequence) {
            lane.active = None;
        } else if let Some(at) = lane.queue.iter().position(|&s| s == sequence) {
            lane.queue.remove(at);
            self.ready.remove(&sequence);
        } else {
            return;
        }
        let next = match (lane.active, lane.queue.front()) {
            (None, None) => {
                self.lanes.remove(user);
                return;
            }
            (None, Some(&next)) => next,
            (Some(_), _) => return,
        };
        if let Some((user, _)) = self.lanes.get_key_value(user) {
            self.ready.insert(next, user.clone());
        }
    }

    pub(super) fn clear(&mut self) {
        self.lanes.clear();
        self.ready.clear();
    }

    /// Checks the `ready` invariant and that lanes hold exactly `expected` (sequence →
    /// user, active or queued), for the model tests.
    #[cfg(test)]
    pub(super) fn check(&self, expected: &HashMap<u64, Arc<str>>) {
        let mut seen = 0;
        let mut ready = BTreeMap::new();
        for (user, lane) in &self.lanes {
            assert!(
                lane.active.is_some() || !lane.queue.is_empty(),
                "empty lane"
            );
            for sequence in lane.active.iter().chain(&lane.queue) {
                assert_eq!(expected.get(sequence), Some(user), "lane of {sequence}");
                seen += 1;
            }
            assert!(
                lane.queue
                    .iter()
                    .zip(lane.queue.iter().skip(1))
                    .all(|(a, b)| a < b)
            );
            if let (None, Some(&first)) = (lane.active, lane.queue.front()) {
                ready.insert(first, user.clone());
            }
        }
        assert_eq!(seen, expected.len(), "lanes hold every unsettled event");
        assert_eq!(ready, self.ready, "ready = heads of free lanes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_next_event_is_ready_only_when_the_previous_one_leaves() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut lanes = Lanes::default();
        lanes.activate(&a, 1);
        lanes.enqueue(&a, 3);
        lanes.enqueue(&a, 5);
        assert!(!lanes.is_free("a"));
        assert!(lanes.is_free("b"));
        lanes.activate(&b, 4);
        assert_eq!(lanes.pop_ready(), None);

        lanes.remove("a", 1);
        assert_eq!(lanes.pop_ready(), Some(3));
        assert_eq!(lanes.pop_ready(), None);

        // A queued event that leaves (retention, erasure) does not unblock the lane.
        lanes.remove("a", 5);
        assert_eq!(lanes.pop_ready(), None);
        lanes.remove("a", 3);
        assert!(lanes.is_free("a"));
        lanes.remove("b", 4);
        assert!(lanes.is_free("b"));
    }
}
