//! Live fan-out of committed events.
//!
//! One `tokio::sync::broadcast` ring shared by all subscribers: each event, decoded and encoded,
//! is stored once (an `Arc`) however many subscribers there are. The ring is bounded, so a subscriber that
//! stops reading never holds memory or slows the writer; it sees `Lagged` and its cursor
//! re-reads the missed range from the log.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::CommittedEvent;

/// Events the ring holds. Large enough to absorb a webhook burst without sending healthy
/// subscribers to the log, small enough to bound memory (events are a few hundred bytes).
pub const LIVE_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct Fanout {
    sender: broadcast::Sender<Arc<CommittedEvent>>,
}

impl Default for Fanout {
    fn default() -> Self {
        let (sender, _) = broadcast::channel(LIVE_CAPACITY);
        Self { sender }
    }
}

impl Fanout {
    /// Publishes committed events, in sequence order. Never blocks.
    pub fn publish(&self, events: impl IntoIterator<Item = Arc<CommittedEvent>>) {
        for event in events {
            // An error only means nobody is subscribed right now; the log has the event.
            let _ = self.sender.send(event);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CommittedEvent>> {
        self.sender.subscribe()
    }
}
