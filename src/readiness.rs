//! The one answer to "can this gateway take webhooks now, and if not, why?".
//!
//! `/readyz` computes it on every request and the gRPC health reporter (see
//! [`crate::app`]) recomputes it every [`CHECK_INTERVAL`] and publishes changes to
//! `grpc.health.v1`, so both report the same state with the same reason, for every backend.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use serde::Serialize;

use crate::events::EventLog;

/// How often gRPC health re-reads readiness: the longest the two can differ.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The `/readyz` body, and what gRPC health follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadyStatus {
    pub ready: bool,
    /// A closed set: `ready`, `shutting_down`, or the log's reason
    /// ([`crate::events::LogHealth::reason`]).
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Readiness from whether the gateway still accepts webhooks and the log's health.
pub fn status(accepting: &AtomicBool, log: &dyn EventLog) -> ReadyStatus {
    if !accepting.load(Ordering::Acquire) {
        return ReadyStatus {
            ready: false,
            reason: "shutting_down",
            detail: None,
        };
    }
    let health = log.health();
    ReadyStatus {
        ready: health.is_ready(),
        reason: health.reason(),
        detail: health.detail(),
    }
}
