//! Tracing set-up: text or JSON on stderr, level from `RUST_LOG` (default `info`).
//!
//! The code never puts payload bodies, signatures or keys into log fields; this module only
//! chooses the format.

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicU64, Ordering},
};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// An id for one webhook or RPC, for its log lines: the caller's `x-request-id` when it is
/// a short token, else a new one (process start time and a counter, unique per process).
pub fn request_id(offered: Option<&str>) -> String {
    if let Some(id) = offered.filter(|id| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    }) {
        return id.to_owned();
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| crate::events::time::now_micros() as u64 / 1_000_000);
    format!("{start:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // try_init: a second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
