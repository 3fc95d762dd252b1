//! The `embedded` backend (the default): a redb database in the data directory.
//!
//! Why redb: pure Rust (no C toolchain or system library), ACID transactions whose commit
//! with `Durability::Immediate` is durable when it returns (checksummed pages, crash-tested
//! against power loss and `kill -9`), MVCC readers that never block the writer, a stable
//! file format, and an active maintainer.
//!
//! Writes go through one writer thread fed by a bounded queue. Each turn it takes every
//! command queued while the previous commit was syncing and commits them in one
//! transaction: a burst of N webhooks pays one fsync, not N (group commit). Readers
//! (catch-up, `since`, bounds) open their own read transactions and never wait for it.
//!
//! Tables: `events` (sequence → received µs ‖ the event as [`CommittedEvent`] encodes it
//! for subscribers), `dedup` (event_id → sequence, first seen µs), `dedup_expiry` ((first
//! seen µs, event_id) → ()) to expire the dedup index in order, `dead_letters` (id →
//! received µs ‖ encoded `DeadLetter`), and `meta` (the next dead-letter id, how far
//! retention trimmed, and the next sequence once events were removed from the end).

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{
    AppendOutcome, CommittedEvent, Erased, EventLog, LogBounds, LogError,
    fanout::{self, Fanout},
    subscription::PageLimit,
    time::Micros,
};
use crate::proto::{DeadLetter, Event};

mod writer;
use writer::Writer;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const DEDUP: TableDefinition<&str, (u64, i64)> = TableDefinition::new("dedup");
const DEDUP_EXPIRY: TableDefinition<(i64, &str), ()> = TableDefinition::new("dedup_expiry");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_NEXT_SEQUENCE: &str = "next_sequence";
const META_NEXT_DEAD_LETTER: &str = "next_dead_letter";
const META_TRIMMED_THROUGH: &str = "trimmed_through_micros";

/// Commands waiting for the writer. Bounded so a stalled disk pushes back on webhook
/// handlers (which then time out into a 503 and a Spike retry) instead of queueing without
/// limit; 1024 comfortably exceeds the requests in flight at once.
const QUEUE_CAPACITY: usize = 1024;
/// Most commands folded into one transaction, to bound its size and latency.
const MAX_GROUP: usize = 512;
/// redb's page cache. Its default (1 GiB) let RSS reach ~670 MiB after a million events;
/// recent events, which subscribers read, fit well within this.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Size of the buffers catch-up reads copy events into: a page of 256 typical events.
const READ_BUFFER_BYTES: usize = 128 * 1024;
/// Most rows one housekeeping transaction deletes, so retention never stalls appends long.
const HOUSEKEEPING_CHUNK: usize = 10_000;

pub struct EmbeddedLog {
    db: Arc<Database>,
    commands: mpsc::Sender<Command>,
    fanout: Fanout,
    // Set once on close(); appends check it first so no new write is accepted after.
    closed: AtomicBool,
    // Cleared by the writer when a commit fails (disk full, I/O error), set again on the
    // next success; /readyz reports it.
    healthy: Arc<AtomicBool>,
    // The writer's thread, joined by close(). A std Mutex: only touched at shutdown.
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    // Write transactions committed so far; shows group commit at work (commits < appends).
    commits: Arc<AtomicU64>,
}

enum Command {
    Append {
        events: Vec<Event>,
        reply: oneshot::Sender<Result<Vec<AppendOutcome>, LogError>>,
    },
    DeadLetter {
        letter: DeadLetter,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    Housekeeping {
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    Erase {
        user: String,
        reply: oneshot::Sender<Result<Erased, LogError>>,
    },
    Shutdown,
}

fn storage(err: impl Into<redb::Error>) -> LogError {
    LogError::Storage(err.into().to_string())
}

impl EmbeddedLog {
    /// Opens (or creates) `events.redb` in `data_dir`. Recovers after a crash on its own.
    pub fn open(
        data_dir: &Path,
        dedup_window: Duration,
        retention: Duration,
    ) -> Result<Self, LogError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| LogError::Storage(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("events.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| LogError::Storage(format!("cannot open {}: {e}", path.display())))?;
        let db = Arc::new(db);

        let (next, last_received) = initialise(&db).map_err(storage)?;
        let fanout = Fanout::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let commits = Arc::new(AtomicU64::new(0));
        let (commands, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            db: db.clone(),
            fanout: fanout.clone(),
            healthy: healthy.clone(),
            commits: commits.clone(),
            next,
            last_received,
            dedup_window: dedup_window.as_micros() as Micros,
            retention: retention.as_micros() as Micros,
        };
        let handle = thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| LogError::Storage(format!("cannot start the writer thread: {e}")))?;

        Ok(Self {
            db,
            commands,
            fanout,
            closed: AtomicBool::new(false),
            healthy,
            writer: Mutex::new(Some(handle)),
            commits,
        })
    }

    /// Append/dead-letter transactions committed since open (each one fsync).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    async fn send<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> Command,
    ) -> Result<T, LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| LogError::Closed)?;
        // A dropped reply means the writer stopped before handling it: nothing was written.
        answer.await.map_err(|_| LogError::Closed)?
    }

    async fn with_reader<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, LogError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .map_err(|e| LogError::Storage(format!("reader task failed: {e}")))?
            .map_err(storage)
    }
}

/// Creates the tables and reads where the log left off.
fn initialise(db: &Database) -> Result<(u64, Micros), redb::Error> {
    let txn = db.begin_write()?;
    let state = {
        let events = txn.open_table(EVENTS)?;
        txn.open_table(DEDUP)?;
        txn.open_table(DEDUP_EXPIRY)?;
        txn.open_table(DEAD_LETTERS)?;
        let meta = txn.open_table(META)?;
        let next = next_sequence(&events, &meta)?;
        let last_received = events
            .last()?
            .map_or(Micros::MIN, |(_, v)| received_of(v.value()));
        (next, last_received)
    };
    txn.commit()?;
    Ok(state)
}

/// Stored values start with the 8-byte big-endian received time, then the protobuf.
fn stored_value(received: Micros, message: &impl Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 + message.encoded_len());
    buf.extend_from_slice(&received.to_be_bytes());
    message
        .encode(&mut buf)
        .expect("a Vec grows as needed, so encoding cannot run out of space");
    buf
}

/// An event's stored value: the received time, then the bytes subscribers are sent, so
/// reading it back re-encodes nothing.
fn stored_event(received: Micros, event: &CommittedEvent) -> Vec<u8> {
    let wire = event.encoded(true);
    let mut buf = Vec::with_capacity(8 + wire.len());
    buf.extend_from_slice(&received.to_be_bytes());
    buf.extend_from_slice(&wire);
    buf
}

fn received_of(value: &[u8]) -> Micros {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, Micros::from_be_bytes)
}

/// The event stored at `sequence` (its value copied out of the database).
fn decode_event(sequence: u64, value: &[u8]) -> Result<CommittedEvent, redb::Error> {
    let wire = Bytes::copy_from_slice(value.get(8..).unwrap_or_default());
    stored_event_at(sequence, received_of(value), wire)
}

fn stored_event_at(
    sequence: u64,
    received: Micros,
    wire: Bytes,
) -> Result<CommittedEvent, redb::Error> {
    CommittedEvent::stored(sequence, received, wire)
        .map_err(|e| redb::Error::Corrupted(format!("undecodable event at {sequence}: {e}")))
}

/// The sequence the next event gets: one past the last event, unless retention or erasure
/// removed events from the end, in which case `meta` recorded it. Appends do not write
/// `meta`, so that a commit touches as few tables as it can.
fn next_sequence(
    events: &impl ReadableTable<u64, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<u64, redb::StorageError> {
    let recorded = meta.get(META_NEXT_SEQUENCE)?.map_or(1, |v| v.value());
    let after_last = events.last()?.map_or(1, |(k, _)| k.value() + 1);
    Ok(recorded.max(after_last))
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, LogError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.send(|reply| Command::Append { events, reply }).await
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), LogError> {
        self.send(|reply| Command::DeadLetter { letter, reply })
            .await
    }

    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Arc<CommittedEvent>>, LogError> {
        self.read_page(
            from,
            PageLimit {
                events: limit,
                bytes: usize::MAX,
            },
        )
        .await
    }

    async fn read_page(
        &self,
        from: u64,
        PageLimit {
            events: limit,
            bytes,
        }: PageLimit,
    ) -> Result<Vec<Arc<CommittedEvent>>, LogError> {
        self.with_reader(move |db| {
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let mut out = Vec::with_capacity(limit.min(1024));
            // One allocation for many events: each event's bytes are a view into `page`.
            let mut page = BytesMut::new();
            let mut read = 0usize;
            for entry in events.range(from..)?.take(limit) {
                if read >= bytes {
                    break;
                }
                let (key, value) = entry?;
                let value = value.value();
                let wire = value.get(8..).unwrap_or_default();
                if page.capacity() < wire.len() {
                    page = BytesMut::with_capacity(READ_BUFFER_BYTES.max(wire.len()));
                }
                page.extend_from_slice(wire);
                read += wire.len();
                let event =
                    stored_event_at(key.value(), received_of(value), page.split().freeze())?;
                out.push(Arc::new(event));
            }
            Ok(out)
        })
        .await
    }

    async fn bounds(&self) -> Result<LogBounds, LogError> {
        self.with_reader(|db| {
            // One read transaction: oldest, next and trimmed_through from one snapshot.
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let meta = txn.open_table(META)?;
            let next = next_sequence(&events, &meta)?;
            let oldest = events.first()?.map_or(next, |(k, _)| k.value());
            let trimmed_through = meta.get(META_TRIMMED_THROUGH)?.map(|v| v.value() as Micros);
            Ok(LogBounds {
                oldest,
                next,
                trimmed_through,
            })
        })
        .await
    }

    async fn position_at(&self, since: Micros) -> Result<u64, LogError> {
        self.with_reader(move |db| {
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let meta = txn.open_table(META)?;
            let next = next_sequence(&events, &meta)?;
            // received_at never decreases along the log: binary search on the sequence for
            // the first position whose next stored event was received at or after `since`.
            let (mut low, mut high) = (events.first()?.map_or(next, |(k, _)| k.value()), next);
            while low < high {
                let mid = low + (high - low) / 2;
                let at_or_after = match events.range(mid..)?.next() {
                    Some(entry) => received_of(entry?.1.value()) >= since,
                    None => true,
                };
                if at_or_after {
                    high = mid;
                } else {
                    low = mid + 1;
                }
            }
            Ok(low)
        })
        .await
    }

    fn live(&self) -> fanout::Receiver {
        self.fanout.subscribe()
    }

    async fn housekeeping(&self) -> Result<(), LogError> {
        self.send(|reply| Command::Housekeeping { reply }).await
    }

    async fn erase_user(&self, user: &str) -> Result<Erased, LogError> {
        let user = user.to_owned();
        self.send(|reply| Command::Erase { user, reply }).await
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        self.with_reader(|db| {
            let txn = db.begin_read()?;
            Ok(txn.open_table(DEAD_LETTERS)?.len()?)
        })
        .await
    }

    fn is_ready(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.healthy.load(Ordering::Acquire)
            && !self.commands.is_closed()
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Everything queued before Shutdown is still committed and answered.
        let _ = self.commands.send(Command::Shutdown).await;
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}
