//! Real `nats-server` processes for the NATS backend tests.
//!
//! Tests use the server at `NATS_URL` when set (`.ci/run` starts one), or start their own
//! from `nats-server` on the PATH. They are `#[ignore]`d, because they need one of the two:
//! `.ci/test` runs them when either is there and prints a SKIPPED line otherwise.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
}

/// Whether `nats-server` is on the PATH.
pub fn installed() -> bool {
    Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails the test unless a nats-server can be started. The NATS tests are `#[ignore]`d, so
/// this only runs when they were asked for: then a missing server is an error, not a pass.
pub fn require_installed() {
    assert!(
        installed(),
        "this test needs nats-server on the PATH (Debian package nats-server); \
         `bash .ci/run` installs it"
    );
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
        super::wait_until_blocking(
            Duration::from_secs(10),
            "nats-server accepts connections",
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a NATS test connects: `NATS_URL` when set, else a server of its own, which fails
/// the test when nats-server is not installed (the NATS tests are ignored, so they only run
/// when asked for). Keep the server, if any, alive for the test.
pub fn url_or_start() -> (String, Option<NatsServer>) {
    if let Some(url) = std::env::var("NATS_URL").ok().filter(|u| !u.is_empty()) {
        return (url, None);
    }
    require_installed();
    let server = NatsServer::start();
    (server.url(), Some(server))
}

/// A stream name and subject prefix no other test uses, so tests can share one server.
pub fn unique_stream() -> (String, String) {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}_{n}", std::process::id());
    (format!("TEST_{id}"), format!("test{id}"))
}
