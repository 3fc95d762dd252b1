// Wiring only; the crate forbids `unsafe` (Cargo.toml `[lints]`), and so does this file.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use spike_gateway::{
    app::{Application, ExitDeadline, shutdown_signal},
    config::{Config, Invocation},
    events::embedded::salvage,
    telemetry,
};

/// mimalloc: measured 12–37% less server CPU per webhook than glibc's allocator (README,
/// Performance), most of the request path's allocations being short-lived and per thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    telemetry::log_panics();
    let config = match Config::load_invocation() {
        Ok(Invocation::Serve(config)) => *config,
        Ok(Invocation::Salvage { from, to }) => return run_salvage(&from, &to),
        Err(e) => {
            eprintln!("spike-gateway: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = ExitDeadline::new(config.shutdown_grace);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("spike-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the span exporter, when configured, runs on it.
    let export = match runtime
        .block_on(async { telemetry::init(config.log_format, config.traces.as_ref()) })
    {
        Ok(export) => export,
        Err(e) => {
            eprintln!("spike-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let app = Application::build(config)
            .await
            .map_err(|e| e.to_string())?;
        let signal = shutdown_signal();
        app.run(deadline.armed_after(signal))
            .await
            .map_err(|e| e.to_string())
    });
    // Spans still buffered are flushed while the runtime (which exports them) still runs.
    export.shutdown(deadline.remaining());
    // Tasks still running (blocking ones included) get what is left of the grace.
    runtime.shutdown_timeout(deadline.remaining());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spike-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `spike-gateway salvage`: the report on stdout, a failure as one line on stderr.
fn run_salvage(from: &std::path::Path, to: &std::path::Path) -> ExitCode {
    match salvage::salvage(from, to) {
        Ok(report) => {
            println!("{report}");
            println!("the salvaged log is in {}", to.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spike-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
