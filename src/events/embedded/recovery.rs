//! The writer's way back from a failed commit (disk full, I/O error, a panic inside redb).
//!
//! After one I/O error redb refuses every later commit ("Previous I/O error occurred")
//! until the database is closed and opened again. So the writer, on any fault:
//! 1. reports the fault (readiness off) and empties the [`Slot`](super::store::Slot) so
//!    readers stop taking the old handle;
//! 2. answers every queued command with an error at once (503: Spike retries) while it
//!    waits for readers to let go of the old handle, and while it retries;
//! 3. reopens the file with backoff ([`RETRY_FIRST`] doubling to [`RETRY_MAX`]): redb's
//!    own recovery brings it back to the last commit that succeeded, so nothing
//!    acknowledged is lost, and the next sequence is read from the file, so none is reused;
//! 4. proves it can write again by committing and removing [`PROBE_BYTES`], so readiness
//!    does not come back while the disk is still full;
//! 5. publishes events that a failed-looking commit had in fact made durable, and takes
//!    writes again.

use std::{
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::mpsc::{self, error::TryRecvError};

use super::{
    Command, EVENTS, Fault, LogError, decode_event, initialise,
    store::{self, contain},
    writer::Writer,
};
use crate::events::time::Micros;

/// First wait before reopening; doubles after each failed attempt.
pub(super) const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between attempts, so a freed disk is noticed within about this long.
pub(super) const RETRY_MAX: Duration = Duration::from_secs(2);
/// Written and removed again before readiness returns: room for a burst of webhooks.
const PROBE_BYTES: usize = 1024 * 1024;
/// How often queued commands are refused while the writer waits.
const REFUSE_EVERY: Duration = Duration::from_millis(20);
const PROBE: TableDefinition<u64, &[u8]> = TableDefinition::new("recovery_probe");

/// The writer stopped because shutdown was asked for while it recovered.
pub(super) struct ShutdownRequested;

impl Writer {
    /// Reopens the file until it takes writes again. `None`: shutdown came first.
    pub(super) fn recover(
        mut self,
        fault: Fault,
        queue: &mut mpsc::Receiver<Command>,
    ) -> Option<Self> {
        let started = Instant::now();
        if let Fault::Damaged(detail) = &fault {
            self.health.damaged(None, detail);
        }
        let error = format!(
            "the event log is recovering from a storage fault: {}",
            fault.detail()
        );
        self.health.write_failed(&error);
        tracing::error!(
            reason = "storage_write_failing",
            error = fault.detail(),
            "event log write failed; readiness off, reopening the log"
        );
        self.slot.set(None);
        release(self.db, queue, &error).ok()?;
        let mut delay = RETRY_FIRST;
        let mut attempts = 0u32;
        let (db, next, last_received) = loop {
            attempts += 1;
            match reopen_and_probe(&self.path) {
                Ok(opened) => break opened,
                Err(fault) => {
                    tracing::warn!(attempts, error = fault.detail(), retry_in = ?delay, "event log still failing");
                    wait_refusing(queue, delay, &error).ok()?;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        };
        self.db = Arc::new(db);
        if next < self.gate.next {
            tracing::error!(
                expected = self.gate.next,
                found = next,
                "the reopened log ends before the last acknowledged commit; sequences continue \
                 from the higher value so none is reused"
            );
        }
        self.publish_recovered(next);
        self.gate.next = self.gate.next.max(next);
        self.gate.last_received = self.gate.last_received.max(last_received);
        self.slot.set(Some(self.db.clone()));
        self.health.write_recovered();
        tracing::info!(
            attempts,
            took = ?started.elapsed(),
            next_sequence = self.gate.next,
            "event log takes writes again"
        );
        Some(self)
    }

    /// Sends subscribers the events of a commit that reported failure but reached the
    /// disk, and indexes their ids (the gate forgot them with the failure). Their webhooks
    /// got 503; Spike's retry will be a duplicate of them.
    fn publish_recovered(&mut self, next: u64) {
        if next <= self.gate.next {
            return;
        }
        let from = self.gate.next;
        let read = contain(|| {
            let txn = self.db.begin_read().map_err(redb::Error::from)?;
            let events = txn.open_table(EVENTS).map_err(redb::Error::from)?;
            let mut found = Vec::new();
            for entry in events.range(from..next).map_err(redb::Error::from)? {
                let (key, value) = entry.map_err(redb::Error::from)?;
                found.push(Arc::new(decode_event(key.value(), value.value())?));
            }
            Ok(found)
        });
        match read {
            Ok(found) => {
                tracing::warn!(
                    from,
                    next,
                    "a commit reported as failed was durable; its events are published now"
                );
                for event in &found {
                    let id = &event.event().event_id;
                    self.gate
                        .remember(id, event.sequence(), event.received_at());
                }
                self.fanout.publish(found);
            }
            // Subscribers still find them in the log when the next event shows the gap.
            Err(fault) => tracing::warn!(error = fault.detail(), "cannot read recovered events"),
        }
    }
}

/// Drops the writer's handle once no reader holds it any more (redb locks the file, so the
/// new handle cannot open before), refusing queued commands while waiting.
fn release(
    mut db: Arc<Database>,
    queue: &mut mpsc::Receiver<Command>,
    error: &str,
) -> Result<(), ShutdownRequested> {
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => {
                // Closing a database after an I/O error may fail again: the reopen repairs.
                if let Err(fault) = contain(|| Ok(db.close().map_err(redb::Error::from)?)) {
                    tracing::debug!(error = fault.detail(), "closing the failed database");
                }
                return Ok(());
            }
            Err(shared) => {
                db = shared;
                wait_refusing(queue, REFUSE_EVERY, error)?;
            }
        }
    }
}

/// Opens the file, reads where it left off, and proves a write of [`PROBE_BYTES`] works.
fn reopen_and_probe(path: &Path) -> Result<(Database, u64, Micros), Fault> {
    let db = store::reopen(path)?;
    let (next, last_received) = contain(|| Ok(initialise(&db)?))?;
    contain(|| Ok(probe(&db)?))?;
    Ok((db, next, last_received))
}

fn probe(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(PROBE)?
        .insert(0, vec![0u8; PROBE_BYTES].as_slice())?;
    txn.commit()?;
    let txn = db.begin_write()?;
    txn.delete_table(PROBE)?;
    txn.commit()?;
    Ok(())
}

/// Waits `delay`, answering every command that arrives meanwhile with `error`.
fn wait_refusing(
    queue: &mut mpsc::Receiver<Command>,
    delay: Duration,
    error: &str,
) -> Result<(), ShutdownRequested> {
    let until = Instant::now() + delay;
    loop {
        loop {
            match queue.try_recv() {
                Ok(command) => refuse(command, error)?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(ShutdownRequested),
            }
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        thread::sleep(REFUSE_EVERY.min(until - now));
    }
}

fn refuse(command: Command, error: &str) -> Result<(), ShutdownRequested> {
    let error = || LogError::Storage(error.to_owned());
    match command {
        Command::Append { reply, .. } => drop(reply.send(Err(error()))),
        Command::Housekeeping { reply } => drop(reply.send(Err(error()))),
        Command::Erase { reply, .. } => drop(reply.send(Err(error()))),
        Command::SaveGroups { reply, .. } => drop(reply.send(Err(error()))),
        Command::Shutdown => return Err(ShutdownRequested),
    }
    Ok(())
}
