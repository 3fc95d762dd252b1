//! The embedded log's single writer: group commit, housekeeping and erasure.
//!
//! It runs on its own thread, fed by a bounded queue. Each turn it takes every command
//! queued while the previous commit was syncing and commits them in one transaction.

use std::{
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use redb::{Database, ReadableTable, Table, WriteTransaction};
use tokio::sync::mpsc;

use super::{
    CONSUMER_GROUPS, Command, DEAD_LETTERS, DEDUP, DEDUP_EXPIRY, EVENTS, Fault, HOUSEKEEPING_CHUNK,
    Health, MAX_GROUP, META, META_NEXT_DEAD_LETTER, META_NEXT_SEQUENCE, META_TRIMMED_THROUGH, Slot,
    decode_event, decode_letter, received_of, storage, stored_event, stored_value,
};
use crate::{
    events::{
        Admission, Admitted, AppendOutcome, CommitObserver, CommittedEvent, Erased, LogError,
        admission::{self, Gate, Mark},
        committed::stored_event_id,
        dead_letter_key,
        fanout::Fanout,
        names_user,
        time::{Micros, now_micros, to_micros},
    },
    proto::DeadLetter,
};

pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    /// The file, for reopening it after a fault.
    pub(super) path: PathBuf,
    /// Where readers find `db`; emptied while the writer reopens the file.
    pub(super) slot: Arc<Slot>,
    pub(super) fanout: Fanout,
    pub(super) health: Arc<Health>,
    pub(super) commits: Arc<AtomicU64>,
    pub(super) commit_observer: Arc<OnceLock<Arc<dyn CommitObserver>>>,
    /// The shared admission rule: the tip (next sequence, last `received_at`) and the
    /// in-memory dedup index. What a group places is rolled back if its commit fails.
    pub(super) gate: Gate,
    /// Where the gate stood before the group being written, until it commits: a panic
    /// inside redb mid-group rolls the gate back to it.
    pub(super) pending: Option<Mark>,
    pub(super) dedup_window: Micros,
    pub(super) retention: Micros,
    /// Set when a command failed in redb: the writer reopens the file before going on.
    pub(super) fault: Option<Fault>,
}

/// The tables one group's appends write: `events`, and on first use (some command of the
/// group stores, rewrites or removes a dead letter) the letter tables. Event ids are
/// deduplicated in memory, so an append-only commit touches one table.
struct AppendTables<'t> {
    txn: &'t WriteTransaction,
    events: Table<'t, u64, &'static [u8]>,
    letters: Option<LetterTables<'t>>,
}

impl<'t> AppendTables<'t> {
    fn letters(&mut self) -> Result<&mut LetterTables<'t>, redb::Error> {
        let letters = match self.letters.take() {
            Some(letters) => letters,
            None => open_letter_tables(self.txn)?,
        };
        Ok(self.letters.insert(letters))
    }
}

/// Dead letters, and their dedup keys on disk: a letter can be resolved (redriven) while
/// its key must still answer retries, so letter keys cannot be rebuilt from the letters.
struct LetterTables<'t> {
    dead_letters: Table<'t, u64, &'static [u8]>,
    dedup: Table<'t, &'static str, (u64, i64)>,
    expiry: Table<'t, (i64, &'static str), ()>,
    meta: Table<'t, &'static str, u64>,
    next_id: u64,
}

/// What a committed group hands back: per command the outcomes, and the events to publish.
struct GroupWritten {
    admitted: Vec<Admitted>,
    appended: Vec<Arc<CommittedEvent>>,
}

impl Writer {
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = queue.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            let shutdown = group.iter().position(|c| matches!(c, Command::Shutdown));
            if let Some(at) = shutdown {
                // Commands queued after Shutdown are dropped unanswered: their callers see
                // `Closed` (503 to Spike, which retries) and nothing was acknowledged.
                group.truncate(at);
            }
            self.handle_group_contained(&mut group);
            if shutdown.is_some() {
                self.save_checkpoint();
                return;
            }
            if let Some(fault) = self.fault.take() {
                match self.recover(fault, &mut queue) {
                    Some(recovered) => self = recovered,
                    None => return,
                }
            }
        }
    }

    /// At a clean shutdown, every command answered and every commit durable: saves the
    /// dedup index so the next start need not rebuild it. Not after a fault: whether the
    /// last commit reached the file is then unknown, and the next start rebuilds.
    fn save_checkpoint(&mut self) {
        if self.fault.is_some() {
            return;
        }
        // Expired entries would only be dropped again at load; leaving them out is cheaper.
        self.gate.expire(now_micros());
        super::checkpoint::save(&self.db, &self.path, &self.gate, self.dedup_window);
    }

    /// Handles a group, turning a panic inside redb into a fault: the commands it did not
    /// answer are dropped, so their callers see `Closed` (503), never a false success.
    fn handle_group_contained(&mut self, group: &mut Vec<Command>) {
        let handled = super::store::contain(|| {
            self.handle_group(group);
            Ok(())
        });
        if let Err(fault) = handled {
            group.clear();
            if let Some(mark) = self.pending.take() {
                self.gate.rollback(mark);
            }
            self.fault = Some(fault);
        }
    }

    fn handle_group(&mut self, group: &mut Vec<Command>) {
        let mut housekeeping = Vec::new();
        let mut erasures = Vec::new();
        let mut writes = Vec::with_capacity(group.len());
        for command in group.drain(..) {
            match command {
                Command::Housekeeping { reply } => housekeeping.push(reply),
                Command::Erase { user, reply } => erasures.push((user, reply)),
                Command::SaveGroups { writes, reply } => {
                    let result = self.save_groups(writes).inspect_err(|e| self.note_fault(e));
                    let _ = reply.send(result.map_err(storage));
                }
                Command::Shutdown => {}
                write => writes.push(write),
            }
        }
        if !writes.is_empty() {
            self.commit_writes(writes);
        }
        for (user, reply) in erasures {
            let result = self.erase(&user).inspect_err(|e| self.note_fault(e));
            let _ = reply.send(result.map_err(storage));
        }
        if !housekeeping.is_empty() {
            let result = self.housekeeping();
            if let Err(e) = &result {
                tracing::error!(error = %e, "event log housekeeping failed");
                self.note_fault(e);
            }
            for reply in housekeeping {
                let _ = reply.send(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| LogError::Storage(e.to_string())),
                );
            }
        }
    }

    /// Remembers that redb failed, so the writer reopens the file before the next command.
    fn note_fault(&mut self, error: &redb::Error) {
        if self.fault.is_none() {
            self.fault = Some(Fault::of(error));
        }
    }

    /// One transaction, one fsync, for every append and dead letter in the group.
    fn commit_writes(&mut self, mut writes: Vec<Command>) {
        let now = now_micros();
        self.gate.expire(now);
        self.pending = Some(self.gate.mark());
        let started = Instant::now();
        let result = self.write_group(&mut writes, now);
        let mark = self.pending.take().expect("set above");
        match result {
            Ok(written) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                if let Some(observer) = self.commit_observer.get() {
                    observer.committed(written.appended.len(), started.elapsed());
                }
                let mut admitted = written.admitted.into_iter();
                for command in writes {
                    if let Command::Append { reply, .. } = command {
                        let _ = reply.send(Ok(admitted.next().unwrap_or_default()));
                    }
                }
                // Only now, committed and readable, do subscribers see them.
                self.fanout.publish(written.appended);
            }
            Err(e) => {
                self.gate.rollback(mark);
                tracing::error!(error = %e, "event log commit failed; webhooks get 503 until it recovers");
                self.note_fault(&e);
                let message = e.to_string();
                for command in writes {
                    if let Command::Append { reply, .. } = command {
                        let _ = reply.send(Err(LogError::Storage(message.clone())));
                    }
                }
            }
        }
    }

    fn write_group(
        &mut self,
        writes: &mut [Command],
        now: Micros,
    ) -> Result<GroupWritten, redb::Error> {
        let db = self.db.clone();
        let txn = db.begin_write()?;
        let mut admitted = Vec::with_capacity(writes.len());
        let mut appended = Vec::new();
        // The next sequence is not stored per commit: it follows from the last event (see
        // `next_sequence`).
        {
            let mut tables = AppendTables {
                txn: &txn,
                events: txn.open_table(EVENTS)?,
                letters: None,
            };
            for command in writes.iter_mut() {
                let Command::Append { admission, .. } = command else {
                    continue;
                };
                let admission = std::mem::take(admission);
                admitted.push(self.admit(&mut tables, admission, now, &mut appended)?);
            }
            if let Some(letters) = &mut tables.letters {
                letters
                    .meta
                    .insert(META_NEXT_DEAD_LETTER, letters.next_id)?;
            }
        }
        txn.commit()?;
        Ok(GroupWritten { admitted, appended })
    }

    /// One request's events and letters, inside the group's transaction.
    fn admit(
        &mut self,
        tables: &mut AppendTables<'_>,
        admission: Admission,
        now: Micros,
        appended: &mut Vec<Arc<CommittedEvent>>,
    ) -> Result<Admitted, redb::Error> {
        let mut admitted = Admitted::default();
        for new in admission.events {
            let outcome = match self.gate.admit_event(new, now) {
                Err(duplicate) => duplicate,
                Ok((event, received)) => {
                    let event = CommittedEvent::new(event);
                    let value = stored_event(received, &event);
                    tables.events.insert(event.sequence(), value.as_slice())?;
                    let sequence = event.sequence();
                    appended.push(Arc::new(event));
                    AppendOutcome::Appended { sequence }
                }
            };
            admitted.events.push(outcome);
        }
        for letter in admission.dead_letters {
            admitted
                .dead_letters
                .push(self.store_new_letter(tables, letter, now)?);
        }
        if admission.updated.is_empty() && admission.resolved.is_empty() {
            return Ok(admitted);
        }
        let letters = tables.letters()?;
        for letter in admission.updated {
            let stored = letters
                .dead_letters
                .get(letter.id)?
                .map(|v| received_of(v.value()));
            if let Some(received) = stored {
                let value = stored_value(received, &letter);
                letters.dead_letters.insert(letter.id, value.as_slice())?;
            }
        }
        for id in admission.resolved {
            letters.dead_letters.remove(id)?;
        }
        Ok(admitted)
    }

    /// Stores a new letter unless its key was seen within the dedup window.
    fn store_new_letter(
        &mut self,
        tables: &mut AppendTables<'_>,
        letter: DeadLetter,
        now: Micros,
    ) -> Result<AppendOutcome, redb::Error> {
        let key = dead_letter_key(&letter);
        if let Some(hit) = self.gate.seen(&key, now) {
            return Ok(AppendOutcome::Duplicate { sequence: hit.id });
        }
        let letters = tables.letters()?;
        let id = store_letter(letters, letter, now)?;
        remember(&mut letters.dedup, &mut letters.expiry, &key, id, now)?;
        self.gate.remember(&key, id, now);
        Ok(AppendOutcome::Appended { sequence: id })
    }

    /// Removes one user's events, their dedup entries and attributable dead letters, in one
    /// transaction. Scans the whole log: erasure is rare, and events are keyed by sequence.
    /// Consumer groups' snapshots, in their own small transaction: a group's state never
    /// rides along with (or delays) a webhook's commit.
    fn save_groups(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(CONSUMER_GROUPS)?;
            for (name, snapshot) in &writes {
                match snapshot {
                    Some(bytes) => table.insert(name.as_str(), bytes.as_slice())?,
                    None => table.remove(name.as_str())?,
                };
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn erase(&mut self, user: &str) -> Result<Erased, redb::Error> {
        let txn = self.db.begin_write()?;
        let mut erased = Erased::default();
        // Keys to forget in memory once the commit succeeded, with whether a row on disk
        // held them: an entry counts once wherever it was kept.
        let mut keys = Vec::new();
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut dedup = txn.open_table(DEDUP)?;
            let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
            let mut dead_letters = txn.open_table(DEAD_LETTERS)?;
            let mut doomed = Vec::new();
            for entry in events.iter()? {
                let (key, value) = entry?;
                let event = decode_event(key.value(), value.value())?;
                if admission::event_of(event.event(), user) {
                    doomed.push((key.value(), event.event().event_id.clone()));
                }
            }
            for (sequence, event_id) in doomed {
                events.remove(sequence)?;
                let on_disk = forget_row(&mut dedup, &mut expiry, &event_id)?;
                keys.push((event_id, on_disk));
                erased.events += 1;
            }
            if erased.events > 0 {
                // The newest event may be gone: keep the next sequence from going back.
                txn.open_table(META)?
                    .insert(META_NEXT_SEQUENCE, self.gate.next)?;
            }
            let mut letters = Vec::new();
            for entry in dead_letters.iter()? {
                let (key, value) = entry?;
                let letter = decode_letter(key.value(), value.value())?;
                if names_user(&letter, user) {
                    letters.push((key.value(), dead_letter_key(&letter)));
                }
            }
            for (id, dedup_key) in letters {
                dead_letters.remove(id)?;
                let on_disk = forget_row(&mut dedup, &mut expiry, &dedup_key)?;
                keys.push((dedup_key, on_disk));
                erased.dead_letters += 1;
            }
        }
        txn.commit()?;
        for (key, on_disk) in keys {
            if self.gate.forget(&key) | on_disk {
                erased.dedup_entries += 1;
            }
        }
        Ok(erased)
    }

    /// Applies retention to events and dead letters and expires the dedup index, in chunks.
    fn housekeeping(&mut self) -> Result<(), redb::Error> {
        let now = now_micros();
        self.gate.expire(now);
        let retention_cutoff = now.saturating_sub(self.retention);
        let dedup_cutoff = now.saturating_sub(self.dedup_window);
        loop {
            let txn = self.db.begin_write()?;
            let removed = trim_events(&txn, retention_cutoff, self.gate.next, dedup_cutoff)?
                + trim_dead_letters(&txn, retention_cutoff)?
                + expire_dedup(&txn, dedup_cutoff)?;
            txn.commit()?;
            if removed < HOUSEKEEPING_CHUNK {
                return Ok(());
            }
        }
    }
}

fn open_letter_tables(txn: &WriteTransaction) -> Result<LetterTables<'_>, redb::Error> {
    let meta = txn.open_table(META)?;
    let next_id = meta.get(META_NEXT_DEAD_LETTER)?.map_or(1, |v| v.value());
    Ok(LetterTables {
        dead_letters: txn.open_table(DEAD_LETTERS)?,
        dedup: txn.open_table(DEDUP)?,
        expiry: txn.open_table(DEDUP_EXPIRY)?,
        meta,
        next_id,
    })
}

/// Removes `key`'s row from the on-disk dedup table, if it has one.
fn forget_row(
    dedup: &mut Table<'_, &'static str, (u64, i64)>,
    expiry: &mut Table<'_, (i64, &'static str), ()>,
    key: &str,
) -> Result<bool, redb::Error> {
    let first_seen = dedup.remove(key)?.map(|v| v.value().1);
    if let Some(first_seen) = first_seen {
        expiry.remove((first_seen, key))?;
    }
    Ok(first_seen.is_some())
}

/// Records `key` on disk, replacing an expired row not yet swept (and its expiry row, so
/// the sweep does not remove the new one).
fn remember(
    dedup: &mut Table<'_, &'static str, (u64, i64)>,
    expiry: &mut Table<'_, (i64, &'static str), ()>,
    key: &str,
    id: u64,
    now: Micros,
) -> Result<(), redb::Error> {
    forget_row(dedup, expiry, key)?;
    dedup.insert(key, (id, now))?;
    expiry.insert((now, key), ())?;
    Ok(())
}

/// Stores a new letter under the next id; returns the id.
fn store_letter(
    letters: &mut LetterTables<'_>,
    mut letter: DeadLetter,
    now: Micros,
) -> Result<u64, redb::Error> {
    let id = letters.next_id;
    letters.next_id += 1;
    letter.id = id;
    let received = letter.received_at.as_ref().map_or(now, to_micros);
    letters
        .dead_letters
        .insert(id, stored_value(received, &letter).as_slice())?;
    Ok(id)
}

/// Removes events older than `cutoff`. `next` is recorded in `meta` so the next sequence
/// survives a log that retention emptied. A removed event first seen after `dedup_cutoff`
/// (retention shorter than the dedup window) leaves its id in the on-disk dedup table, so
/// the index rebuilt at the next start still knows it.
fn trim_events(
    txn: &WriteTransaction,
    cutoff: Micros,
    next: u64,
    dedup_cutoff: Micros,
) -> Result<usize, redb::Error> {
    let mut events = txn.open_table(EVENTS)?;
    let mut meta = txn.open_table(META)?;
    let mut dedup = txn.open_table(DEDUP)?;
    let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
    let mut removed = 0;
    let mut trimmed_through = None;
    while removed < HOUSEKEEPING_CHUNK {
        let Some(received) = events.first()?.map(|(_, v)| received_of(v.value())) else {
            break;
        };
        if received >= cutoff {
            break;
        }
        let popped = events.pop_first()?;
        if received > dedup_cutoff
            && let Some((sequence, value)) = &popped
            && let Some(id) = stored_event_id(value.value().get(8..).unwrap_or_default())
        {
            remember(&mut dedup, &mut expiry, id, sequence.value(), received)?;
        }
        trimmed_through = Some(received);
        removed += 1;
    }
    if let Some(received) = trimmed_through {
        meta.insert(META_TRIMMED_THROUGH, received.max(0) as u64)?;
        meta.insert(META_NEXT_SEQUENCE, next)?;
    }
    Ok(removed)
}

fn trim_dead_letters(txn: &WriteTransaction, cutoff: Micros) -> Result<usize, redb::Error> {
    let mut letters = txn.open_table(DEAD_LETTERS)?;
    let mut removed = 0;
    while removed < HOUSEKEEPING_CHUNK
        && letters
            .first()?
            .is_some_and(|(_, v)| received_of(v.value()) < cutoff)
    {
        letters.pop_first()?;
        removed += 1;
    }
    Ok(removed)
}

fn expire_dedup(txn: &WriteTransaction, cutoff: Micros) -> Result<usize, redb::Error> {
    let mut dedup = txn.open_table(DEDUP)?;
    let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
    let mut expired = Vec::new();
    for entry in expiry
        .range::<(i64, &str)>(..(cutoff, ""))?
        .take(HOUSEKEEPING_CHUNK)
    {
        let (key, _) = entry?;
        let (first_seen, id) = key.value();
        expired.push((first_seen, id.to_owned()));
    }
    for (first_seen, id) in &expired {
        expiry.remove((*first_seen, id.as_str()))?;
        dedup.remove(id.as_str())?;
    }
    Ok(expired.len())
}
