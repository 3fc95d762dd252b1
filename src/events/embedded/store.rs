//! Opening the database file, and containing what goes wrong with it.
//!
//! - Start-up checks the whole file ([`open_checked`]): redb verifies the checksum of every
//!   page of the committed trees. A damaged file is refused with one line that names it and
//!   the `salvage` command, instead of being trusted until a read trips over the damage.
//! - An identity marker next to the file records that this directory holds a log, so a
//!   log file that disappeared or was emptied is refused instead of silently restarting
//!   the sequences at 1.
//! - Every call into redb that may meet damage runs under [`contain`]: redb may panic on a
//!   file altered outside it, and a panic must become an error, never a dead task.
//! - The writer reopens the file after a failed commit ([`reopen`]): redb refuses every
//!   commit after one I/O error until the database is closed and opened again.

use std::{
    any::Any,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use redb::Database;

use super::CACHE_BYTES;
use crate::events::{Damage, LogError, LogHealth};

/// The log file in the data directory.
pub const LOG_FILE: &str = "events.redb";
/// Written when the log is created: this directory holds a log, so a missing or empty
/// log file is damage, not a first start.
pub const MARKER_FILE: &str = "event-log.id";

/// How a call into redb failed.
#[derive(Debug)]
pub(super) enum Fault {
    /// Retrying (after a reopen) may succeed: I/O errors, a full disk.
    Transient(String),
    /// The stored data is damaged: checksums, undecodable values, a panic inside redb.
    Damaged(String),
}

impl Fault {
    pub(super) fn detail(&self) -> &str {
        match self {
            Fault::Transient(detail) | Fault::Damaged(detail) => detail,
        }
    }
}

impl From<redb::Error> for Fault {
    fn from(err: redb::Error) -> Self {
        Fault::of(&err)
    }
}

impl Fault {
    pub(super) fn of(err: &redb::Error) -> Self {
        let damaged = matches!(err, redb::Error::Corrupted(_));
        if damaged {
            Fault::Damaged(err.to_string())
        } else {
            Fault::Transient(err.to_string())
        }
    }
}

/// Runs `f`, turning a panic into [`Fault::Damaged`]. redb documents that a file
/// corrupted outside it may panic a reader; the callers only read or write through redb,
/// whose state after such a panic is discarded (readers drop their transaction, the
/// writer reopens the file), so observing it half-updated is not a concern.
pub(super) fn contain<T>(f: impl FnOnce() -> Result<T, Fault>) -> Result<T, Fault> {
    crate::telemetry::catch_panic(f).unwrap_or_else(|panic| {
        Err(Fault::Damaged(format!(
            "redb panicked: {}",
            panic_message(panic.as_ref())
        )))
    })
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// The open database, shared by readers and the writer. `None` while the writer reopens
/// the file: redb locks it, so the old handle must be gone before the new one opens.
/// A `RwLock` held only to clone or swap the `Arc`, never across a read.
#[derive(Default)]
pub(super) struct Slot(RwLock<Option<Arc<Database>>>);

impl Slot {
    pub(super) fn new(db: Arc<Database>) -> Self {
        Self(RwLock::new(Some(db)))
    }

    pub(super) fn get(&self) -> Result<Arc<Database>, LogError> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                LogError::Storage("the event log is reopening after a storage fault".into())
            })
    }

    pub(super) fn set(&self, db: Option<Arc<Database>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = db;
    }
}

/// What the embedded log reports to readiness. Written by the writer (write failures) and
/// by readers (damage); a std Mutex, held only to copy or replace a small value.
#[derive(Default)]
pub(super) struct Health {
    closed: AtomicBool,
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    write_error: Option<String>,
    /// Sticky: once damage is seen, readiness reports it until the operator salvages.
    damage: Option<Damage>,
}

impl Health {
    pub(super) fn current(&self) -> LogHealth {
        if self.closed.load(Ordering::Acquire) {
            return LogHealth::Closed;
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match (&state.damage, &state.write_error) {
            (Some(damage), _) => LogHealth::Damaged(damage.clone()),
            (None, Some(error)) => LogHealth::WriteFailing(error.clone()),
            (None, None) => LogHealth::Ready,
        }
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub(super) fn write_failed(&self, error: &str) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_error = Some(error.to_owned());
    }

    pub(super) fn write_recovered(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_error = None;
    }

    /// Records damage (the first report is kept: it names the earliest finding) and returns
    /// the error a caller gets for it.
    pub(super) fn damaged(&self, sequence: Option<u64>, detail: &str) -> LogError {
        let damage = Damage {
            sequence,
            detail: detail.to_owned(),
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.damage.is_none() {
            tracing::error!(
                reason = "storage_damaged",
                sequence,
                detail,
                "event log damage found; readiness is off until the log is salvaged"
            );
            state.damage = Some(damage.clone());
        }
        LogError::Damaged(damage)
    }
}

/// Opens (or creates) the log in `data_dir` for serving, after checking it whole if `check`.
pub(super) fn open_checked(data_dir: &Path, check: bool) -> Result<Database, LogError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| LogError::Storage(format!("cannot create {}: {e}", data_dir.display())))?;
    let path = data_dir.join(LOG_FILE);
    let marker = data_dir.join(MARKER_FILE);
    let file_len = match std::fs::metadata(&path) {
        Ok(meta) => Some(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(cannot_open(&path, &e.to_string())),
    };
    if marker.exists() && file_len.unwrap_or(0) == 0 {
        let state = if file_len.is_some() {
            "is empty"
        } else {
            "is missing"
        };
        return Err(LogError::Storage(format!(
            "{} {state}, but {} says this directory held an event log: restore the file from \
             a backup, or remove {} to start an empty log on purpose",
            path.display(),
            marker.display(),
            marker.display()
        )));
    }
    let db = contain(|| {
        Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(check)
            .set_repair_callback(report_rollback)
            .create(&path)
            .map_err(|e| Fault::from(redb::Error::from(e)))
    })
    .map_err(|fault| match fault {
        Fault::Damaged(detail) => damaged_file(&path, data_dir, &detail),
        Fault::Transient(detail) => cannot_open(&path, &detail),
    })?;
    if !marker.exists() {
        // A new log, or one written before markers existed (0.1): mark it from now on.
        write_marker(&marker)
            .map_err(|e| LogError::Storage(format!("cannot write {}: {e}", marker.display())))?;
    }
    Ok(db)
}

/// Opens the file again after a failed commit. The check on open is skipped: redb repairs
/// a file it did not close cleanly by itself, and the damage check already ran at start.
pub(super) fn reopen(path: &Path) -> Result<Database, Fault> {
    contain(|| {
        Database::builder()
            .set_cache_size(CACHE_BYTES)
            .open(path)
            .map_err(|e| Fault::from(redb::Error::from(e)))
    })
}

/// redb calls this while it repairs. At 0.3 it has found that the newest commit does not
/// verify and rolls back to the one before: expected after a crash in the middle of a
/// commit (which was never acknowledged), the loss of that commit after outside damage.
fn report_rollback(session: &mut redb::RepairSession) {
    if (session.progress() - 0.3).abs() < 0.01 {
        tracing::warn!(
            "the newest commit of the event log does not verify; redb rolls back to the \
             commit before it (normal after a crash during a commit)"
        );
    }
}

fn cannot_open(path: &Path, detail: &str) -> LogError {
    LogError::Storage(format!("cannot open {}: {detail}", path.display()))
}

/// The one line start-up prints for a damaged file.
fn damaged_file(path: &Path, data_dir: &Path, detail: &str) -> LogError {
    LogError::Storage(format!(
        "{} is damaged ({detail}); refusing to start. Copy every readable event into a new \
         data directory with `spike-gateway salvage --from {} --to NEW_DIR`, then start with \
         GATEWAY_DATA_DIR=NEW_DIR",
        path.display(),
        data_dir.display()
    ))
}

/// Writes the marker durably: the file, then its directory entry.
pub(super) fn write_marker(marker: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::create(marker)?;
    writeln!(
        file,
        "spike-gateway event log ({LOG_FILE}); marked {}",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )?;
    file.sync_all()?;
    sync_dir(marker)
}

/// Syncs the directory holding `path`, so a file created, renamed or removed there stays
/// so after a crash.
pub(super) fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The log file of `data_dir`.
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LOG_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_outlasts_a_recovered_write_and_the_first_report_is_kept() {
        let health = Health::default();
        assert_eq!(health.current(), LogHealth::Ready);
        health.write_failed("disk full");
        assert_eq!(health.current().reason(), "storage_write_failing");
        health.write_recovered();
        assert_eq!(health.current(), LogHealth::Ready);
        health.damaged(Some(7), "bad page");
        health.damaged(Some(9), "later finding");
        health.write_recovered();
        let LogHealth::Damaged(damage) = health.current() else {
            panic!("damage is sticky: {:?}", health.current());
        };
        assert_eq!(damage.sequence, Some(7));
        assert!(damage.to_string().contains("at sequence 7"), "{damage}");
        health.close();
        assert_eq!(health.current(), LogHealth::Closed);
    }

    #[test]
    fn a_panic_becomes_a_damage_fault() {
        let fault = contain::<()>(|| panic!("Invalid page type byte 0")).unwrap_err();
        assert!(matches!(&fault, Fault::Damaged(d) if d.contains("Invalid page type")));
        let io = redb::Error::Io(std::io::Error::other("No space left on device"));
        assert!(matches!(Fault::of(&io), Fault::Transient(_)));
        let corrupted = redb::Error::Corrupted("checksum".into());
        assert!(matches!(Fault::of(&corrupted), Fault::Damaged(_)));
    }
}
