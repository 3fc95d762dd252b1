//! Live fan-out of committed events.
//!
//! One ring shared by all subscribers: each event, decoded and encoded, is stored once (an
//! `Arc`) however many subscribers there are. The ring is bounded in events *and* in bytes,
//! so a subscriber that stops reading never holds memory or slows the writer, whatever the
//! size of the events: it sees `Lagged` and its cursor re-reads the missed range from the
//! log.
//!
//! `tokio::sync::broadcast` would keep every event until each receiver has seen it, up to
//! its capacity in events: with stalled subscribers and 1 MiB events, 4096 slots held 4 GiB.
//! This ring keeps the newest events within both bounds instead; receivers have the same
//! `recv`/`try_recv` interface and errors.

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::{
    Notify,
    broadcast::error::{RecvError, TryRecvError},
};

use super::CommittedEvent;

/// Events the ring holds at most. Large enough to absorb a webhook burst without sending
/// healthy subscribers to the log (events are a few hundred bytes).
pub const LIVE_CAPACITY: usize = 4096;

/// Event bytes the ring holds at most: a few dozen of the largest events, thousands of
/// ordinary ones.
pub const LIVE_BYTES: usize = 16 * 1024 * 1024;

/// The publishing side; clones share one ring. When the last clone is dropped, receivers
/// get `Closed` once they have read what is left.
pub struct Fanout {
    shared: Arc<Shared>,
}

struct Shared {
    /// Written to push, read to clone an `Arc` out (receivers read side by side); never
    /// held across an await.
    ring: RwLock<Ring>,
    /// Woken on every publish and on close.
    published: Notify,
    senders: AtomicUsize,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<Arc<CommittedEvent>>,
    /// Publish index of `events[0]`; indices count every event ever published.
    first: u64,
    bytes: usize,
    closed: bool,
}

impl Ring {
    fn end(&self) -> u64 {
        self.first + self.events.len() as u64
    }
}

impl Default for Fanout {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                ring: RwLock::default(),
                published: Notify::new(),
                senders: AtomicUsize::new(1),
            }),
        }
    }
}

impl Clone for Fanout {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.write().closed = true;
            self.shared.published.notify_waiters();
        }
    }
}

impl fmt::Debug for Fanout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.shared.read();
        f.debug_struct("Fanout")
            .field("events", &ring.events.len())
            .field("bytes", &ring.bytes)
            .finish()
    }
}

impl Shared {
    // A panic while holding the lock leaves the ring consistent (each step is whole), so a
    // poisoned lock is used as it is.
    fn read(&self) -> RwLockReadGuard<'_, Ring> {
        self.ring
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Ring> {
        self.ring
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Fanout {
    /// Publishes committed events, in sequence order. Never blocks on a subscriber.
    pub fn publish(&self, events: impl IntoIterator<Item = Arc<CommittedEvent>>) {
        {
            let mut ring = self.shared.write();
            for event in events {
                ring.bytes += size_of(&event);
                ring.events.push_back(event);
                while ring.events.len() > LIVE_CAPACITY
                    || (ring.bytes > LIVE_BYTES && ring.events.len() > 1)
                {
                    let dropped = ring.events.pop_front().expect("the ring is not empty");
                    ring.bytes -= size_of(&dropped);
                    ring.first += 1;
                }
            }
        }
        self.shared.published.notify_waiters();
    }

    /// A receiver of the events published from now on.
    pub fn subscribe(&self) -> Receiver {
        let next = self.shared.read().end();
        Receiver {
            shared: self.shared.clone(),
            next,
        }
    }
}

fn size_of(event: &CommittedEvent) -> usize {
    event.encoded_len()
}

/// One subscriber's position in the ring.
pub struct Receiver {
    shared: Arc<Shared>,
    /// Publish index of the next event to return.
    next: u64,
}

impl Receiver {
    /// The next event, without waiting. `Lagged(n)`: `n` events were dropped from the ring
    /// before this receiver read them; the next call returns the oldest one still held.
    pub fn try_recv(&mut self) -> Result<Arc<CommittedEvent>, TryRecvError> {
        let ring = self.shared.read();
        if self.next < ring.first {
            let missed = ring.first - self.next;
            self.next = ring.first;
            return Err(TryRecvError::Lagged(missed));
        }
        match ring.events.get((self.next - ring.first) as usize) {
            Some(event) => {
                self.next += 1;
                Ok(event.clone())
            }
            None if ring.closed => Err(TryRecvError::Closed),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next event, waiting for one to be published.
    pub async fn recv(&mut self) -> Result<Arc<CommittedEvent>, RecvError> {
        loop {
            match self.try_recv() {
                Ok(event) => return Ok(event),
                Err(TryRecvError::Lagged(missed)) => return Err(RecvError::Lagged(missed)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => {}
            }
            let shared = self.shared.clone();
            let published = shared.published.notified();
            tokio::pin!(published);
            // Registered before looking, so a publish between the look and the wait wakes us.
            published.as_mut().enable();
            match self.try_recv() {
                Ok(event) => return Ok(event),
                Err(TryRecvError::Lagged(missed)) => return Err(RecvError::Lagged(missed)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => published.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Event;

    fn event(sequence: u64, raw_json_bytes: usize) -> Arc<CommittedEvent> {
        Arc::new(CommittedEvent::new(Event {
            sequence,
            raw_json: vec![b'x'; raw_json_bytes].into(),
            ..Default::default()
        }))
    }

    #[tokio::test]
    async fn receivers_see_every_event_in_order_then_closed() {
        let fanout = Fanout::default();
        let mut receiver = fanout.subscribe();
        let waiting = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(event) = receiver.recv().await {
                seen.push(event.sequence());
            }
            seen
        });
        for sequence in 1..=100 {
            fanout.publish([event(sequence, 10)]);
            tokio::task::yield_now().await;
        }
        drop(fanout);
        assert_eq!(waiting.await.unwrap(), (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn the_ring_is_bounded_in_bytes_and_a_stalled_receiver_lags() {
        let fanout = Fanout::default();
        let mut stalled = fanout.subscribe();
        let big = 1024 * 1024;
        for sequence in 1..=100 {
            fanout.publish([event(sequence, big)]);
        }
        let held = fanout.shared.read().bytes;
        assert!(held <= LIVE_BYTES, "{held} bytes held");
        let Err(TryRecvError::Lagged(missed)) = stalled.try_recv() else {
            panic!("a stalled receiver lags");
        };
        let oldest = stalled.try_recv().unwrap().sequence();
        assert_eq!(oldest, missed + 1, "lagged by exactly the dropped events");
        // An event bigger than the whole budget is still delivered, alone.
        fanout.publish([event(101, LIVE_BYTES + 1)]);
        let mut late = fanout.subscribe();
        fanout.publish([event(102, 1)]);
        assert_eq!(late.try_recv().unwrap().sequence(), 102);
    }
}
