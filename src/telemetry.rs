//! Tracing set-up: text or JSON on stderr, level from `RUST_LOG` (default `info`), and,
//! when an OTLP endpoint is configured, OpenTelemetry span export ([`otel`]).
//!
//! The code never puts payload bodies, signatures, keys or tokens into log fields or span
//! attributes; this module only chooses the format and the export.

pub mod otel;

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicU64, Ordering},
};

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TracesConfig};

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

/// Installs the global subscriber: logs, plus the OpenTelemetry layer when `traces` is
/// set. Must run inside a tokio runtime when `traces` is set (the exporter runs on it).
/// The returned [`otel::Export`] flushes the spans still buffered when shut down.
pub fn init(format: LogFormat, traces: Option<&TracesConfig>) -> Result<otel::Export, String> {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let (export, layer) = match traces {
        Some(traces) => {
            let (export, layer) = otel::start(traces)?;
            (export, Some(layer))
        }
        None => (otel::Export::default(), None),
    };
    // try_init: a second initialisation (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(layer)
        .try_init();
    Ok(export)
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
