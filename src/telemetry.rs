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

thread_local! {
    /// Set while [`catch_panic`] runs on this thread: a panic there is reported by the
    /// code that catches it, as an error value.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic, which [`log_panics`] then logs at debug level only: the
/// caller turns it into an error that it reports itself (storage code wraps redb this way,
/// since redb may panic on a damaged file).
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    let outer = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result
}

/// Reports panics as one log line (message and location) instead of the default
/// multi-line text on stderr; panics [`catch_panic`] catches go to the debug level.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        if CATCHING.with(|c| c.get()) {
            tracing::debug!(thread, %location, "caught panic: {message} {}", std::backtrace::Backtrace::force_capture());
        } else {
            tracing::error!(thread, %location, "panic: {message}");
        }
    }));
}
