//! The dedup index saved at a clean shutdown and loaded at the next open instead of the
//! rebuild from the log ([`super::index::rebuild`]: 0.6–0.8 µs an event on two cores,
//! reading redb on one and indexing on the other; loading the checkpoint reads one
//! sequential file, about 0.15 µs an entry).
//!
//! Exactness comes first, so a checkpoint is used only if it describes this store as it is:
//! - the writer saves it after its last command, when every commit is durable, with the
//!   store's [`Tail`] read in the transaction that records a fresh random token in `meta`;
//! - open removes the file (durably) before the writer starts, so after a crash there is
//!   no checkpoint to trust, and one is never used twice;
//! - it is used only if its magic, version, checksum (CRC-32 of the whole file) and tail
//!   match and the dedup window did not grow since. A restored or salvaged log (salvage
//!   copies no token), a file cut short or altered, a changed store or window: one line of
//!   log, then the rebuild. Starting never fails over a checkpoint, and a gate is only
//!   handed on once the whole file was read and checked.
//!
//! Entries outside the window at load are dropped, as the rebuild drops them. The file
//! holds the index's own form (128-bit keys in runs of consecutive ids), so nothing is
//! parsed: ~16 bytes an entry.
//!
//! Layout, little-endian: magic, version, [`Header`]; per compact prefix its name, key
//! count and runs (first seen, first id, length, keys); the other keys (count, then length,
//! bytes, id, first seen each); the CRC-32 of everything before it.

use std::{
    fs::File,
    hash::{BuildHasher, RandomState},
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
    time::Instant,
};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{DEDUP, EVENTS, META, META_NEXT_DEAD_LETTER, next_sequence, received_of, store};
use crate::events::{
    admission::{Gate, Hit, Key},
    time::{Micros, now_micros},
};

/// The checkpoint in the data directory, next to the log file.
pub const CHECKPOINT_FILE: &str = "dedup.checkpoint";
const MAGIC: &[u8; 8] = b"SGDEDUP\n";
/// Raise on any change of the layout: an older or newer file is then rebuilt over.
const VERSION: u32 = 1;
/// The token of the last checkpoint saved (`meta`); 0 or absent: none.
const META_CHECKPOINT_TOKEN: &str = "checkpoint_token";
/// Most keys in one run of the file, so a reader's buffer stays at 64 KiB.
const RUN_MAX: usize = 4096;
/// Buffer of the file's reader and writer: large sequential reads and writes.
const IO_BUFFER: usize = 1 << 20;

/// What identifies the store a checkpoint was saved for. The token alone tells this log's
/// state since the save from any other (a backup restored over it, a salvaged copy); the
/// rest would also tell a later state written after a checkpoint was copied aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail {
    next: u64,
    last_received: Micros,
    events: u64,
    dedup_rows: u64,
    next_dead_letter: u64,
    token: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    /// The dedup window the gate was kept with: a larger one at load would need entries
    /// the gate had already let go.
    window: Micros,
    /// When it was saved: a clock before it would count entries the gate had expired.
    saved_at: Micros,
    tail: Tail,
}

/// Why a checkpoint was not used: said in the one line logged.
#[derive(Debug)]
struct Rejected(String);

impl From<io::Error> for Rejected {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => Rejected("the file is truncated".into()),
            _ => Rejected(format!("cannot read it: {e}")),
        }
    }
}

fn reject<T>(why: &str) -> Result<T, Rejected> {
    Err(Rejected(why.to_owned()))
}

/// The store's tail, read the way start-up reads where the log left off.
fn tail_of(
    events: &impl ReadableTable<u64, &'static [u8]>,
    dedup: &impl ReadableTableMetadata,
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<Tail, redb::Error> {
    let value =
        |key: &str| -> Result<u64, redb::Error> { Ok(meta.get(key)?.map_or(0, |v| v.value())) };
    Ok(Tail {
        next: next_sequence(events, meta)?,
        last_received: events
            .last()?
            .map_or(Micros::MIN, |(_, v)| received_of(v.value())),
        events: events.len()?,
        dedup_rows: dedup.len()?,
        next_dead_letter: value(META_NEXT_DEAD_LETTER)?,
        token: value(META_CHECKPOINT_TOKEN)?,
    })
}

/// Records a fresh token and returns the tail with it, in one durable commit: the last
/// write before the checkpoint, so the file describes the store exactly.
fn seal(db: &Database) -> Result<Tail, redb::Error> {
    let token = RandomState::new().hash_one(now_micros()).max(1);
    let txn = db.begin_write()?;
    let tail = {
        let mut meta = txn.open_table(META)?;
        meta.insert(META_CHECKPOINT_TOKEN, token)?;
        tail_of(&txn.open_table(EVENTS)?, &txn.open_table(DEDUP)?, &meta)?
    };
    txn.commit()?;
    Ok(tail)
}

fn expected_tail(db: &Database) -> Result<Tail, redb::Error> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    tail_of(&txn.open_table(EVENTS)?, &txn.open_table(DEDUP)?, &meta)
}

/// Saves `gate` next to `log`. Called by the writer once nothing is left to write; a
/// failure costs only the next start's speed (it rebuilds), so it is logged, not raised.
pub(super) fn save(db: &Database, log: &Path, gate: &Gate, window: Micros) {
    let started = Instant::now();
    let path = log.with_file_name(CHECKPOINT_FILE);
    let saved = store::contain(|| Ok(seal(db)?))
        .map_err(|fault| fault.detail().to_owned())
        .and_then(|tail| {
            let header = Header {
                window,
                saved_at: now_micros(),
                tail,
            };
            write_atomically(&path, &header, gate).map_err(|e| e.to_string())
        });
    match saved {
        Ok(bytes) => tracing::info!(
            bytes,
            took = ?started.elapsed(),
            "dedup index saved for the next start"
        ),
        Err(error) => tracing::warn!(
            error,
            "cannot save the dedup index; the next start rebuilds it from the log"
        ),
    }
}

/// Writes a temporary file, syncs it, renames it over `path` and syncs the directory: a
/// crash leaves either no checkpoint or a whole one. Returns the bytes written.
fn write_atomically(path: &Path, header: &Header, gate: &Gate) -> io::Result<u64> {
    let temporary = path.with_extension("tmp");
    let written = (|| {
        let mut out = Out::new(BufWriter::with_capacity(
            IO_BUFFER,
            File::create(&temporary)?,
        ));
        write_header(&mut out, header)?;
        for prefix in 0..Gate::prefixes().len() {
            write_compact(&mut out, gate, prefix)?;
        }
        write_other(&mut out, gate)?;
        let bytes = out.finish()?;
        std::fs::rename(&temporary, path)?;
        store::sync_dir(path)?;
        Ok(bytes)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// A writer that checksums what it writes.
struct Out {
    inner: BufWriter<File>,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl Out {
    fn new(inner: BufWriter<File>) -> Self {
        Self {
            inner,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
        self.inner.write_all(bytes)
    }

    /// Appends the checksum and makes the file durable; returns its length.
    fn finish(mut self) -> io::Result<u64> {
        let crc = self.crc.clone().finalize();
        self.inner.write_all(&crc.to_le_bytes())?;
        let file = self
            .inner
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(self.bytes + 4)
    }
}

fn write_header(out: &mut Out, header: &Header) -> io::Result<()> {
    let Tail {
        next,
        last_received,
        events,
        dedup_rows,
        next_dead_letter,
        token,
    } = header.tail;
    out.put(MAGIC)?;
    out.put(&VERSION.to_le_bytes())?;
    for value in [header.window, header.saved_at, last_received] {
        out.put(&value.to_le_bytes())?;
    }
    for value in [next, events, dedup_rows, next_dead_letter, token] {
        out.put(&value.to_le_bytes())?;
    }
    Ok(())
}

/// One compact index: its prefix, how many keys, then runs of keys first seen at one time
/// with consecutive ids (one per commit, as the index keeps them).
fn write_compact(out: &mut Out, gate: &Gate, prefix: usize) -> io::Result<()> {
    let name = Gate::prefixes()[prefix];
    out.put(&[name.len() as u8])?;
    out.put(name.as_bytes())?;
    out.put(&(gate.indexed_len(prefix) as u64).to_le_bytes())?;
    let mut head = Hit {
        id: 0,
        first_seen: 0,
    };
    let mut run = Vec::with_capacity(RUN_MAX * 16);
    let mut len = 0;
    for (key, hit) in gate.indexed_compact(prefix) {
        let extends = len > 0
            && len < RUN_MAX
            && hit.first_seen == head.first_seen
            && hit.id == head.id + len as u64;
        if !extends {
            write_run(out, head, len, &run)?;
            (head, len) = (hit, 0);
            run.clear();
        }
        run.extend_from_slice(&key.to_le_bytes());
        len += 1;
    }
    write_run(out, head, len, &run)
}

fn write_run(out: &mut Out, head: Hit, len: usize, keys: &[u8]) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    out.put(&head.first_seen.to_le_bytes())?;
    out.put(&head.id.to_le_bytes())?;
    out.put(&(len as u32).to_le_bytes())?;
    out.put(keys)
}

/// The keys that are not of the compact form (dead letters' keys, ids of other forms).
fn write_other(out: &mut Out, gate: &Gate) -> io::Result<()> {
    let entries: Vec<(&str, Hit)> = gate.indexed_other().collect();
    out.put(&(entries.len() as u64).to_le_bytes())?;
    for (key, hit) in entries {
        out.put(&(key.len() as u32).to_le_bytes())?;
        out.put(key.as_bytes())?;
        out.put(&hit.id.to_le_bytes())?;
        out.put(&hit.first_seen.to_le_bytes())?;
    }
    Ok(())
}

/// The gate a checkpoint of this store gives, if one was saved for the store as it is now.
/// The file is removed first whatever it holds, before the writer can write, so a crash
/// later never finds one. `fresh` is the empty gate to fill. `Ok(None)`: rebuild.
pub(super) fn take(
    db: &Database,
    log: &Path,
    fresh: Gate,
    now: Micros,
    window: Micros,
) -> Result<Option<Gate>, store::Fault> {
    let path = log.with_file_name(CHECKPOINT_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot open the dedup checkpoint; rebuilding the index from the log");
            invalidate(db, &path)?;
            return Ok(None);
        }
    };
    invalidate(db, &path)?;
    let started = Instant::now();
    let loaded = store::contain(|| Ok(expected_tail(db)?))
        .map_err(|fault| Rejected(format!("cannot read the log's tail: {}", fault.detail())))
        .and_then(|expected| load(file, &expected, fresh, now, window));
    match loaded {
        Ok(gate) => {
            tracing::info!(
                bytes = gate.allocated_bytes(),
                took = ?started.elapsed(),
                "dedup index loaded from the checkpoint saved at the last clean shutdown"
            );
            Ok(Some(gate))
        }
        Err(Rejected(reason)) => {
            tracing::warn!(
                reason,
                "dedup checkpoint not used; rebuilding the index from the log"
            );
            Ok(None)
        }
    }
}

/// Makes sure no later open finds this checkpoint: removes it durably, or if that fails,
/// clears the token it was saved with, so it can never match again.
fn invalidate(db: &Database, path: &Path) -> Result<(), store::Fault> {
    let removed = std::fs::remove_file(path).and_then(|()| store::sync_dir(path));
    let Err(e) = removed else {
        return Ok(());
    };
    tracing::warn!(error = %e, path = %path.display(), "cannot remove the dedup checkpoint; voiding it in the log instead");
    store::contain(|| Ok(clear_token(db)?))
}

fn clear_token(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(META)?.remove(META_CHECKPOINT_TOKEN)?;
    txn.commit()?;
    Ok(())
}

/// Reads the whole file into `gate`, checking it against `expected` as it goes and its
/// checksum at the end. Any error drops the gate: a partial index is never used.
fn load(
    file: File,
    expected: &Tail,
    mut gate: Gate,
    now: Micros,
    window: Micros,
) -> Result<Gate, Rejected> {
    let len = file.metadata()?.len();
    let mut input = In::new(BufReader::with_capacity(IO_BUFFER, file), len);
    let header = read_header(&mut input)?;
    if header.tail != *expected {
        return reject(
            "it was saved for another state of the log (restored, salvaged or written since)",
        );
    }
    if window > header.window {
        return reject("the dedup window grew since it was saved");
    }
    if now < header.saved_at {
        return reject("the clock is before the time it was saved");
    }
    for prefix in 0..Gate::prefixes().len() {
        read_compact(&mut input, &mut gate, prefix, now)?;
    }
    read_other(&mut input, &mut gate, now)?;
    input.finish()?;
    Ok(gate)
}

fn read_header(input: &mut In) -> Result<Header, Rejected> {
    if input.take(MAGIC.len())? != MAGIC {
        return reject("it is not a dedup checkpoint");
    }
    let version = u32::from_le_bytes(input.array()?);
    if version != VERSION {
        return Err(Rejected(format!(
            "its version is {version}, this release reads {VERSION}"
        )));
    }
    let (window, saved_at, last_received) = (input.i64()?, input.i64()?, input.i64()?);
    let tail = Tail {
        next: input.u64()?,
        last_received,
        events: input.u64()?,
        dedup_rows: input.u64()?,
        next_dead_letter: input.u64()?,
        token: input.u64()?,
    };
    Ok(Header {
        window,
        saved_at,
        tail,
    })
}

fn read_compact(
    input: &mut In,
    gate: &mut Gate,
    prefix: usize,
    now: Micros,
) -> Result<(), Rejected> {
    let name_len = usize::from(input.array::<1>()?[0]);
    if input.take(name_len)? != Gate::prefixes()[prefix].as_bytes() {
        return reject("its id prefixes are not this release's");
    }
    let count = input.u64()?;
    // Checked against the file's length before reserving: a damaged count must not
    // allocate (the checksum is only known at the end).
    if count.saturating_mul(16) > input.len {
        return reject("a key count exceeds the file");
    }
    gate.reserve(prefix, count as usize);
    let mut read = 0;
    while read < count {
        let (first_seen, first_id) = (input.i64()?, input.u64()?);
        let len = u64::from(u32::from_le_bytes(input.array()?));
        if len == 0 || len > RUN_MAX as u64 || read + len > count {
            return reject("a run of keys is malformed");
        }
        let keys = input.take(len as usize * 16)?;
        // Dropped as the rebuild drops them: outside the window now.
        if gate.inside(first_seen, now) {
            for (i, key) in keys.chunks_exact(16).enumerate() {
                let bits = u128::from_le_bytes(key.try_into().expect("16 bytes"));
                let hit = Hit {
                    id: first_id + i as u64,
                    first_seen,
                };
                gate.restore(Key::Compact(prefix, bits), hit);
            }
        }
        read += len;
    }
    Ok(())
}

fn read_other(input: &mut In, gate: &mut Gate, now: Micros) -> Result<(), Rejected> {
    let count = input.u64()?;
    for _ in 0..count {
        let len = u32::from_le_bytes(input.array()?) as usize;
        let key = std::str::from_utf8(input.take(len)?)
            .map_err(|_| Rejected("a key is not UTF-8".into()))?
            .to_owned();
        let (id, first_seen) = (input.u64()?, input.i64()?);
        if gate.inside(first_seen, now) {
            gate.restore(Key::Other(&key), Hit { id, first_seen });
        }
    }
    Ok(())
}

/// A reader that checksums what it reads and never reads (or allocates) past the file.
struct In {
    inner: BufReader<File>,
    crc: crc32fast::Hasher,
    buf: Vec<u8>,
    len: u64,
    read: u64,
}

impl In {
    fn new(inner: BufReader<File>, len: u64) -> Self {
        Self {
            inner,
            crc: crc32fast::Hasher::new(),
            buf: Vec::new(),
            len,
            read: 0,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Rejected> {
        if self.read + n as u64 > self.len {
            return reject("the file is truncated");
        }
        self.buf.resize(n, 0);
        self.inner.read_exact(&mut self.buf)?;
        self.crc.update(&self.buf);
        self.read += n as u64;
        Ok(&self.buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Rejected> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u64(&mut self) -> Result<u64, Rejected> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, Rejected> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// Checks the stored checksum, and that nothing follows it.
    fn finish(mut self) -> Result<(), Rejected> {
        let computed = self.crc.clone().finalize();
        let stored = u32::from_le_bytes(self.array()?);
        if stored != computed {
            return reject("its checksum does not match");
        }
        if self.read != self.len {
            return reject("bytes follow its checksum");
        }
        Ok(())
    }
}

/// Times of [`measure`]: building a gate in memory, saving it, loading it back.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub build: std::time::Duration,
    pub save: std::time::Duration,
    pub load: std::time::Duration,
    pub bytes: u64,
}

/// For `benches/store.rs`: the checkpoint alone for a gate of `entries` compact ids in
/// commits of 1,000, built directly (no log on disk, which takes long to fill at 10 M).
#[doc(hidden)]
pub fn measure(dir: &Path, entries: u64) -> io::Result<Measured> {
    let window = Micros::MAX / 4;
    let started = Instant::now();
    let mut gate = Gate::new(entries + 1, 0, window);
    for n in 0..entries {
        let bits = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        gate.restore(
            Key::Compact(0, bits),
            Hit {
                id: n + 1,
                first_seen: 1 + (n / 1000) as Micros,
            },
        );
    }
    let build = started.elapsed();
    let tail = Tail {
        next: entries + 1,
        last_received: 0,
        events: entries,
        dedup_rows: 0,
        next_dead_letter: 0,
        token: 1,
    };
    let header = Header {
        window,
        saved_at: 0,
        tail,
    };
    let path = dir.join(CHECKPOINT_FILE);
    let started = Instant::now();
    let bytes = write_atomically(&path, &header, &gate)?;
    let save = started.elapsed();
    drop(gate);
    let started = Instant::now();
    let loaded = load(
        File::open(&path)?,
        &tail,
        Gate::new(entries + 1, 0, window),
        1,
        window,
    )
    .map_err(|Rejected(why)| io::Error::other(why))?;
    let load = started.elapsed();
    assert_eq!(loaded.indexed_len(0) as u64, entries, "every entry loaded");
    Ok(Measured {
        build,
        save,
        load,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::{
        events::{
            Admission, AppendOutcome, EventLog, dead_letter_key,
            embedded::{EmbeddedLog, index, store::log_path},
            time::from_micros,
        },
        proto::{DeadLetter, Event},
    };

    const WINDOW: Duration = Duration::from_secs(3600);
    const USERS: [&str; 3] = ["ann", "bob", "cid"];

    fn compact_id(n: u64) -> String {
        let bits = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        format!("main-{bits:032x}")
    }

    /// An id not of the compact form: held in the exact map.
    fn other_id(n: u64) -> String {
        format!("legacy-{n}")
    }

    fn event(id: String, n: u64) -> Event {
        Event {
            event_id: id,
            application_user_id: USERS[n as usize % USERS.len()].into(),
            raw_json: b"{}".to_vec().into(),
            ..Event::default()
        }
    }

    fn letter(n: u64) -> DeadLetter {
        DeadLetter {
            received_at: Some(from_micros(now_micros())),
            path_category: 1,
            raw_json: format!("unreadable {n}").into_bytes(),
            application_user_ids: vec![USERS[n as usize % USERS.len()].into()],
            ..DeadLetter::default()
        }
    }

    fn events(ids: impl Iterator<Item = u64>, id: fn(u64) -> String) -> Vec<Event> {
        ids.map(|n| event(id(n), n)).collect()
    }

    /// A store with every kind of dedup entry, closed cleanly: ids of events retention
    /// removed inside the window (0..30, and other-form ids), events still stored (30..70),
    /// dead letters, and one user's events and letters erased (between the others).
    async fn build(dir: &Path) {
        // Retention shorter than the window: housekeeping moves ids to `dedup` rows.
        let log = EmbeddedLog::open(dir, WINDOW, Duration::from_micros(1)).unwrap();
        log.append(events(0..30, compact_id)).await.unwrap();
        log.append(events(0..5, other_id)).await.unwrap();
        log.housekeeping().await.unwrap();
        log.append(events(30..60, compact_id)).await.unwrap();
        let letters = Admission {
            dead_letters: (0..6).map(letter).collect(),
            ..Admission::default()
        };
        log.admit(letters).await.unwrap();
        let erased = log.erase_user("bob").await.unwrap();
        assert!(erased.events > 0 && erased.dead_letters > 0, "{erased:?}");
        log.append(events(60..70, compact_id)).await.unwrap();
        log.close().await;
    }

    /// Every key the probes ask about: stored, trimmed, erased, lettered and never seen.
    fn probes() -> Vec<String> {
        let mut keys: Vec<String> = (0..80).map(compact_id).collect();
        keys.extend((0..8).map(other_id));
        keys.extend((0..8).map(|n| dead_letter_key(&letter(n))));
        keys
    }

    fn decisions(gate: &Gate, now: Micros) -> Vec<Option<Hit>> {
        probes().iter().map(|key| gate.seen(key, now)).collect()
    }

    fn copy_without_checkpoint(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != CHECKPOINT_FILE {
                std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
            }
        }
        to
    }

    fn checkpoint_of(dir: &Path) -> PathBuf {
        dir.join(CHECKPOINT_FILE)
    }

    fn window() -> Micros {
        WINDOW.as_micros() as Micros
    }

    fn database(dir: &Path) -> Database {
        Database::open(log_path(dir)).unwrap()
    }

    /// Loads `dir`'s checkpoint as open would, keeping the file.
    fn load_from(dir: &Path, now: Micros, window: Micros) -> Result<Gate, Rejected> {
        let db = database(dir);
        let file = File::open(checkpoint_of(dir)).unwrap();
        load(
            file,
            &expected_tail(&db).unwrap(),
            Gate::new(1, 0, window),
            now,
            window,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpoint_gives_the_index_a_rebuild_gives() {
        let saved = tempfile::tempdir().unwrap();
        build(saved.path()).await;
        assert!(
            checkpoint_of(saved.path()).exists(),
            "a clean close saves one"
        );
        let crashed = copy_without_checkpoint(saved.path());
        let (now, window) = (now_micros(), window());

        let db = database(saved.path());
        let loaded = take(
            &db,
            &log_path(saved.path()),
            Gate::new(1, 0, window),
            now,
            window,
        )
        .unwrap()
        .expect("the checkpoint matches the store");
        assert!(!checkpoint_of(saved.path()).exists(), "taken means removed");
        let mut rebuilt = Gate::new(1, 0, window);
        index::rebuild(&database(crashed.path()), &mut rebuilt, now, window).unwrap();
        // Handed over in many small batches, the events index the same.
        let mut batched = Gate::new(1, 0, window);
        index::rebuild_in_batches(&database(crashed.path()), &mut batched, now, window, 7).unwrap();

        let expected = decisions(&rebuilt, now);
        assert_eq!(decisions(&loaded, now), expected);
        assert_eq!(decisions(&batched, now), expected);
        let known = |key: &str| rebuilt.seen(key, now).is_some();
        assert!(
            known(&compact_id(0)) && known(&compact_id(69)),
            "trimmed and stored ids"
        );
        assert!(known(&other_id(0)) && known(&dead_letter_key(&letter(0))));
        // Erasure removes stored events' ids (retention-removed ones are no longer bob's).
        assert!(
            !known(&compact_id(31)) && !known(&compact_id(58)),
            "bob's ids were erased"
        );
        assert!(
            !known(&dead_letter_key(&letter(1))),
            "bob's letter was erased"
        );
        assert!(!known(&compact_id(70)) && !known(&other_id(5)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_decides_the_same_with_the_checkpoint_as_without() {
        let saved = tempfile::tempdir().unwrap();
        build(saved.path()).await;
        let crashed = copy_without_checkpoint(saved.path());
        let mut outcomes = Vec::new();
        for dir in [saved.path(), crashed.path()] {
            let log = EmbeddedLog::open(dir, WINDOW, WINDOW).unwrap();
            assert!(!checkpoint_of(dir).exists(), "removed before any write");
            let mut probe = events(0..80, compact_id);
            probe.extend(events(0..8, other_id));
            let admission = Admission {
                events: probe.into_iter().map(Into::into).collect(),
                dead_letters: (0..8).map(letter).collect(),
                ..Admission::default()
            };
            let admitted = log.admit(admission).await.unwrap();
            outcomes.push((admitted.events, admitted.dead_letters));
            log.close().await;
        }
        assert_eq!(outcomes[0], outcomes[1]);
        let duplicates = outcomes[0].0.iter();
        let duplicates = duplicates.filter(|o| matches!(o, AppendOutcome::Duplicate { .. }));
        assert!(duplicates.count() > 40, "{:?}", outcomes[0].0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_that_does_not_match_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), WINDOW, WINDOW).unwrap();
        log.append(events(0..10, compact_id)).await.unwrap();
        log.close().await;
        drop(log);
        let path = checkpoint_of(dir.path());
        let good = std::fs::read(&path).unwrap();
        let (now, window) = (now_micros(), window());
        assert!(load_from(dir.path(), now, window).is_ok());

        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 1;
        let mut version = good.clone();
        version[8] += 1;
        let mut trailing = good.clone();
        trailing.push(0);
        let cases = [
            (good[..good.len() - 5].to_vec(), "truncated"),
            (Vec::new(), "truncated"),
            (flipped, "checksum"),
            (version, "version"),
            (trailing, "bytes follow"),
        ];
        for (bytes, reason) in cases {
            std::fs::write(&path, bytes).unwrap();
            let Rejected(why) = load_from(dir.path(), now, window).err().expect(reason);
            assert!(why.contains(reason), "{reason}: {why}");
        }
        std::fs::write(&path, &good).unwrap();
        let Rejected(why) = load_from(dir.path(), now, window * 2).err().unwrap();
        assert!(why.contains("window grew"), "{why}");
        let Rejected(why) = load_from(dir.path(), now - window, window).err().unwrap();
        assert!(why.contains("clock"), "{why}");

        // A checkpoint kept aside from an earlier state of the same log.
        let log = EmbeddedLog::open(dir.path(), WINDOW, WINDOW).unwrap();
        log.append(events(10..11, compact_id)).await.unwrap();
        log.close().await;
        drop(log);
        std::fs::write(&path, &good).unwrap();
        let Rejected(why) = load_from(dir.path(), now_micros(), window).err().unwrap();
        assert!(why.contains("another state"), "{why}");

        // Open removes it and rebuilds: every id is still a duplicate.
        let log = EmbeddedLog::open(dir.path(), WINDOW, WINDOW).unwrap();
        assert!(!path.exists());
        let again = log.append(events(0..11, compact_id)).await.unwrap();
        let all_duplicates = again
            .iter()
            .all(|o| matches!(o, AppendOutcome::Duplicate { .. }));
        assert!(all_duplicates, "{again:?}");
        log.close().await;
    }

    /// Entries outside the window when the checkpoint is loaded are dropped, as the
    /// rebuild drops them; the rest keep their ids and times.
    #[test]
    fn entries_outside_the_window_at_load_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = checkpoint_of(dir.path());
        let mut gate = Gate::new(1, 0, 100);
        for n in 0..10_000u64 {
            gate.remember(&compact_id(n), n + 1, 1 + n as i64 / 1000);
        }
        gate.remember("dead-letter:main:00", 7, 3);
        gate.remember("dead-letter:main:01", 8, 9);
        gate.forget(&compact_id(9_999));
        let tail = Tail {
            next: 10_001,
            last_received: 10,
            events: 10_000,
            dedup_rows: 2,
            next_dead_letter: 9,
            token: 42,
        };
        let header = Header {
            window: 100,
            saved_at: 20,
            tail,
        };
        write_atomically(&path, &header, &gate).unwrap();
        let now = 105; // the cutoff is 5: entries first seen at 1..=5 are out
        let file = File::open(&path).unwrap();
        let loaded = load(file, &tail, Gate::new(1, 0, 100), now, 100).unwrap();
        // First seen at 6..=10 (less the erased one), and the later letter.
        assert_eq!(loaded.entries(), 5_000 - 1 + 1);
        assert_eq!(loaded.seen(&compact_id(4_999), now), None);
        let hit = loaded.seen(&compact_id(5_000), now).unwrap();
        assert_eq!((hit.id, hit.first_seen), (5_001, 6));
        assert_eq!(
            loaded.seen(&compact_id(9_999), now),
            None,
            "erased stays erased"
        );
        assert_eq!(loaded.seen("dead-letter:main:00", now), None);
        assert_eq!(loaded.seen("dead-letter:main:01", now).unwrap().id, 8);
    }
}
