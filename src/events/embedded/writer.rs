//! The embedded log's single writer: group commit, housekeeping and erasure.
//!
//! It runs on its own thread, fed by a bounded queue. Each turn it takes every command
//! queued while the previous commit was syncing and commits them in one transaction.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prost::Message;
use redb::{Database, ReadableTable, WriteTransaction};
use tokio::sync::mpsc;

use super::{
    Command, DEAD_LETTERS, DEDUP, DEDUP_EXPIRY, EVENTS, Fault, HOUSEKEEPING_CHUNK, Health,
    MAX_GROUP, META, META_NEXT_DEAD_LETTER, META_NEXT_SEQUENCE, META_TRIMMED_THROUGH, Slot,
    decode_event, received_of, storage, stored_event, stored_value,
};
use crate::{
    events::{
        AppendOutcome, CommittedEvent, Erased, LogError,
        fanout::Fanout,
        time::{Micros, from_micros, now_micros, to_micros},
    },
    proto::DeadLetter,
    wire::payload::user_named_in,
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
    /// Sequence of the next appended event; only advanced after a successful commit.
    pub(super) next: u64,
    /// Largest received_at written, so received_at never decreases along the log.
    pub(super) last_received: Micros,
    pub(super) dedup_window: Micros,
    pub(super) retention: Micros,
    /// Set when a command failed in redb: the writer reopens the file before going on.
    pub(super) fault: Option<Fault>,
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

    /// Handles a group, turning a panic inside redb into a fault: the commands it did not
    /// answer are dropped, so their callers see `Closed` (503), never a false success.
    fn handle_group_contained(&mut self, group: &mut Vec<Command>) {
        let handled = super::store::contain(|| {
            self.handle_group(group);
            Ok(())
        });
        if let Err(fault) = handled {
            group.clear();
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
        let result = self.write_group(&mut writes, now);
        match result {
            Ok((outcomes, appended, next, last_received)) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                self.next = next;
                self.last_received = last_received;
                let mut outcomes = outcomes.into_iter();
                for command in writes {
                    match command {
                        Command::Append { reply, .. } => {
                            let _ = reply.send(Ok(outcomes.next().unwrap_or_default()));
                        }
                        Command::DeadLetter { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                        Command::Housekeeping { .. }
                        | Command::Erase { .. }
                        | Command::Shutdown => {}
                    }
                }
                // Only now, committed and readable, do subscribers see them.
                self.fanout.publish(appended);
            }
            Err(e) => {
                tracing::error!(error = %e, "event log commit failed; webhooks get 503 until it recovers");
                self.note_fault(&e);
                let message = e.to_string();
                for command in writes {
                    match command {
                        Command::Append { reply, .. } => {
                            let _ = reply.send(Err(LogError::Storage(message.clone())));
                        }
                        Command::DeadLetter { reply, .. } => {
                            let _ = reply.send(Err(LogError::Storage(message.clone())));
                        }
                        Command::Housekeeping { .. }
                        | Command::Erase { .. }
                        | Command::Shutdown => {}
                    }
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn write_group(
        &self,
        writes: &mut [Command],
        now: Micros,
    ) -> Result<
        (
            Vec<Vec<AppendOutcome>>,
            Vec<Arc<CommittedEvent>>,
            u64,
            Micros,
        ),
        redb::Error,
    > {
        let txn = self.db.begin_write()?;
        let mut next = self.next;
        let mut last_received = self.last_received;
        let mut outcomes = Vec::new();
        let mut appended = Vec::new();
        // Every table a commit touches costs copied pages and an fsync'd write, so a group
        // touches only what it needs: `meta` and `dead_letters` only for dead letters. The
        // next sequence is not stored per commit: it follows from the last event (see
        // `next_sequence`).
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut dedup = txn.open_table(DEDUP)?;
            let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
            for command in writes.iter_mut() {
                let Command::Append { events: batch, .. } = command else {
                    continue;
                };
                let mut request_outcomes = Vec::with_capacity(batch.len());
                for mut event in std::mem::take(batch) {
                    let seen = dedup.get(event.event_id.as_str())?.map(|v| v.value());
                    if let Some((sequence, first_seen)) = seen {
                        if first_seen + self.dedup_window > now {
                            request_outcomes.push(AppendOutcome::Duplicate { sequence });
                            continue;
                        }
                        // Expired but not yet swept: forget the old entry first.
                        expiry.remove((first_seen, event.event_id.as_str()))?;
                    }
                    let received = event
                        .received_at
                        .as_ref()
                        .map_or(now, to_micros)
                        .max(last_received);
                    last_received = received;
                    event.received_at = Some(from_micros(received));
                    event.sequence = next;
                    next += 1;
                    dedup.insert(event.event_id.as_str(), (event.sequence, now))?;
                    expiry.insert((now, event.event_id.as_str()), ())?;
                    let event = CommittedEvent::new(event);
                    events.insert(event.sequence(), stored_event(received, &event).as_slice())?;
                    request_outcomes.push(AppendOutcome::Appended {
                        sequence: event.sequence(),
                    });
                    appended.push(Arc::new(event));
                }
                outcomes.push(request_outcomes);
            }
        }
        let letters = writes.iter().filter_map(|command| match command {
            Command::DeadLetter { letter, .. } => Some(letter),
            _ => None,
        });
        let mut letters = letters.peekable();
        if letters.peek().is_some() {
            let mut dead_letters = txn.open_table(DEAD_LETTERS)?;
            let mut meta = txn.open_table(META)?;
            let mut next_dead_letter = meta.get(META_NEXT_DEAD_LETTER)?.map_or(1, |v| v.value());
            for letter in letters {
                let received = letter.received_at.as_ref().map_or(now, to_micros);
                dead_letters.insert(next_dead_letter, stored_value(received, letter).as_slice())?;
                next_dead_letter += 1;
            }
            meta.insert(META_NEXT_DEAD_LETTER, next_dead_letter)?;
        }
        txn.commit()?;
        Ok((outcomes, appended, next, last_received))
    }

    /// Removes one user's events, their dedup entries and attributable dead letters, in one
    /// transaction. Scans the whole log: erasure is rare, and events are keyed by sequence.
    fn erase(&self, user: &str) -> Result<Erased, redb::Error> {
        let txn = self.db.begin_write()?;
        let mut erased = Erased::default();
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut dedup = txn.open_table(DEDUP)?;
            let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
            let mut dead_letters = txn.open_table(DEAD_LETTERS)?;
            let mut doomed = Vec::new();
            for entry in events.iter()? {
                let (key, value) = entry?;
                let event = decode_event(key.value(), value.value())?;
                if event.event().application_user_id == user {
                    doomed.push((key.value(), event.event().event_id.clone()));
                }
            }
            for (sequence, event_id) in &doomed {
                events.remove(*sequence)?;
                let first_seen = dedup.remove(event_id.as_str())?.map(|v| v.value().1);
                if let Some(first_seen) = first_seen {
                    expiry.remove((first_seen, event_id.as_str()))?;
                    erased.dedup_entries += 1;
                }
            }
            erased.events = doomed.len() as u64;
            if !doomed.is_empty() {
                // The newest event may be gone: keep the next sequence from going back.
                txn.open_table(META)?
                    .insert(META_NEXT_SEQUENCE, self.next)?;
            }
            let mut letters = Vec::new();
            for entry in dead_letters.iter()? {
                let (key, value) = entry?;
                let letter = DeadLetter::decode(value.value().get(8..).unwrap_or_default())
                    .map_err(|e| redb::Error::Corrupted(format!("undecodable dead letter: {e}")))?;
                if user_named_in(&letter.raw_json).as_deref() == Some(user) {
                    letters.push(key.value());
                }
            }
            for key in &letters {
                dead_letters.remove(*key)?;
            }
            erased.dead_letters = letters.len() as u64;
        }
        txn.commit()?;
        Ok(erased)
    }

    /// Applies retention to events and dead letters and expires the dedup index, in chunks.
    fn housekeeping(&self) -> Result<(), redb::Error> {
        let now = now_micros();
        let retention_cutoff = now.saturating_sub(self.retention);
        let dedup_cutoff = now.saturating_sub(self.dedup_window);
        loop {
            let txn = self.db.begin_write()?;
            let removed = trim_events(&txn, retention_cutoff, self.next)?
                + trim_dead_letters(&txn, retention_cutoff)?
                + expire_dedup(&txn, dedup_cutoff)?;
            txn.commit()?;
            if removed < HOUSEKEEPING_CHUNK {
                return Ok(());
            }
        }
    }
}

/// Removes events older than `cutoff`. `next` is recorded in `meta` so the next sequence
/// survives a log that retention emptied.
fn trim_events(txn: &WriteTransaction, cutoff: Micros, next: u64) -> Result<usize, redb::Error> {
    let mut events = txn.open_table(EVENTS)?;
    let mut meta = txn.open_table(META)?;
    let mut removed = 0;
    let mut trimmed_through = None;
    while removed < HOUSEKEEPING_CHUNK {
        let Some(received) = events.first()?.map(|(_, v)| received_of(v.value())) else {
            break;
        };
        if received >= cutoff {
            break;
        }
        events.pop_first()?;
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
