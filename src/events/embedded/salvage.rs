//! `spike-gateway salvage --from DIR --to NEW_DIR`: copies every readable event, dedup
//! entry and dead letter of a damaged log into a new data directory.
//!
//! The damaged file is never written: salvage works on a copy (redb may need to repair a
//! file a crash left, which writes). Events and dead letters keep their keys, so the new
//! log continues the original sequences and subscribers resume with `after_sequence` as
//! before. Where a read fails, salvage searches forward for the next readable key
//! (doubling, then bisecting) and reports the sequences in between as unreadable.
//! Dedup entries are copied as far as they can be read, and rebuilt for every salvaged
//! event whose entry was not read, so Spike's redeliveries of those stay duplicates.

use std::{collections::BTreeMap, fmt, path::Path};

use prost::Message;
use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    DEAD_LETTERS, DEDUP, DEDUP_EXPIRY, EVENTS, META, META_ID_RULE, META_LEGACY_IDS_BEFORE,
    META_NEXT_DEAD_LETTER, META_NEXT_SEQUENCE, META_TRIMMED_THROUGH, decode_event, initialise,
    store::{self, Fault, LOG_FILE, MARKER_FILE, contain},
};
use crate::{events::time::Micros, proto::DeadLetter};

/// Why salvage stopped; printed as one line.
#[derive(Debug, thiserror::Error)]
#[error("salvage: {0}")]
pub struct SalvageError(String);

/// Rows read per read transaction, and written per write transaction.
const CHUNK: usize = 4096;
/// The copy of the damaged file salvage reads, inside the new directory.
const WORKING_COPY: &str = "salvage-source.redb.tmp";

/// What salvage copied, and what it could not read.
#[derive(Debug, Default)]
pub struct SalvageReport {
    pub events: u64,
    pub dedup_entries: u64,
    /// Dedup entries made from salvaged events because their own could not be read.
    pub dedup_rebuilt: u64,
    pub dead_letters: u64,
    pub unreadable: Vec<Unreadable>,
    /// The sequence the new log gives its next event.
    pub next_sequence: u64,
}

/// Keys of one table that could not be read. `last: None` means "to the end".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub table: &'static str,
    pub first: u64,
    pub last: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.table {
            "events" => "sequences",
            "dead_letters" => "dead letters",
            other => other,
        };
        match self.last {
            Some(last) if last == self.first => write!(f, "{what} {}", self.first)?,
            Some(last) => write!(f, "{what} {}..={last}", self.first)?,
            None => write!(f, "{what} {} to the end", self.first)?,
        }
        write!(f, " ({})", self.detail)
    }
}

impl fmt::Display for SalvageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "salvaged {} events, {} dedup entries ({} rebuilt from events), {} dead letters; \
             the next sequence is {}",
            self.events,
            self.dedup_entries + self.dedup_rebuilt,
            self.dedup_rebuilt,
            self.dead_letters,
            self.next_sequence
        )?;
        if self.unreadable.is_empty() {
            write!(f, "nothing was unreadable")
        } else {
            write!(f, "unreadable (not copied):")?;
            for gap in &self.unreadable {
                write!(f, "\n  {gap}")?;
            }
            Ok(())
        }
    }
}

/// Salvages the log of `from` into a new log in `to` (which must not hold a log).
pub fn salvage(from: &Path, to: &Path) -> Result<SalvageReport, SalvageError> {
    let source = store::log_path(from);
    match std::fs::metadata(&source) {
        Ok(meta) if meta.len() > 0 => {}
        Ok(_) => return Err(refused(format!("{} is empty", source.display()))),
        Err(e) => return Err(refused(format!("cannot read {}: {e}", source.display()))),
    }
    if to.join(LOG_FILE).exists() || to.join(MARKER_FILE).exists() {
        return Err(refused(format!(
            "{} already holds a log; salvage into a new directory",
            to.display()
        )));
    }
    std::fs::create_dir_all(to)
        .map_err(|e| refused(format!("cannot create {}: {e}", to.display())))?;
    let copy = to.join(WORKING_COPY);
    std::fs::copy(&source, &copy)
        .map_err(|e| refused(format!("cannot copy {}: {e}", source.display())))?;
    let result = salvage_copy(&copy, to);
    let _ = std::fs::remove_file(&copy);
    result
}

fn refused(reason: String) -> SalvageError {
    SalvageError(reason)
}

fn salvage_copy(copy: &Path, to: &Path) -> Result<SalvageReport, SalvageError> {
    let source = open_source(copy)?;
    let target = Database::create(to.join(LOG_FILE))
        .map_err(|e| refused(format!("cannot create the new log: {e}")))?;
    initialise(&target).map_err(|e| refused(format!("cannot initialise the new log: {e}")))?;
    let mut report = SalvageReport::default();

    let mut salvaged_ids = BTreeMap::new();
    let mut last_sequence = 0;
    let events = copy_keyed(&source, EVENTS, "events", |sequence, value| {
        let event = decode_event(sequence, value).ok()?;
        salvaged_ids.insert(
            event.event().event_id.clone(),
            (sequence, event.received_at()),
        );
        last_sequence = last_sequence.max(sequence);
        Some(value.to_vec())
    });
    report.unreadable.extend(events.unreadable);
    report.events = write_keyed(&target, EVENTS, &events.rows)?;

    let letters = copy_keyed(&source, DEAD_LETTERS, "dead_letters", |_, value| {
        DeadLetter::decode(value.get(8..)?).ok()?;
        Some(value.to_vec())
    });
    report.unreadable.extend(letters.unreadable);
    report.dead_letters = write_keyed(&target, DEAD_LETTERS, &letters.rows)?;
    let last_letter = letters.rows.last().map_or(0, |(key, _)| *key);

    let dedup = read_dedup(&source, &mut report);
    let mut entries = dedup;
    for (id, (sequence, received)) in salvaged_ids {
        entries.entry(id).or_insert_with(|| {
            report.dedup_rebuilt += 1;
            (sequence, received)
        });
    }
    report.dedup_entries = entries.len() as u64 - report.dedup_rebuilt;
    let highest_deduped = entries.values().map(|(s, _)| *s).max().unwrap_or(0);
    write_dedup(&target, &entries)?;

    let meta = read_meta(&source);
    let unreadable_end = report
        .unreadable
        .iter()
        .filter(|gap| gap.table == "events")
        .filter_map(|gap| gap.last)
        .max()
        .unwrap_or(0);
    report.next_sequence = [
        meta.get(META_NEXT_SEQUENCE).copied().unwrap_or(1),
        last_sequence + 1,
        highest_deduped + 1,
        unreadable_end + 1,
    ]
    .into_iter()
    .max()
    .unwrap_or(1);
    write_meta(&target, &meta, report.next_sequence, last_letter)?;
    drop(target);
    store::write_marker(&to.join(MARKER_FILE))
        .map_err(|e| refused(format!("cannot write the marker: {e}")))?;
    Ok(report)
}

/// The working copy, opened without writing if it was closed cleanly, else as a writer:
/// redb repairs what a crash left, which needs every page it verifies to be sound, so a
/// damaged file a crash left cannot be salvaged (redb refuses to read it unrepaired).
enum Source {
    ReadOnly(ReadOnlyDatabase),
    Repaired(Database),
}

impl Source {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Source::ReadOnly(db) => db.begin_read(),
            Source::Repaired(db) => db.begin_read(),
        }
    }
}

/// redb panics on some damage, which [`contain`] turns into an error.
fn open_source(copy: &Path) -> Result<Source, SalvageError> {
    let read_only =
        contain(|| ReadOnlyDatabase::open(copy).map_err(|e| Fault::from(redb::Error::from(e))));
    let fault = match read_only {
        Ok(db) => return Ok(Source::ReadOnly(db)),
        Err(fault) => fault,
    };
    let writable = contain(|| {
        Database::builder()
            .open(copy)
            .map_err(|e| Fault::from(redb::Error::from(e)))
    });
    writable.map(Source::Repaired).map_err(|repair| {
        refused(format!(
            "the damaged file cannot be opened at all (read-only: {}; with repair: {}); \
             restore it from a backup",
            fault.detail(),
            repair.detail()
        ))
    })
}

/// Rows of a u64-keyed table that could be read, and the keys that could not.
struct Copied {
    rows: Vec<(u64, Vec<u8>)>,
    unreadable: Vec<Unreadable>,
}

/// Reads every readable row of `table`; `keep` validates a row (and may note it), `None`
/// marks it unreadable.
fn copy_keyed(
    db: &Source,
    table: TableDefinition<u64, &[u8]>,
    name: &'static str,
    mut keep: impl FnMut(u64, &[u8]) -> Option<Vec<u8>>,
) -> Copied {
    let mut copied = Copied {
        rows: Vec::new(),
        unreadable: Vec::new(),
    };
    let mut position = 0u64;
    loop {
        let (chunk, failure) = read_chunk(db, table, position);
        let read_any = !chunk.is_empty();
        for (key, value) in chunk {
            position = key.saturating_add(1);
            match keep(key, &value) {
                Some(value) => copied.rows.push((key, value)),
                None => copied.unreadable.push(Unreadable {
                    table: name,
                    first: key,
                    last: Some(key),
                    detail: "undecodable value".into(),
                }),
            }
        }
        match failure {
            None if read_any => continue,
            None => return copied,
            Some(detail) => {
                let resume = next_readable(db, table, position);
                copied.unreadable.push(Unreadable {
                    table: name,
                    first: position,
                    last: resume.map(|r| r - 1),
                    detail,
                });
                match resume {
                    Some(resume) => position = resume,
                    None => return copied,
                }
            }
        }
    }
}

/// Up to [`CHUNK`] rows from `from` on, in a read transaction of their own, and why the
/// read stopped early, if it did.
fn read_chunk(
    db: &Source,
    table: TableDefinition<u64, &[u8]>,
    from: u64,
) -> (Vec<(u64, Vec<u8>)>, Option<String>) {
    let mut rows = Vec::new();
    let result = contain(|| {
        let txn = db.begin_read().map_err(redb::Error::from)?;
        let table = txn.open_table(table).map_err(redb::Error::from)?;
        for entry in table.range(from..).map_err(redb::Error::from)?.take(CHUNK) {
            let (key, value) = entry.map_err(redb::Error::from)?;
            rows.push((key.value(), value.value().to_vec()));
        }
        Ok(())
    });
    (rows, result.err().map(|fault| fault.detail().to_owned()))
}

/// The smallest key after `failed` from which `table` reads again, or `None` if nothing
/// after it can be read: doubling steps find a readable start, bisection the first one.
fn next_readable(db: &Source, table: TableDefinition<u64, &[u8]>, failed: u64) -> Option<u64> {
    let readable = |from: u64| {
        contain(|| {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(table).map_err(redb::Error::from)?;
            let first = table.range(from..).map_err(redb::Error::from)?.next();
            first
                .transpose()
                .map_err(|e| Fault::from(redb::Error::from(e)))?;
            Ok(())
        })
        .is_ok()
    };
    let mut bad = failed;
    let mut step = 1u64;
    let good = loop {
        let probe = failed.checked_add(step)?;
        if readable(probe) {
            break probe;
        }
        bad = probe;
        step = step.checked_mul(2)?;
    };
    let (mut bad, mut good) = (bad, good);
    while good - bad > 1 {
        let mid = bad + (good - bad) / 2;
        if readable(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

fn write_keyed(
    db: &Database,
    table: TableDefinition<u64, &[u8]>,
    rows: &[(u64, Vec<u8>)],
) -> Result<u64, SalvageError> {
    for chunk in rows.chunks(CHUNK) {
        write(db, |txn| {
            let mut table = txn.open_table(table)?;
            for (key, value) in chunk {
                table.insert(*key, value.as_slice())?;
            }
            Ok(())
        })?;
    }
    Ok(rows.len() as u64)
}

fn write(
    db: &Database,
    f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
) -> Result<(), SalvageError> {
    let run = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        f(&txn)?;
        txn.commit()?;
        Ok(())
    };
    run().map_err(|e| refused(format!("cannot write the new log: {e}")))
}

/// Every dedup entry that reads (event_id → (sequence, first seen µs)), in key order until
/// the first failure; string keys leave no way to search past it.
fn read_dedup(db: &Source, report: &mut SalvageReport) -> BTreeMap<String, (u64, Micros)> {
    let mut entries = BTreeMap::new();
    let result = contain(|| {
        let txn = db.begin_read().map_err(redb::Error::from)?;
        let dedup = txn.open_table(DEDUP).map_err(redb::Error::from)?;
        for entry in dedup.iter().map_err(redb::Error::from)? {
            let (key, value) = entry.map_err(redb::Error::from)?;
            entries.insert(key.value().to_owned(), value.value());
        }
        Ok(())
    });
    if let Err(fault) = result {
        report.unreadable.push(Unreadable {
            table: "dedup",
            first: entries.len() as u64,
            last: None,
            detail: format!(
                "entries after the first {} in id order: {}",
                entries.len(),
                fault.detail()
            ),
        });
    }
    entries
}

fn write_dedup(
    db: &Database,
    entries: &BTreeMap<String, (u64, Micros)>,
) -> Result<(), SalvageError> {
    let entries: Vec<_> = entries.iter().collect();
    for chunk in entries.chunks(CHUNK) {
        write(db, |txn| {
            let mut dedup = txn.open_table(DEDUP)?;
            let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
            for (id, (sequence, first_seen)) in chunk {
                dedup.insert(id.as_str(), (*sequence, *first_seen))?;
                expiry.insert((*first_seen, id.as_str()), ())?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn read_meta(db: &Source) -> BTreeMap<&'static str, u64> {
    let mut meta = BTreeMap::new();
    for key in [
        META_NEXT_SEQUENCE,
        META_NEXT_DEAD_LETTER,
        META_TRIMMED_THROUGH,
        META_ID_RULE,
        META_LEGACY_IDS_BEFORE,
    ] {
        let value = contain(|| {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(META).map_err(redb::Error::from)?;
            Ok(table
                .get(key)
                .map_err(redb::Error::from)?
                .map(|v| v.value()))
        });
        if let Ok(Some(value)) = value {
            meta.insert(key, value);
        }
    }
    meta
}

fn write_meta(
    db: &Database,
    meta: &BTreeMap<&'static str, u64>,
    next_sequence: u64,
    last_letter: u64,
) -> Result<(), SalvageError> {
    write(db, |txn| {
        let mut table = txn.open_table(META)?;
        table.insert(META_NEXT_SEQUENCE, next_sequence)?;
        let next_letter = meta
            .get(META_NEXT_DEAD_LETTER)
            .copied()
            .unwrap_or(1)
            .max(last_letter + 1);
        table.insert(META_NEXT_DEAD_LETTER, next_letter)?;
        // Kept as they were, so the salvaged log knows which identity rule its dedup ids
        // follow (see the upgrade notes in the module docs).
        for key in [META_TRIMMED_THROUGH, META_ID_RULE, META_LEGACY_IDS_BEFORE] {
            if let Some(value) = meta.get(key) {
                table.insert(key, *value)?;
            }
        }
        Ok(())
    })
}
