//! The event-log contract shared by every backend.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    CommittedEvent, fanout,
    subscription::{Feed, Filter, PageLimit, Start, SubscriptionError},
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

    /// Like [`EventLog::read`], bounded in bytes too: stops after the event that brings the
    /// page's encoded size to `limit.bytes` (so a page is never empty while events remain).
    /// Subscription cursors read with it, so a catch-up page costs at most about
    /// `limit.bytes` whatever the size of the events.
    ///
    /// The default reads short runs, so it holds at most one run past the bound; a backend
    /// that allocates on reading can stop exactly.
    async fn read_page(
        &self,
        from: u64,
        limit: PageLimit,
    ) -> Result<Vec<Arc<CommittedEvent>>, LogError> {
        /// Events per run of the default: small, for events up to the body limit (MiBs).
        const RUN: usize = 8;
        let mut page = Vec::new();
        let mut bytes = 0;
        let mut at = from;
        while page.len() < limit.events && bytes < limit.bytes {
            let run = self.read(at, (limit.events - page.len()).min(RUN)).await?;
            let Some(last) = run.last() else { break };
            at = last.sequence() + 1;
            for event in run {
                if bytes >= limit.bytes {
                    break;
                }
                bytes += event.encoded(true).len();
                page.push(event);
            }
        }
        Ok(page)
    }

    async fn bounds(&self) -> Result<LogBounds, LogError>;

    /// The smallest position whose events were all received at or after `since`.
    async fn position_at(&self, since: Micros) -> Result<u64, LogError>;

    /// Events as they are committed. A receiver that falls behind gets `Lagged` and must
    /// read what it missed from [`EventLog::read`].
    fn live(&self) -> fanout::Receiver;

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

    /// Whether the log can take writes now.
    fn is_ready(&self) -> bool;

    /// Finishes in-flight writes and refuses new ones.
    async fn close(&self);
}
