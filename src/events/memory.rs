//! The `memory` backend: bounded, in process, lost on exit. For tests and throwaway runs.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;

use super::{
    AppendOutcome, CommittedEvent, Erased, EventLog, LogBounds, LogError,
    fanout::{self, Fanout},
    time::{Micros, from_micros, now_micros, to_micros},
};
use crate::{
    proto::{DeadLetter, Event},
    wire::payload::user_named_in,
};

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
    dedup_window: Micros,
    retention: Micros,
    closed: AtomicBool,
}

struct State {
    events: VecDeque<Arc<CommittedEvent>>,
    next: u64,
    last_received: Micros,
    trimmed_through: Option<Micros>,
    dedup: HashMap<String, (u64, Micros)>,
    /// Dedup entries by insertion time, to expire them in order.
    dedup_order: VecDeque<(Micros, String)>,
    dead_letters: VecDeque<DeadLetter>,
}

impl MemoryLog {
    pub fn new(capacity: usize, dedup_window: Duration, retention: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                events: VecDeque::new(),
                next: 1,
                last_received: Micros::MIN,
                trimmed_through: None,
                dedup: HashMap::new(),
                dedup_order: VecDeque::new(),
                dead_letters: VecDeque::new(),
            }),
            fanout: Fanout::default(),
            capacity,
            dedup_window: dedup_window.as_micros() as Micros,
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
        self.events.front().map_or(self.next, |e| e.sequence())
    }

    fn drop_oldest_event(&mut self) {
        if let Some(event) = self.events.pop_front() {
            self.trimmed_through = Some(event.received_at());
        }
    }

    fn expire_dedup(&mut self, now: Micros, window: Micros, max_entries: usize) {
        while let Some((inserted, _)) = self.dedup_order.front() {
            if *inserted + window > now && self.dedup_order.len() <= max_entries {
                break;
            }
            let (inserted, id) = self.dedup_order.pop_front().expect("front exists");
            // Only remove the map entry this queue entry created, not a newer one.
            if self.dedup.get(&id).is_some_and(|(_, at)| *at == inserted) {
                self.dedup.remove(&id);
            }
        }
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn append(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let now = now_micros();
        let mut state = self.lock();
        let mut outcomes = Vec::with_capacity(events.len());
        let mut appended = Vec::with_capacity(events.len());
        for mut event in events {
            if let Some((sequence, at)) = state.dedup.get(&event.event_id)
                && at + self.dedup_window > now
            {
                outcomes.push(AppendOutcome::Duplicate {
                    sequence: *sequence,
                });
                continue;
            }
            let received = event
                .received_at
                .as_ref()
                .map_or(now, to_micros)
                .max(state.last_received);
            state.last_received = received;
            event.received_at = Some(from_micros(received));
            event.sequence = state.next;
            state.next += 1;
            state
                .dedup
                .insert(event.event_id.clone(), (event.sequence, now));
            state.dedup_order.push_back((now, event.event_id.clone()));
            outcomes.push(AppendOutcome::Appended {
                sequence: event.sequence,
            });
            let event = Arc::new(CommittedEvent::new(event));
            state.events.push_back(event.clone());
            appended.push(event);
        }
        while state.events.len() > self.capacity {
            state.drop_oldest_event();
        }
        let max_dedup = self.capacity.saturating_mul(DEDUP_ENTRIES_PER_EVENT);
        state.expire_dedup(now, self.dedup_window, max_dedup);
        self.fanout.publish(appended);
        Ok(outcomes)
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let mut state = self.lock();
        if state.dead_letters.len() == DEAD_LETTER_CAPACITY {
            state.dead_letters.pop_front();
        }
        state.dead_letters.push_back(letter);
        Ok(())
    }

    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Arc<CommittedEvent>>, LogError> {
        let state = self.lock();
        // By sequence, not by index: erasure leaves holes in the sequence.
        let start = state.events.partition_point(|e| e.sequence() < from);
        Ok(state.events.range(start..).take(limit).cloned().collect())
    }

    async fn bounds(&self) -> Result<LogBounds, LogError> {
        let state = self.lock();
        Ok(LogBounds {
            oldest: state.oldest(),
            next: state.next,
            trimmed_through: state.trimmed_through,
        })
    }

    async fn position_at(&self, since: Micros) -> Result<u64, LogError> {
        let state = self.lock();
        // received_at never decreases along the log, so this is a binary search.
        let index = state.events.partition_point(|e| e.received_at() < since);
        Ok(state.events.get(index).map_or(state.next, |e| e.sequence()))
    }

    fn live(&self) -> fanout::Receiver {
        self.fanout.subscribe()
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
        let max_dedup = self.capacity.saturating_mul(DEDUP_ENTRIES_PER_EVENT);
        state.expire_dedup(now, self.dedup_window, max_dedup);
        Ok(())
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        Ok(self.lock().dead_letters.len() as u64)
    }

    async fn erase_user(&self, user: &str) -> Result<Erased, LogError> {
        let mut state = self.lock();
        let mut erased = Erased::default();
        let mut ids = Vec::new();
        state.events.retain(|event| {
            let keep = event.event().application_user_id != user;
            if !keep {
                ids.push(event.event().event_id.clone());
            }
            keep
        });
        erased.events = ids.len() as u64;
        for id in ids {
            if state.dedup.remove(&id).is_some() {
                erased.dedup_entries += 1;
            }
        }
        let before = state.dead_letters.len();
        state
            .dead_letters
            .retain(|letter| user_named_in(&letter.raw_json).as_deref() != Some(user));
        erased.dead_letters = (before - state.dead_letters.len()) as u64;
        Ok(erased)
    }

    fn is_ready(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}
