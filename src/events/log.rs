//! The event-log contract shared by every backend.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    CommittedEvent,
    health::{Damage, LogHealth},
    subscription::{Feed, Filter, Start, SubscriptionError},
    time::Micros,
};
use crate::proto::{DeadLetter, Event};

/// What happened to one event handed to [`EventLog::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly appended at this sequence.
    Appended { sequence: u64 },
    /// Its `event_id` was already appended within the dedup window, at this sequence.
    Duplicate { sequence: u64 },
}

/// What [`EventLog::erase_user`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erased {
    pub events: u64,
    pub dedup_entries: u64,
    pub dead_letters: u64,
}

/// What the log retains right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Smallest sequence still retained; equals `next` when the log is empty.
    pub oldest: u64,
    /// The sequence the next appended event will get.
    pub next: u64,
    /// `received_at` of the newest event removed by retention, if any was removed: a
    /// `since` at or before it may have lost events.
    pub trimmed_through: Option<Micros>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log is shutting down and takes no more writes.
    #[error("the event log is closed")]
    Closed,
    /// The backing store failed; the write did not happen.
    #[error("event log storage failed: {0}")]
    Storage(String),
    /// Stored data is damaged: reading on will not help (SPEC §5: `DATA_LOSS`).
    #[error("{0}")]
    Damaged(Damage),
}

/// A durable, ordered, deduplicating log of events.
///
/// Implementations assign `sequence` (strictly increasing) and clamp `received_at` so it never
/// decreases along the log, which makes `since` a search instead of a scan. After an append
/// is acknowledged, the events are visible to [`EventLog::read`] *before* they are sent on
/// [`EventLog::live`]; subscription cursors rely on that order.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends events atomically and durably, dropping those whose `event_id` was seen within
    /// the dedup window. Returns one outcome per input event, in order.
    async fn append(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, LogError>;

    /// Keeps a payload that could not become an event.
    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), LogError>;

    /// Up to `limit` events with `sequence >= from`, in order.
    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Arc<CommittedEvent>>, LogError>;

    async fn bounds(&self) -> Result<LogBounds, LogError>;

    /// The smallest position whose events were all received at or after `since`.
    async fn position_at(&self, since: Micros) -> Result<u64, LogError>;

    /// Events as they are committed. A receiver that falls behind gets `Lagged` and must
    /// read what it missed from [`EventLog::read`].
    fn live(&self) -> broadcast::Receiver<Arc<CommittedEvent>>;

    /// A backend's own way of following the log from `start`, if it has one (NATS uses an
    /// ordered consumer per subscription). `None`: subscriptions use the generic cursor over
    /// [`EventLog::read`] and [`EventLog::live`].
    async fn follow(
        &self,
        _start: Start,
        _filter: &Filter,
    ) -> Result<Option<Box<dyn Feed>>, SubscriptionError> {
        Ok(None)
    }

    /// Applies retention and forgets expired dedup entries.
    async fn housekeeping(&self) -> Result<(), LogError>;

    /// Removes every event of `user`, their dedup entries, and the dead letters whose
    /// JSON names the user (right to erasure).
    async fn erase_user(&self, user: &str) -> Result<Erased, LogError>;

    /// Number of dead letters kept.
    async fn dead_letter_count(&self) -> Result<u64, LogError>;

    /// Whether the log can take writes now, and if not, why.
    fn health(&self) -> LogHealth;

    /// Whether the log can take writes now.
    fn is_ready(&self) -> bool {
        self.health().is_ready()
    }

    /// Finishes in-flight writes and refuses new ones.
    async fn close(&self);
}
