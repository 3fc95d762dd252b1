//! Real `nats-server` processes for the NATS backend tests.
//!
//! Tests use the server at `NATS_URL` when set (`.ci/run` starts one), or start their own
//! from `nats-server` on the PATH. Without either they are skipped with a printed notice.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
}

/// Whether a nats-server can be started here; prints why not otherwise.
pub fn available() -> bool {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        // Written to the stderr handle, not with eprintln!, which the test harness captures
        // for passing tests: the skip must be visible in a plain `cargo test`.
        static NOTICE: std::sync::Once = std::sync::Once::new();
        NOTICE.call_once(|| {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: NATS tests need nats-server on the PATH (Debian package nats-server) \
                 or NATS_URL; `bash .ci/run` installs and starts one"
            );
        });
    }
    found
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a free loopback port with a fresh store.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            child: None,
            port,
            store: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts on the same port and store directory.
    pub fn restart(&mut self) {
        self.stop();
        let store: PathBuf = self.store.path().into();
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stream name and subject prefix no other test uses, so tests can share one server.
pub fn unique_stream() -> (String, String) {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}_{n}", std::process::id());
    (format!("TEST_{id}"), format!("test{id}"))
}
