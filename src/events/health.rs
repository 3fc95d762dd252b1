//! What a log reports about itself: whether it can take writes now, and if not, why; and,
//! for the store that commits to a local disk, how long its commits of appends took.
//!
//! Every backend answers [`EventLog::health`](super::EventLog::health); `/readyz` and gRPC
//! health both follow it through [`crate::readiness`], so they never disagree on the cause.

use std::{fmt, time::Duration};

/// Told of every successful commit of appends (webhooks' events and dead letters) in the
/// `embedded` log: how many new events it made durable and how long it took, the
/// transaction's writes and its fsync together. Every webhook answer waits for one, so a
/// slow disk shows here before it shows as slow webhooks. Commits that fail are not
/// reported here: they turn readiness off (`storage_write_failing`). The writer's other
/// transactions (group saves, erasure, housekeeping) are not timed.
/// Called on the writer's thread after each commit: it must only record, never block.
pub trait CommitObserver: Send + Sync {
    fn committed(&self, events: usize, took: Duration);
}

/// A log's state as readiness sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogHealth {
    /// Takes writes.
    Ready,
    /// The last write failed (disk full, I/O error); the log is retrying by itself.
    WriteFailing(String),
    /// Stored data could not be read back or written over. Stays until the operator acts
    /// (salvage): a retry cannot bring damaged pages back.
    Damaged(Damage),
    /// The backing service cannot be reached (NATS); the client reconnects by itself.
    Unreachable(String),
    /// Closed at shutdown.
    Closed,
}

impl LogHealth {
    pub fn is_ready(&self) -> bool {
        matches!(self, LogHealth::Ready)
    }

    /// A closed set of names for `/readyz`, the metric label and log lines.
    pub fn reason(&self) -> &'static str {
        match self {
            LogHealth::Ready => "ready",
            LogHealth::WriteFailing(_) => "storage_write_failing",
            LogHealth::Damaged(_) => "storage_damaged",
            LogHealth::Unreachable(_) => "store_unreachable",
            LogHealth::Closed => "closed",
        }
    }

    /// The human-readable cause, if not ready.
    pub fn detail(&self) -> Option<String> {
        match self {
            LogHealth::Ready | LogHealth::Closed => None,
            LogHealth::WriteFailing(detail) | LogHealth::Unreachable(detail) => {
                Some(detail.clone())
            }
            LogHealth::Damaged(damage) => Some(damage.to_string()),
        }
    }
}

/// Where stored data was found damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The first sequence that could not be read, when the damage is in the events.
    pub sequence: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sequence {
            Some(sequence) => write!(f, "the event log is damaged at sequence {sequence}")?,
            None => f.write_str("the event log is damaged")?,
        }
        write!(
            f,
            " ({}); stop the gateway and run `spike-gateway salvage`",
            self.detail
        )
    }
}
