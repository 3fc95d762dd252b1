//! Subscription cursors: from a start position through history into live events, in
//! sequence order, with no gap and no duplicate.
//!
//! The cursor subscribes to the live fan-out *before* it resolves its start position. A
//! backend makes events readable before it publishes them, so every event at or after the
//! position is either already in the log or still to come on the live receiver. The cursor
//! then reads the log until it is caught up and switches to live events, skipping those
//! below its position. When a live event jumps ahead of the position (the receiver lagged,
//! or something was missed), it goes back to the log for the range in between.

use std::{collections::HashSet, sync::Arc};

use async_trait::async_trait;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::{Backend, CommittedEvent, EventLog, LocalLog, LogError, fanout, time::Micros};
use crate::proto::{Event, EventType, WebhookCategory};

/// Events read from the log per page while catching up, at most.
pub const CATCH_UP_PAGE: usize = 256;

/// Default bytes of a catch-up page (the gRPC server passes its configured budget).
pub const CATCH_UP_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// How much a cursor reads or drains at once: whichever bound comes first, but always at
/// least one event. Bounds a cursor's memory in bytes whatever the size of the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    pub events: usize,
    pub bytes: usize,
}

impl Default for PageLimit {
    fn default() -> Self {
        Self {
            events: CATCH_UP_PAGE,
            bytes: CATCH_UP_PAGE_BYTES,
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only events appended from now on.
    Live,
    /// Events with a sequence greater than this one.
    AfterSequence(u64),
    /// Everything the log retains.
    FromBeginning,
    /// Events received at or after this time.
    Since(Micros),
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("{requested} is older than the log retains; the oldest retained sequence is {oldest}")]
    TooOld { requested: String, oldest: u64 },
    #[error(
        "after_sequence {requested} is ahead of the log, whose last sequence is {last}; was the log reset?"
    )]
    AheadOfLog {
        requested: u64,
        last: u64,
        /// The oldest retained sequence: where a client that accepts the reset restarts.
        oldest: u64,
    },
    #[error("the event log's live feed closed")]
    LiveClosed,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Which events a subscriber wants. Empty lists mean "all".
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub event_types: HashSet<i32>,
    pub application_user_ids: HashSet<String>,
    /// Applies to main events only: results carry no provider.
    pub provider_slugs: HashSet<String>,
}

impl Filter {
    /// Whether the subscriber wants `event`. An empty filter never decodes the event.
    pub fn matches(&self, event: &CommittedEvent) -> bool {
        self.is_empty() || self.matches_decoded(event.event())
    }

    fn is_empty(&self) -> bool {
        self.event_types.is_empty()
            && self.application_user_ids.is_empty()
            && self.provider_slugs.is_empty()
    }

    fn matches_decoded(&self, event: &Event) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(&event.r#type))
            && (self.application_user_ids.is_empty()
                || self
                    .application_user_ids
                    .contains(&event.application_user_id))
            && (self.provider_slugs.is_empty()
                || event.category != WebhookCategory::Main as i32
                || provider_of(event).is_some_and(|p| self.provider_slugs.contains(p)))
    }

    /// Builds a filter, refusing unknown or unspecified event types.
    pub fn new(
        event_types: &[i32],
        application_user_ids: Vec<String>,
        provider_slugs: Vec<String>,
    ) -> Result<Self, String> {
        for &value in event_types {
            match EventType::try_from(value) {
                Ok(EventType::Unspecified) | Err(_) => {
                    return Err(format!(
                        "event_types contains {value}, which is not an event type"
                    ));
                }
                Ok(_) => {}
            }
        }
        Ok(Self {
            event_types: event_types.iter().copied().collect(),
            application_user_ids: application_user_ids.into_iter().collect(),
            provider_slugs: provider_slugs.into_iter().collect(),
        })
    }
}

fn provider_of(event: &Event) -> Option<&str> {
    use crate::proto::event::Payload;
    match event.payload.as_ref()? {
        Payload::RecordChange(change) => Some(&change.provider_slug),
        Payload::ProviderIntegration(integration) => Some(&integration.provider_slug),
        Payload::LabReportResult(_) | Payload::NutritionResult(_) => None,
    }
}

/// An ordered source of events for one subscription.
#[async_trait]
pub trait Feed: Send {
    /// The next events in sequence order; waits when there are none yet.
    async fn next_batch(&mut self) -> Result<Vec<Arc<CommittedEvent>>, SubscriptionError>;
    /// Sequence of the next event this feed will return (one past the last returned).
    fn position(&self) -> u64;
}

/// Opens a feed from `start`: the generic [`Cursor`] over a local log's history and live
/// events, or NATS's own follow ([`super::nats::NatsLog::follow`]). `filter` lets a backend filter at the source; callers still
/// apply it to what they receive.
pub async fn open(
    log: Arc<dyn EventLog>,
    start: Start,
    filter: &Filter,
) -> Result<Box<dyn Feed>, SubscriptionError> {
    open_with(log, start, filter, PageLimit::default()).await
}

/// [`open`] with the generic cursor's pages bounded by `page`.
pub async fn open_with(
    log: Arc<dyn EventLog>,
    start: Start,
    filter: &Filter,
    page: PageLimit,
) -> Result<Box<dyn Feed>, SubscriptionError> {
    match log.backend() {
        Backend::Local(local) => Ok(Box::new(Cursor::open(local, start).await?.with_pages(page))),
        Backend::Nats(nats) => nats.follow(start, filter).await,
    }
}

/// The first position `start` names, checked against what the log retains. Shared by the
/// generic cursor and backends with feeds of their own.
pub fn first_position(
    start: Start,
    bounds: &super::LogBounds,
) -> Result<Option<u64>, SubscriptionError> {
    Ok(match start {
        Start::Live => Some(bounds.next),
        Start::FromBeginning => Some(bounds.oldest),
        Start::AfterSequence(after) => {
            // `after == next - 1` is the newest event: resume live, nothing missed.
            if after >= bounds.next {
                return Err(SubscriptionError::AheadOfLog {
                    requested: after,
                    last: bounds.next.saturating_sub(1),
                    oldest: bounds.oldest,
                });
            }
            let position = after.saturating_add(1);
            if position < bounds.oldest {
                return Err(SubscriptionError::TooOld {
                    requested: format!("after_sequence {after}"),
                    oldest: bounds.oldest,
                });
            }
            Some(position)
        }
        Start::Since(since) => {
            if bounds
                .trimmed_through
                .is_some_and(|trimmed| since <= trimmed)
            {
                return Err(SubscriptionError::TooOld {
                    requested: "since".to_owned(),
                    oldest: bounds.oldest,
                });
            }
            // Depends on the log's contents: the caller searches.
            None
        }
    })
}

/// A position in the log plus the live receiver that continues it.
pub struct Cursor {
    log: Arc<dyn LocalLog>,
    live: fanout::Receiver,
    /// Sequence of the next event to deliver.
    next: u64,
    catching_up: bool,
    page: PageLimit,
}

impl Cursor {
    pub async fn open(log: Arc<dyn LocalLog>, start: Start) -> Result<Self, SubscriptionError> {
        // Subscribe first: see the module comment for why this order closes every gap.
        let live = log.live();
        let bounds = log.bounds().await?;
        let next = match (first_position(start, &bounds)?, start) {
            (Some(position), _) => position,
            (None, Start::Since(since)) => log.position_at(since).await?,
            (None, _) => unreachable!("only `since` needs a search"),
        };
        Ok(Self {
            log,
            live,
            next,
            catching_up: next < bounds.next,
            page: PageLimit::default(),
        })
    }

    /// Bounds each batch this cursor returns by `page`.
    pub fn with_pages(mut self, page: PageLimit) -> Self {
        self.page = page;
        self
    }
}

impl Cursor {
    /// Adds the live events already waiting to `batch`, without waiting for more: under load
    /// a subscriber then takes a run of events per wake-up instead of one.
    fn drain_live(&mut self, batch: &mut Vec<Arc<CommittedEvent>>) {
        let mut bytes: usize = batch.iter().map(|e| e.encoded_len()).sum();
        while batch.len() < self.page.events && bytes < self.page.bytes {
            match self.live.try_recv() {
                Ok(event) if event.sequence() < self.next => continue,
                Ok(event) if event.sequence() == self.next => {
                    self.next += 1;
                    bytes += event.encoded_len();
                    batch.push(event);
                }
                // A gap: the next call reads it from the log, as `next_batch` does.
                Ok(_) | Err(TryRecvError::Lagged(_)) => {
                    self.catching_up = true;
                    return;
                }
                // Closed is reported by the next `recv`, after this batch is delivered.
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }
}

#[async_trait]
impl Feed for Cursor {
    fn position(&self) -> u64 {
        self.next
    }

    /// The next events in order; waits for live events when caught up.
    async fn next_batch(&mut self) -> Result<Vec<Arc<CommittedEvent>>, SubscriptionError> {
        loop {
            if self.catching_up {
                let page = self.log.read_page(self.next, self.page).await?;
                if page.first().is_some_and(|e| e.sequence() > self.next) || page.is_empty() {
                    // Nothing at our position: either caught up, or retention removed it.
                    let oldest = self.log.bounds().await?.oldest;
                    if self.next < oldest {
                        return Err(SubscriptionError::TooOld {
                            requested: format!("position {}", self.next),
                            oldest,
                        });
                    }
                }
                if let Some(last) = page.last() {
                    self.next = last.sequence() + 1;
                    return Ok(page);
                }
                self.catching_up = false;
            }
            match self.live.recv().await {
                Ok(event) if event.sequence() < self.next => continue,
                Ok(event) if event.sequence() == self.next => {
                    self.next += 1;
                    let mut batch = vec![event];
                    self.drain_live(&mut batch);
                    return Ok(batch);
                }
                // Ahead of us: the range in between is in the log.
                Ok(_) | Err(RecvError::Lagged(_)) => self.catching_up = true,
                Err(RecvError::Closed) => return Err(SubscriptionError::LiveClosed),
            }
        }
    }
}
