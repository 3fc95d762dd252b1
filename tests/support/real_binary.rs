//! The real `spike-gateway` binary as an operator starts it, for the tests that need the
//! process itself (start-up checks, faults, upgrades).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

/// How long the binary may take to listen: start-up checks the whole log first.
const START_WITHIN: Duration = Duration::from_secs(30);

/// A running gateway binary; killed when dropped.
pub struct Gateway {
    pub child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Every line it has logged so far (stderr is drained all along, so it never blocks).
    pub log: Arc<Mutex<String>>,
}

impl Gateway {
    /// Posts `body` to `path`, signed with `key`, as Spike would.
    pub async fn post_json(&self, key: &str, path: &str, body: &serde_json::Value) -> u16 {
        let body = serde_json::to_vec(body).unwrap();
        let signature = spike_gateway::webhook::signature::sign(key, &body);
        reqwest::Client::new()
            .post(format!("http://{}{path}", self.http))
            .header("X-Body-Signature", signature)
            .body(body)
            .send()
            .await
            .expect("the gateway answers")
            .status()
            .as_u16()
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .expect("the gateway's gRPC port accepts")
    }

    /// Sends SIGTERM and waits (at most `within`, else the test fails) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed: {sent}");
        let mut exit = None;
        super::wait_until_blocking(within, "the gateway exits after SIGTERM", || {
            exit = self.child.try_wait().unwrap();
            exit.is_some()
        });
        exit.expect("waited for the exit")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary on `data_dir` with a clean environment: only `PATH`, the signing `key`, both
/// listeners on port 0, and info logs. Add what a test needs with `.env`.
pub fn command(data_dir: &Path, key: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spike-gateway"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SPIKE_WEBHOOK_SIGNATURE_KEY", key)
        .env("GATEWAY_DATA_DIR", data_dir)
        .env("GATEWAY_HTTP_ADDR", "127.0.0.1:0")
        .env("GATEWAY_GRPC_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    command
}

/// Spawns `command` and waits until it listens, reading the bound addresses from its log
/// line. `Err(its log)` if it exits first (a refusal, which must exit non-zero); fails the
/// test if it neither listens nor exits within [`START_WITHIN`].
pub fn start(mut command: Command) -> Result<Gateway, String> {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let log = Arc::new(Mutex::new(String::new()));
    // Carries the one "listening" line; dropped unsent when stderr closes (the process
    // exited), which ends the wait below at once.
    let (listening, listened) = mpsc::channel();
    let copy = log.clone();
    std::thread::spawn(move || {
        let mut listening = Some(listening);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = copy.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
            drop(log);
            if line.contains("spike-gateway listening")
                && let Some(listening) = listening.take()
            {
                let _ = listening.send(line);
            }
        }
    });
    match listened.recv_timeout(START_WITHIN) {
        Ok(line) => Ok(Gateway {
            http: address(&line, "http"),
            grpc: address(&line, "grpc"),
            child,
            log,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().unwrap();
            assert!(!status.success(), "a refusal exits non-zero");
            Err(log.lock().unwrap().clone())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            panic!(
                "the gateway neither listened nor exited within {START_WITHIN:?}:\n{}",
                log.lock().unwrap()
            );
        }
    }
}

/// The address after `name=` in the "listening" line.
fn address(line: &str, name: &str) -> SocketAddr {
    let field = format!("{name}=");
    let at = line
        .find(&field)
        .unwrap_or_else(|| panic!("no {field} in {line:?}"));
    line[at + field.len()..]
        .split_whitespace()
        .next()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no address after {field} in {line:?}"))
}
