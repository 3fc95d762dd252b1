//! The event-log contract shared by every backend.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    CommittedEvent, fanout,
    health::{Damage, LogHealth},
    subscription::PageLimit,
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

/// One event to append, with the id the previous release's identity rule gave it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: Event,
    /// The 0.1 release's `event_id` of the same item, when it differs from `event_id`. A
    /// backend whose dedup index may still hold ids of that rule treats a match as a
    /// duplicate too, so a redelivery across the upgrade appends nothing.
    pub legacy_event_id: Option<String>,
}

impl From<Event> for NewEvent {
    fn from(event: Event) -> Self {
        Self {
            event,
            legacy_event_id: None,
        }
    }
}

/// Everything one request (or one redrive batch) stores, committed atomically.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Appended in order, deduplicated by `event_id` (and `legacy_event_id`).
    pub events: Vec<NewEvent>,
    /// New dead letters (`id` 0; the log assigns it), deduplicated by
    /// [`dead_letter_key`] within the dedup window, so a retried request stores none twice.
    pub dead_letters: Vec<DeadLetter>,
    /// Stored letters rewritten in place, by `id`: a redriven letter's current reason, or
    /// user ids backfilled into a letter stored by 0.1. Ids no longer stored are skipped.
    pub updated: Vec<DeadLetter>,
    /// Stored letters removed (redriven into events). Ids no longer stored are skipped.
    pub resolved: Vec<u64>,
}

impl Admission {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.dead_letters.is_empty()
            && self.updated.is_empty()
            && self.resolved.is_empty()
    }
}

/// What [`EventLog::admit`] did, one outcome per input, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admitted {
    pub events: Vec<AppendOutcome>,
    /// For dead letters `sequence` is the letter's id: the new one, or for a duplicate the
    /// id of the letter stored first.
    pub dead_letters: Vec<AppendOutcome>,
}

/// A dead letter's dedup key: its path category and a hash of its exact bytes. Spike
/// retries the same bytes on the same path, so a retry finds the letter its first attempt
/// stored. Never equal to an `event_id` (those start with their category's name).
pub fn dead_letter_key(letter: &DeadLetter) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(&letter.raw_json);
    format!(
        "dead-letter:{}:{}",
        letter.path_category,
        hex::encode(digest)
    )
}

/// Whether a stored letter names `user`, by the ids recorded when it was stored: the one
/// test erasure and the list filter apply on every backend.
pub fn names_user(letter: &DeadLetter, user: &str) -> bool {
    letter.application_user_ids.iter().any(|id| id == user)
}

/// Places `event` at the tip of a log that assigns positions itself (embedded, memory; NATS
/// takes both from JetStream): the next sequence, and `received_at` (now, when the event
/// carries none) clamped so that it never decreases along the log, which keeps `since` a
/// search. The one copy of that rule. Returns the stored `received_at`.
pub(super) fn place_at_tip(
    event: &mut Event,
    now: Micros,
    next: &mut u64,
    last_received: &mut Micros,
) -> Micros {
    let received = event
        .received_at
        .as_ref()
        .map_or(now, super::time::to_micros)
        .max(*last_received);
    *last_received = received;
    event.received_at = Some(super::time::from_micros(received));
    event.sequence = *next;
    *next += 1;
    received
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

/// How subscriptions and consumer groups read a log: the choice of reader, in types.
pub enum Backend {
    /// History and live events in this process (memory, embedded): `Subscribe` uses the
    /// generic cursor over [`LocalLog`], and consumer groups are served over it.
    Local(Arc<dyn LocalLog>),
    /// NATS JetStream, which follows the stream itself (an ordered consumer per
    /// subscription) and keeps no history in this process.
    Nats(Arc<super::nats::NatsLog>),
}

impl Backend {
    /// The local capability, if this is a local backend.
    pub fn local(self) -> Option<Arc<dyn LocalLog>> {
        match self {
            Self::Local(local) => Some(local),
            Self::Nats(_) => None,
        }
    }

    /// Number of dead letters stored (the `dead_letters_stored` gauge reads it). On NATS it
    /// is the dead-letter stream's message count, shared by every replica.
    pub async fn dead_letter_count(&self) -> Result<u64, LogError> {
        match self {
            Self::Local(local) => local.dead_letter_count().await,
            Self::Nats(nats) => nats.dead_letter_count().await,
        }
    }
}

/// A durable, ordered, deduplicating log of events: what production calls on every backend.
///
/// Implementations assign `sequence` (strictly increasing) and give every event a
/// `received_at`. Reading is not here: see [`EventLog::backend`].
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Stores a request's events and dead letters (and a redrive's removals) atomically and
    /// durably: all of it or none of it. Events whose `event_id` was seen within the dedup
    /// window, and letters whose [`dead_letter_key`] was, are not stored again.
    ///
    /// NATS has no transaction across its two streams; see [`super::nats`] for why its
    /// message ids give a retried request the same result.
    async fn admit(&self, admission: Admission) -> Result<Admitted, LogError>;

    /// Appends events only: [`EventLog::admit`] without dead letters.
    async fn append(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, LogError> {
        let events = events.into_iter().map(NewEvent::from).collect();
        Ok(self
            .admit(Admission {
                events,
                ..Admission::default()
            })
            .await?
            .events)
    }

    /// Up to `limit` stored dead letters with `id > after_id`, in id order; with `user`,
    /// only those whose `application_user_ids` contain it.
    async fn dead_letters(
        &self,
        after_id: u64,
        limit: usize,
        user: Option<&str>,
    ) -> Result<Vec<DeadLetter>, LogError>;

    async fn bounds(&self) -> Result<LogBounds, LogError>;

    /// Which reader subscriptions use: the generic cursor over a [`LocalLog`], or the
    /// backend's own follow (NATS).
    fn backend(self: Arc<Self>) -> Backend;

    /// Applies retention and forgets expired dedup entries.
    async fn housekeeping(&self) -> Result<(), LogError>;

    /// Removes every event of `user`, their dedup entries, and the dead letters whose
    /// recorded `application_user_ids` name the user, with their dedup entries (right to
    /// erasure). Reads no JSON: the ids were recorded when each letter was stored.
    async fn erase_user(&self, user: &str) -> Result<Erased, LogError>;

    /// Whether [`EventLog::admit`] may still look up a [`NewEvent::legacy_event_id`]: while
    /// the dedup index can hold ids of the 0.1 rule (a store upgraded from 0.1, within its
    /// dedup window). Once false it stays false, so callers may skip deriving them.
    fn wants_legacy_ids(&self) -> bool;

    /// Whether the log can take writes now, and if not, why.
    fn health(&self) -> LogHealth;

    /// Whether the log can take writes now.
    fn is_ready(&self) -> bool {
        self.health().is_ready()
    }

    /// Finishes in-flight writes and refuses new ones.
    async fn close(&self);
}

/// A log whose history and live events are read in this process (memory, embedded).
///
/// `received_at` never decreases along the log, which makes `since` a search instead of a
/// scan. After an append is acknowledged, its events are visible to [`LocalLog::read`]
/// *before* they are sent on [`LocalLog::live`]; subscription cursors rely on that order.
#[async_trait]
pub trait LocalLog: EventLog {
    /// Up to `limit` events with `sequence >= from`, in order.
    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Arc<CommittedEvent>>, LogError>;

    /// Like [`LocalLog::read`], bounded in bytes too: stops after the event that brings the
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

    /// The smallest position whose events were all received at or after `since`.
    async fn position_at(&self, since: Micros) -> Result<u64, LogError>;

    /// Events as they are committed. A receiver that falls behind gets `Lagged` and must
    /// read what it missed from [`LocalLog::read`].
    fn live(&self) -> fanout::Receiver;

    /// Number of dead letters stored.
    async fn dead_letter_count(&self) -> Result<u64, LogError>;

    /// The consumer groups' saved snapshots. A backend that keeps groups only in process
    /// (memory) has none.
    async fn load_consumer_groups(&self) -> Result<Vec<Vec<u8>>, LogError> {
        Ok(Vec::new())
    }

    /// Stores (`Some`) or deletes (`None`) consumer groups' snapshots by name, all or
    /// none. A backend that keeps groups only in process stores nothing.
    async fn save_consumer_groups(
        &self,
        _writes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), LogError> {
        Ok(())
    }
}
