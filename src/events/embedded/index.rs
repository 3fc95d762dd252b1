//! The in-memory dedup index at start-up: rebuilt from the stored events, plus the
//! on-disk `dedup` rows (dead-letter keys, ids of events retention removed inside the
//! window, and 0.1's entries), and the one-time upgrade that empties `dedup` of the rows
//! the events already give.
//!
//! Before this layout every append also wrote its id to `dedup` and `dedup_expiry`:
//! random keys, so each event copied and rewrote B-tree pages there (about half the pages
//! a commit wrote). Now an append writes `events` only.

use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};

use super::{DEDUP, DEDUP_EXPIRY, EVENTS, META, first_received_from, received_of};
use crate::events::{admission::Gate, committed::stored_event_id, time::Micros};

/// Set once `dedup` holds only rows the events do not give (this layout).
const META_DEDUP_LAYOUT: &str = "dedup_layout";
const DEDUP_LAYOUT: u64 = 2;
/// Rows removed per upgrade transaction, so a large store's upgrade stays bounded in memory.
const UPGRADE_CHUNK: usize = 50_000;

/// Removes the `dedup` rows that an event still stored gives (its id at its sequence):
/// the index is rebuilt from the events. Runs once per store; a no-op afterwards.
pub(super) fn upgrade(db: &Database) -> Result<(), redb::Error> {
    {
        let txn = db.begin_read()?;
        if let Ok(meta) = txn.open_table(META)
            && meta.get(META_DEDUP_LAYOUT)?.is_some()
        {
            return Ok(());
        }
    }
    let mut after = String::new();
    loop {
        let txn = db.begin_write()?;
        let Chunk { redundant, last } = redundant_rows(&txn, &after)?;
        {
            let mut dedup = txn.open_table(DEDUP)?;
            let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
            for (key, first_seen) in &redundant {
                dedup.remove(key.as_str())?;
                expiry.remove((*first_seen, key.as_str()))?;
            }
            if last.is_none() {
                txn.open_table(META)?
                    .insert(META_DEDUP_LAYOUT, DEDUP_LAYOUT)?;
            }
        }
        txn.commit()?;
        match last {
            Some(last) => after = last,
            None => return Ok(()),
        }
    }
}

/// One upgrade step's look at up to [`UPGRADE_CHUNK`] `dedup` rows.
struct Chunk {
    /// The rows an event gives, as (key, first seen): to remove.
    redundant: Vec<(String, Micros)>,
    /// The last key looked at, if the table goes on after it.
    last: Option<String>,
}

/// Up to [`UPGRADE_CHUNK`] rows after `after` in key order, those of them an event gives,
/// and the last key looked at if the table goes on.
fn redundant_rows(txn: &WriteTransaction, after: &str) -> Result<Chunk, redb::Error> {
    let dedup = txn.open_table(DEDUP)?;
    let events = txn.open_table(EVENTS)?;
    let mut redundant = Vec::new();
    let mut seen = 0;
    let mut last = None;
    let from: &str = after;
    for row in dedup.range::<&str>(from..)? {
        let (key, value) = row?;
        let key = key.value();
        if key == after {
            continue;
        }
        if seen == UPGRADE_CHUNK {
            return Ok(Chunk { redundant, last });
        }
        seen += 1;
        last = Some(key.to_owned());
        let (sequence, first_seen) = value.value();
        let given = events.get(sequence)?.is_some_and(|stored| {
            stored_event_id(stored.value().get(8..).unwrap_or_default()) == Some(key)
        });
        if given {
            redundant.push((key.to_owned(), first_seen));
        }
    }
    Ok(Chunk {
        redundant,
        last: None,
    })
}

/// Fills `gate` with every entry still inside the window at `now`: the `dedup` rows first
/// (they are older: ids of trimmed events, letters), then the events, in sequence order.
/// Returns how many entries it loaded.
///
/// The events are read on a thread of their own and handed over in batches, so reading
/// them from redb (most of the time) and indexing their ids run on two cores at once; the
/// ids still go into the index one by one in sequence order, as a single pass would put
/// them.
pub(super) fn rebuild(
    db: &Database,
    gate: &mut Gate,
    now: Micros,
    window: Micros,
) -> Result<u64, redb::Error> {
    rebuild_in_batches(db, gate, now, window, REBUILD_BATCH)
}

/// [`rebuild`] with `per_batch` events per batch (a test makes it small).
pub(super) fn rebuild_in_batches(
    db: &Database,
    gate: &mut Gate,
    now: Micros,
    window: Micros,
    per_batch: usize,
) -> Result<u64, redb::Error> {
    let cutoff = now.saturating_sub(window);
    let txn = db.begin_read()?;
    let dedup = txn.open_table(DEDUP)?;
    let expiry = txn.open_table(DEDUP_EXPIRY)?;
    let mut loaded = 0;
    for row in expiry.range::<(i64, &str)>((cutoff.saturating_add(1), "")..)? {
        let (key, _) = row?;
        let (first_seen, key) = key.value();
        let entry = dedup.get(key)?.map(|v| v.value());
        if let Some((id, stored_first_seen)) = entry
            && stored_first_seen == first_seen
        {
            gate.remember(key, id, first_seen);
            loaded += 1;
        }
    }
    let from = first_inside(&txn.open_table(EVENTS)?, cutoff)?;
    std::thread::scope(|scope| {
        // Two batches queued at most: the reader stays a little ahead, memory bounded.
        let (batches, queued) = std::sync::mpsc::sync_channel(2);
        std::thread::Builder::new()
            .name("dedup-rebuild".into())
            .spawn_scoped(scope, move || read_ids(db, from, per_batch, &batches))
            .map_err(redb::Error::Io)?;
        for batch in queued {
            let batch: IdBatch = batch?;
            let mut start = 0;
            for &(end, sequence, received) in &batch.entries {
                gate.remember(&batch.ids[start..end], sequence, received);
                start = end;
            }
            loaded += batch.entries.len() as u64;
        }
        Ok(loaded)
    })
}

/// Events read per batch handed to the indexing thread (about 1 MiB of ids).
const REBUILD_BATCH: usize = 16_384;

/// The ids of consecutive events: their bytes end to end, and per event where its id
/// ends in `ids`, its sequence and when it was received.
#[derive(Default)]
struct IdBatch {
    ids: String,
    entries: Vec<(usize, u64, Micros)>,
}

/// Reads the ids of the events from `from` on, in batches of `per_batch`, until the end
/// or until the indexing side is gone. A read error is sent as the last batch.
fn read_ids(
    db: &Database,
    from: u64,
    per_batch: usize,
    out: &std::sync::mpsc::SyncSender<Result<IdBatch, redb::Error>>,
) {
    let read = || -> Result<(), redb::Error> {
        let txn = db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let mut batch = IdBatch::default();
        for row in events.range(from..)? {
            let (sequence, value) = row?;
            let value = value.value();
            // An unreadable id is damage that readers report at its sequence; the event
            // cannot be matched by id anyway.
            if let Some(id) = stored_event_id(value.get(8..).unwrap_or_default()) {
                batch.ids.push_str(id);
                let entry = (batch.ids.len(), sequence.value(), received_of(value));
                batch.entries.push(entry);
            }
            if batch.entries.len() == per_batch && out.send(Ok(std::mem::take(&mut batch))).is_err()
            {
                return Ok(());
            }
        }
        if !batch.entries.is_empty() {
            let _ = out.send(Ok(batch));
        }
        Ok(())
    };
    if let Err(error) = read() {
        let _ = out.send(Err(error));
    }
}

/// The first sequence whose event was received after `cutoff`.
fn first_inside(
    events: &impl ReadableTable<u64, &'static [u8]>,
    cutoff: Micros,
) -> Result<u64, redb::Error> {
    let Some(first) = events.first()?.map(|(k, _)| k.value()) else {
        return Ok(0);
    };
    let end = events.last()?.map_or(first, |(k, _)| k.value() + 1);
    first_received_from(events, first..end, cutoff.saturating_add(1), |_| {})
}
