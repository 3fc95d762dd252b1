//! The `memory` backend: bounded, in process, lost on exit. For tests and throwaway runs.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;

use super::{
    Admission, Admitted, AppendOutcome, Backend, CommittedEvent, Erased, EventLog, LocalLog,
    LogBounds, LogError, NewEvent,
    admission::{self, Gate},
    dead_letter_key,
    fanout::{self, Fanout},
    names_user,
    time::{Micros, now_micros},
};
use crate::proto::DeadLetter;

/// Dead letters kept at most; older ones are dropped first.
const DEAD_LETTER_CAPACITY: usize = 10_000;
/// Dedup entries kept at most, per retained event: bounds memory when Spike sends more
/// distinct events within the dedup window than the log keeps.
const DEDUP_ENTRIES_PER_EVENT: usize = 4;

pub struct MemoryLog {
    // One mutex for all state: an append assigns sequences and publishes to the fan-out
    // inside the same critical section, so live order always equals sequence order.
    // Critical sections are short (no I/O, reads only clone `Arc`s).
    state: Mutex<State>,
    fanout: Fanout,
    capacity: usize,
    retention: Micros,
    closed: AtomicBool,
}

struct State {
    events: VecDeque<Arc<CommittedEvent>>,
    /// The shared admission rule: the tip and the dedup index (event ids and dead-letter
    /// keys).
    gate: Gate,
    trimmed_through: Option<Micros>,
    /// In increasing id.
    dead_letters: VecDeque<DeadLetter>,
    next_dead_letter: u64,
}

impl MemoryLog {
    pub fn new(capacity: usize, dedup_window: Duration, retention: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                events: VecDeque::new(),
                gate: Gate::new(1, Micros::MIN, dedup_window.as_micros() as Micros)
                    .with_max_entries(capacity.saturating_mul(DEDUP_ENTRIES_PER_EVENT)),
                trimmed_through: None,
                dead_letters: VecDeque::new(),
                next_dead_letter: 1,
            }),
            fanout: Fanout::default(),
            capacity,
            retention: retention.as_micros() as Micros,
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that
        // matters more than losing the process, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn oldest(&self) -> u64 {
        self.events.front().map_or(self.gate.next, |e| e.sequence())
    }

    fn drop_oldest_event(&mut self) {
        if let Some(event) = self.events.pop_front() {
            self.trimmed_through = Some(event.received_at());
        }
    }

    fn append_event(
        &mut self,
        new: NewEvent,
        now: Micros,
    ) -> (AppendOutcome, Option<Arc<CommittedEvent>>) {
        // No persisted state survives a restart, so no id of an earlier rule is ever held:
        // the gate has no legacy instant and never looks `legacy_event_id` up.
        match self.gate.admit_event(new, now) {
            Err(duplicate) => (duplicate, None),
            Ok((event, _)) => {
                let outcome = AppendOutcome::Appended {
                    sequence: event.sequence,
                };
                let event = Arc::new(CommittedEvent::new(event));
                self.events.push_back(event.clone());
                (outcome, Some(event))
            }
        }
    }

    fn store_letter(&mut self, mut letter: DeadLetter, now: Micros) -> AppendOutcome {
        let key = dead_letter_key(&letter);
        if let Some(hit) = self.gate.seen(&key, now) {
            return AppendOutcome::Duplicate { sequence: hit.id };
        }
        if self.dead_letters.len() == DEAD_LETTER_CAPACITY {
            self.dead_letters.pop_front();
        }
        letter.id = self.next_dead_letter;
        self.next_dead_letter += 1;
        self.gate.remember(&key, letter.id, now);
        let outcome = AppendOutcome::Appended {
            sequence: letter.id,
        };
        self.dead_letters.push_back(letter);
        outcome
    }

    fn letter_index(&self, id: u64) -> Option<usize> {
        self.dead_letters
            .binary_search_by_key(&id, |letter| letter.id)
            .ok()
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn admit(&self, admission: Admission) -> Result<Admitted, LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let now = now_micros();
        let mut state = self.lock();
        let mut admitted = Admitted::default();
        let mut appended = Vec::with_capacity(admission.events.len());
        for new in admission.events {
            let (outcome, event) = state.append_event(new, now);
            admitted.events.push(outcome);
            appended.extend(event);
        }
        for letter in admission.dead_letters {
            let outcome = state.store_letter(letter, now);
            admitted.dead_letters.push(outcome);
        }
        for letter in admission.updated {
            if let Some(at) = state.letter_index(letter.id) {
                state.dead_letters[at] = letter;
            }
        }
        for id in admission.resolved {
            if let Some(at) = state.letter_index(id) {
                state.dead_letters.remove(at);
            }
        }
        while state.events.len() > self.capacity {
            state.drop_oldest_event();
        }
        state.gate.expire(now);
        self.fanout.publish(appended);
        Ok(admitted)
    }

    async fn dead_letters(
        &self,
        after_id: u64,
        limit: usize,
        user: Option<&str>,
    ) -> Result<Vec<DeadLetter>, LogError> {
        let state = self.lock();
        let start = state.dead_letters.partition_point(|l| l.id <= after_id);
        Ok(state
            .dead_letters
            .range(start..)
            .filter(|letter| user.is_none_or(|u| names_user(letter, u)))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn bounds(&self) -> Result<LogBounds, LogError> {
        let state = self.lock();
        Ok(LogBounds {
            oldest: state.oldest(),
            next: state.gate.next,
            trimmed_through: state.trimmed_through,
        })
    }

    async fn housekeeping(&self) -> Result<(), LogError> {
        let now = now_micros();
        let mut state = self.lock();
        let cutoff = now.saturating_sub(self.retention);
        while state
            .events
            .front()
            .is_some_and(|e| e.received_at() < cutoff)
        {
            state.drop_oldest_event();
        }
        state.gate.expire(now);
        Ok(())
    }

    async fn erase_user(&self, user: &str) -> Result<Erased, LogError> {
        let mut state = self.lock();
        let mut erased = Erased::default();
        let mut ids = Vec::new();
        state.events.retain(|event| {
            let keep = !admission::event_of(event.event(), user);
            if !keep {
                ids.push(event.event().event_id.clone());
            }
            keep
        });
        erased.events = ids.len() as u64;
        for id in ids {
            if state.gate.forget(&id) {
                erased.dedup_entries += 1;
            }
        }
        let mut keys = Vec::new();
        state.dead_letters.retain(|letter| {
            let keep = !names_user(letter, user);
            if !keep {
                keys.push(dead_letter_key(letter));
            }
            keep
        });
        erased.dead_letters = keys.len() as u64;
        for key in keys {
            if state.gate.forget(&key) {
                erased.dedup_entries += 1;
            }
        }
        Ok(erased)
    }

    /// Never: a memory log starts empty, so it never holds ids of the 0.1 rule.
    fn wants_legacy_ids(&self) -> bool {
        false
    }

    fn health(&self) -> super::LogHealth {
        use super::LogHealth;
        if self.closed.load(Ordering::Acquire) {
            LogHealth::Closed
        } else {
            LogHealth::Ready
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn backend(self: Arc<Self>) -> Backend {
        Backend::Local(self)
    }
}

#[async_trait]
impl LocalLog for MemoryLog {
    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Arc<CommittedEvent>>, LogError> {
        let state = self.lock();
        // By sequence, not by index: erasure leaves holes in the sequence.
        let start = state.events.partition_point(|e| e.sequence() < from);
        Ok(state.events.range(start..).take(limit).cloned().collect())
    }

    async fn position_at(&self, since: Micros) -> Result<u64, LogError> {
        let state = self.lock();
        // received_at never decreases along the log, so this is a binary search.
        let index = state.events.partition_point(|e| e.received_at() < since);
        Ok(state
            .events
            .get(index)
            .map_or(state.gate.next, |e| e.sequence()))
    }

    fn live(&self) -> fanout::Receiver {
        self.fanout.subscribe()
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        Ok(self.lock().dead_letters.len() as u64)
    }
}
