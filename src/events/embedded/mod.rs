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
//! Faults: [`store`] opens and checks the file and contains redb's panics, [`recovery`]
//! reopens it after a failed commit, and [`salvage`] copies what is readable out of a
//! damaged one.
//!
//! Tables: `events` (sequence → received µs ‖ the event as [`CommittedEvent`] encodes it
//! for subscribers), `dedup` (key → sequence or letter id, first seen µs) and
//! `dedup_expiry` ((first seen µs, key) → ()) for the dedup keys the events do not give:
//! dead letters' [`super::dead_letter_key`]s and ids of events retention removed inside the
//! window; `dead_letters` (id → received µs ‖ encoded `DeadLetter`), and `meta` (the next
//! dead-letter id, how far retention trimmed, the next sequence once events were removed
//! from the end, the identity rule of the ids written, and since when).
//!
//! Event ids are deduplicated in memory by the shared admission rule
//! ([`super::admission`]), rebuilt at start-up from `events` and `dedup` ([`index`]), so
//! an append writes one table with sequential keys.
//!
//! Upgrade from 0.1: its dedup index holds ids of the old identity rule. The first open by
//! this release records `legacy_ids_before` (now) if the index is not empty; until that
//! instant plus the dedup window, an append also looks up each event's `legacy_event_id`
//! and counts a match first seen before that instant as a duplicate. A store created by
//! this release records no such instant and never pays the second lookup.

use std::{
    path::Path,
    sync::{
        Arc, Mutex, OnceLock,
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
    Admission, Admitted, Backend, CommitObserver, CommittedEvent, Erased, EventLog, LocalLog,
    LogBounds, LogError, LogHealth,
    admission::Gate,
    fanout::{self, Fanout},
    names_user,
    subscription::PageLimit,
    time::{Micros, now_micros},
};
use crate::proto::DeadLetter;

mod checkpoint;
pub use checkpoint::CHECKPOINT_FILE;
#[doc(hidden)]
pub use checkpoint::{Measured as CheckpointTimes, measure as measure_checkpoint};
mod index;
mod recovery;
pub mod salvage;
pub mod store;
mod writer;
use store::{Fault, Health, Slot};
use writer::Writer;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const DEDUP: TableDefinition<&str, (u64, i64)> = TableDefinition::new("dedup");
const DEDUP_EXPIRY: TableDefinition<(i64, &str), ()> = TableDefinition::new("dedup_expiry");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Consumer groups' snapshots ([`super::groups::Group::snapshot`]) by group name.
const CONSUMER_GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("consumer_groups");

const META_NEXT_SEQUENCE: &str = "next_sequence";
const META_NEXT_DEAD_LETTER: &str = "next_dead_letter";
const META_TRIMMED_THROUGH: &str = "trimmed_through_micros";
/// The identity rule of the event ids this store's dedup index holds; absent in 0.1 stores.
const META_ID_RULE: &str = "id_rule";
/// Set when a 0.1 store was first opened by this release: dedup entries first seen before
/// it may hold old-rule ids (µs since the epoch).
const META_LEGACY_IDS_BEFORE: &str = "legacy_ids_before_micros";
/// Whole-content event ids (SPEC §2.4); 0.1's field-based ids were rule 1.
const ID_RULE: u64 = 2;

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
    /// The open database; the writer swaps it when it reopens the file after a fault.
    slot: Arc<Slot>,
    commands: mpsc::Sender<Command>,
    fanout: Fanout,
    // Set once on close(); appends check it first so no new write is accepted after.
    closed: AtomicBool,
    // Write failures (set by the writer, cleared when it recovers) and damage (set by
    // whoever meets it, kept); /readyz and gRPC health report it.
    health: Arc<Health>,
    // The writer's thread, joined by close(). A std Mutex: only touched at shutdown.
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    // Write transactions committed so far; shows group commit at work (commits < appends).
    commits: Arc<AtomicU64>,
    // Set once, after open, by whoever exports the commits' latency; the writer reads it
    // after each commit (a OnceLock: one atomic load when set, nothing to lock).
    commit_observer: Arc<OnceLock<Arc<dyn CommitObserver>>>,
    // Until when appends may look up 0.1-rule ids (the gate's rule, read once at open).
    legacy_ids_until: Option<Micros>,
}

enum Command {
    Append {
        admission: Admission,
        reply: oneshot::Sender<Result<Admitted, LogError>>,
    },
    Housekeeping {
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    Erase {
        user: String,
        reply: oneshot::Sender<Result<Erased, LogError>>,
    },
    /// Consumer groups' snapshots to store (`Some`) or delete (`None`), in one transaction.
    SaveGroups {
        writes: Vec<(String, Option<Vec<u8>>)>,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    Shutdown,
}

fn storage(err: impl Into<redb::Error>) -> LogError {
    LogError::Storage(err.into().to_string())
}

impl EmbeddedLog {
    /// Opens (or creates) `events.redb` in `data_dir`. Recovers after a crash on its own;
    /// refuses a damaged file, or a data directory whose log file is gone (see [`store`]).
    pub fn open(
        data_dir: &Path,
        dedup_window: Duration,
        retention: Duration,
    ) -> Result<Self, LogError> {
        Self::open_with(data_dir, dedup_window, retention, true)
    }

    /// [`EmbeddedLog::open`], verifying every page first only if `check` (see
    /// `GATEWAY_LOG_CHECK_ON_START`).
    pub fn open_with(
        data_dir: &Path,
        dedup_window: Duration,
        retention: Duration,
        check: bool,
    ) -> Result<Self, LogError> {
        let path = store::log_path(data_dir);
        let db = store::open_checked(data_dir, check)?;
        let db = Arc::new(db);
        let (next, last_received) = store::contain(|| Ok(initialise(&db)?)).map_err(|fault| {
            LogError::Storage(format!(
                "cannot read where {} left off: {}",
                path.display(),
                fault.detail()
            ))
        })?;
        let legacy_ids_before =
            store::contain(|| Ok(mark_id_rule(&db, now_micros())?)).map_err(|fault| {
                LogError::Storage(format!(
                    "cannot record the identity rule in {}: {}",
                    path.display(),
                    fault.detail()
                ))
            })?;
        let window = dedup_window.as_micros() as Micros;
        let tip = Tip {
            next,
            last_received,
            window,
            legacy_ids_before,
        };
        let gate = load_index(&db, &path, &tip).map_err(|fault| {
            LogError::Storage(format!(
                "cannot rebuild the dedup index from {}: {}",
                path.display(),
                fault.detail()
            ))
        })?;
        let legacy_ids_until = gate.legacy_ids_until();
        let fanout = Fanout::default();
        let health = Arc::new(Health::default());
        let slot = Arc::new(Slot::new(db.clone()));
        let commits = Arc::new(AtomicU64::new(0));
        let commit_observer = Arc::new(OnceLock::new());
        let (commands, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            db,
            path,
            slot: slot.clone(),
            fanout: fanout.clone(),
            health: health.clone(),
            commits: commits.clone(),
            commit_observer: commit_observer.clone(),
            gate,
            pending: None,
            dedup_window: window,
            retention: retention.as_micros() as Micros,
            fault: None,
        };
        let handle = thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| LogError::Storage(format!("cannot start the writer thread: {e}")))?;

        Ok(Self {
            slot,
            commands,
            fanout,
            closed: AtomicBool::new(false),
            health,
            writer: Mutex::new(Some(handle)),
            commits,
            commit_observer,
            legacy_ids_until,
        })
    }

    /// Reports every successful commit of appends from now on to `observer`; the first
    /// observer set stays.
    pub fn observe_commits(&self, observer: Arc<dyn CommitObserver>) {
        let _ = self.commit_observer.set(observer);
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

    /// Runs `read` on a blocking thread against the current database. `at` starts as the
    /// sequence the read is about (if any) and the read advances it as it goes, so damage
    /// is reported at the first sequence it could not read. A panic inside redb becomes
    /// [`LogError::Damaged`], never a dead task.
    async fn with_reader<T: Send + 'static>(
        &self,
        at: Option<u64>,
        read: impl FnOnce(&Database, &mut Option<u64>) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, LogError> {
        let db = self.slot.get()?;
        let health = self.health.clone();
        tokio::task::spawn_blocking(move || {
            let mut at = at;
            let result = store::contain(|| Ok(read(&db, &mut at)?));
            result.map_err(|fault| match fault {
                Fault::Damaged(detail) => health.damaged(at, &detail),
                Fault::Transient(detail) => LogError::Storage(detail),
            })
        })
        .await
        .map_err(|e| LogError::Storage(format!("reader task failed: {e}")))?
    }
}

/// Where the log left off and how its dedup index is kept: what an empty gate starts from.
struct Tip {
    next: u64,
    last_received: Micros,
    window: Micros,
    legacy_ids_before: Option<Micros>,
}

impl Tip {
    fn gate(&self) -> Gate {
        Gate::new(self.next, self.last_received, self.window)
            .with_legacy_ids_before(self.legacy_ids_before)
    }
}

/// The admission rule's state for this store: the tip, and the dedup index from the
/// checkpoint of the last clean shutdown if it is valid ([`checkpoint`]), else rebuilt
/// from the log (after upgrading an older store's `dedup` table once; see [`index`]).
fn load_index(db: &Database, log: &Path, tip: &Tip) -> Result<Gate, Fault> {
    store::contain(|| Ok(index::upgrade(db)?))?;
    let now = now_micros();
    if let Some(gate) = checkpoint::take(db, log, tip.gate(), now, tip.window)? {
        return Ok(gate);
    }
    let started = std::time::Instant::now();
    let mut gate = tip.gate();
    let loaded = store::contain(|| Ok(index::rebuild(db, &mut gate, now, tip.window)?))?;
    tracing::info!(
        entries = loaded,
        bytes = gate.allocated_bytes(),
        took = ?started.elapsed(),
        "dedup index rebuilt from the log"
    );
    Ok(gate)
}

/// Creates the tables and reads where the log left off.
fn initialise(db: &Database) -> Result<(u64, Micros), redb::Error> {
    let txn = db.begin_write()?;
    let state = {
        let events = txn.open_table(EVENTS)?;
        txn.open_table(DEDUP)?;
        txn.open_table(DEDUP_EXPIRY)?;
        txn.open_table(DEAD_LETTERS)?;
        txn.open_table(CONSUMER_GROUPS)?;
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

/// Records the identity rule on first open; returns since when old-rule ids may be in the
/// dedup index (a 0.1 store with entries), if ever.
fn mark_id_rule(db: &Database, now: Micros) -> Result<Option<Micros>, redb::Error> {
    // Read first: a store already marked needs no write at start-up (a needless commit
    // would also rewrite pages of a file start-up has not yet found damaged).
    {
        let txn = db.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(meta) => Some(meta),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(meta) = meta
            && meta.get(META_ID_RULE)?.is_some()
        {
            return Ok(meta
                .get(META_LEGACY_IDS_BEFORE)?
                .map(|v| v.value() as Micros));
        }
    }
    let txn = db.begin_write()?;
    let legacy = {
        let mut meta = txn.open_table(META)?;
        if meta.get(META_ID_RULE)?.is_none() {
            if !txn.open_table(DEDUP)?.is_empty()? {
                meta.insert(META_LEGACY_IDS_BEFORE, now.max(0) as u64)?;
                tracing::info!(
                    "event log written by 0.1: its event ids stay recognised as duplicates for one dedup window"
                );
            }
            index_old_letters(&txn)?;
            meta.insert(META_ID_RULE, ID_RULE)?;
        }
        meta.get(META_LEGACY_IDS_BEFORE)?
            .map(|v| v.value() as Micros)
    };
    txn.commit()?;
    Ok(legacy)
}

/// 0.1 did not deduplicate dead letters: give each stored one its dedup entry, first seen
/// when it was received, so a redelivery within the window does not store it again.
fn index_old_letters(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    let letters = txn.open_table(DEAD_LETTERS)?;
    let mut dedup = txn.open_table(DEDUP)?;
    let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
    for entry in letters.iter()? {
        let (id, value) = entry?;
        let letter = decode_letter(id.value(), value.value())?;
        let key = super::dead_letter_key(&letter);
        let received = received_of(value.value());
        if dedup.get(key.as_str())?.is_none() {
            dedup.insert(key.as_str(), (id.value(), received))?;
            expiry.insert((received, key.as_str()), ())?;
        }
    }
    Ok(())
}

/// A stored dead letter, with its id (the table key).
fn decode_letter(id: u64, value: &[u8]) -> Result<DeadLetter, redb::Error> {
    let mut letter = DeadLetter::decode(value.get(8..).unwrap_or_default())
        .map_err(|e| redb::Error::Corrupted(format!("undecodable dead letter {id}: {e}")))?;
    letter.id = id;
    Ok(letter)
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

/// The first position in `range` whose next stored event was received at or after
/// `since`, or `range.end` if none: `received_at` never decreases along the log, so a
/// binary search. `probe` is told each sequence looked at (for the damage report).
fn first_received_from(
    events: &impl ReadableTable<u64, &'static [u8]>,
    range: std::ops::Range<u64>,
    since: Micros,
    mut probe: impl FnMut(u64),
) -> Result<u64, redb::Error> {
    let (mut low, mut high) = (range.start, range.end);
    while low < high {
        let mid = low + (high - low) / 2;
        probe(mid);
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
    async fn admit(&self, admission: Admission) -> Result<Admitted, LogError> {
        if admission.is_empty() {
            return Ok(Admitted::default());
        }
        self.send(|reply| Command::Append { admission, reply })
            .await
    }

    async fn dead_letters(
        &self,
        after_id: u64,
        limit: usize,
        user: Option<&str>,
    ) -> Result<Vec<DeadLetter>, LogError> {
        let user = user.map(str::to_owned);
        self.with_reader(None, move |db, _| {
            let txn = db.begin_read()?;
            let letters = txn.open_table(DEAD_LETTERS)?;
            let mut out = Vec::new();
            for entry in letters.range(after_id.saturating_add(1)..)? {
                if out.len() == limit {
                    break;
                }
                let (key, value) = entry?;
                let letter = decode_letter(key.value(), value.value())?;
                if user.as_deref().is_none_or(|u| names_user(&letter, u)) {
                    out.push(letter);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn bounds(&self) -> Result<LogBounds, LogError> {
        self.with_reader(None, |db, _| {
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

    async fn housekeeping(&self) -> Result<(), LogError> {
        self.send(|reply| Command::Housekeeping { reply }).await
    }

    async fn erase_user(&self, user: &str) -> Result<Erased, LogError> {
        let user = user.to_owned();
        self.send(|reply| Command::Erase { user, reply }).await
    }

    fn wants_legacy_ids(&self) -> bool {
        self.legacy_ids_until
            .is_some_and(|until| now_micros() < until)
    }

    fn health(&self) -> LogHealth {
        if self.commands.is_closed() && !self.closed.load(Ordering::Acquire) {
            return LogHealth::WriteFailing("the event log writer stopped".into());
        }
        self.health.current()
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.health.close();
        // Everything queued before Shutdown is still committed and answered.
        let _ = self.commands.send(Command::Shutdown).await;
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    fn backend(self: Arc<Self>) -> Backend {
        Backend::Local(self)
    }
}

#[async_trait]
impl LocalLog for EmbeddedLog {
    async fn load_consumer_groups(&self) -> Result<Vec<Vec<u8>>, LogError> {
        self.with_reader(None, |db, _| {
            let txn = db.begin_read()?;
            let table = match txn.open_table(CONSUMER_GROUPS) {
                Ok(table) => table,
                // A store opened read-only before the table existed: no groups yet.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut snapshots = Vec::new();
            for entry in table.iter()? {
                snapshots.push(entry?.1.value().to_vec());
            }
            Ok(snapshots)
        })
        .await
    }

    async fn save_consumer_groups(
        &self,
        writes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), LogError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.send(|reply| Command::SaveGroups { writes, reply })
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
        self.with_reader(Some(from), move |db, at| {
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
                let decode = || -> Result<CommittedEvent, redb::Error> {
                    let (key, value) = entry?;
                    let value = value.value();
                    *at = Some(key.value());
                    let wire = value.get(8..).unwrap_or_default();
                    if page.capacity() < wire.len() {
                        page = BytesMut::with_capacity(READ_BUFFER_BYTES.max(wire.len()));
                    }
                    page.extend_from_slice(wire);
                    read += wire.len();
                    stored_event_at(key.value(), received_of(value), page.split().freeze())
                };
                match decode() {
                    Ok(event) => {
                        *at = Some(event.sequence() + 1);
                        out.push(Arc::new(event));
                    }
                    // Deliver what was read before the damage; the next read, starting
                    // at the damage, reports it.
                    Err(_) if !out.is_empty() => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn position_at(&self, since: Micros) -> Result<u64, LogError> {
        self.with_reader(None, move |db, at| {
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let meta = txn.open_table(META)?;
            let next = next_sequence(&events, &meta)?;
            let first = events.first()?.map_or(next, |(k, _)| k.value());
            first_received_from(&events, first..next, since, |mid| {
                *at = Some(mid);
            })
        })
        .await
    }

    fn live(&self) -> fanout::Receiver {
        self.fanout.subscribe()
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        self.with_reader(None, |db, _| {
            let txn = db.begin_read()?;
            Ok(txn.open_table(DEAD_LETTERS)?.len()?)
        })
        .await
    }
}
