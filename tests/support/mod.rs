//! Shared integration-test harness: a real gateway on port 0, signed requests over real
//! HTTP, and a real tonic client.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod admin;
pub mod consume;
pub mod fake_spike;
pub mod nats;
pub mod real_binary;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use spike_gateway::{
    app::{Application, RunError},
    config::{Cli, Config},
    events::EventLog,
    grpc::event_stream::SubscriberCount,
    proto::{Event, SubscribeRequest, event_stream_client::EventStreamClient},
    webhook::signature::sign,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Status, Streaming, transport::Channel};

pub const KEY: &str = "test-signature-key";

pub const MAIN: &str = "/webhooks/spike";
pub const LAB: &str = "/webhooks/spike/lab-reports";
pub const NUTRITION: &str = "/webhooks/spike/nutrition";

/// Every bundled sample with the path Spike would post it to.
pub const SAMPLES: [(&str, &str); 10] = [
    ("main-batch.json", MAIN),
    ("main-record-change.json", MAIN),
    ("main-provider-integration-created.json", MAIN),
    ("main-provider-integration-deleted.json", MAIN),
    ("lab-report-completed.json", LAB),
    ("lab-report-failed.json", LAB),
    ("lab-report-enveloped.json", LAB),
    ("nutrition-completed.json", NUTRITION),
    ("nutrition-failed.json", NUTRITION),
    ("nutrition-enveloped.json", NUTRITION),
];

pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// A distinct, valid main-path record_change for `user`, unique by `n`.
pub fn record_change(user: &str, n: u64) -> serde_json::Value {
    serde_json::json!({
        "application_user_id": user,
        "timestamp": format!("2025-04-15T13:33:55.{n:09}Z"),
        "event_type": "record_change",
        "metrics": ["steps"],
        "provider_slug": "garmin",
    })
}

pub struct TestApp {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub log: Arc<dyn EventLog>,
    pub subscribers: SubscriberCount,
    pub client: reqwest::Client,
    /// Kept so the data directory lives as long as the app (and can be reused).
    pub data_dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

/// The embedded (default) store in a fresh temporary directory.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Extra flags as on the command line, e.g. `["--store", "memory"]`.
pub async fn spawn_app_with(flags: &[&str]) -> TestApp {
    spawn_app_in(Arc::new(tempfile::tempdir().unwrap()), flags).await
}

/// An app on an existing data directory (to test restarts).
pub async fn spawn_app_in(data_dir: Arc<tempfile::TempDir>, flags: &[&str]) -> TestApp {
    let dir = data_dir.path().to_str().unwrap().to_owned();
    let mut argv = vec![
        "spike-gateway",
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--data-dir",
        &dir,
        "--shutdown-grace",
        "5s",
    ];
    if !flags.contains(&"--webhook-signature-key") {
        argv.extend(["--webhook-signature-key", KEY]);
    }
    argv.extend_from_slice(flags);
    let config = Config::from_cli(Cli::try_parse_from(argv).expect("test flags parse"))
        .expect("test config is valid");
    let app = Application::build(config).await.expect("app builds");
    let (http, grpc, log, subscribers) = (
        app.http_addr(),
        app.grpc_addr(),
        app.log(),
        app.subscribers(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    TestApp {
        http,
        grpc,
        log,
        subscribers,
        client: reqwest::Client::new(),
        data_dir,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Posts `body` signed with the test key.
    pub async fn post(&self, path: &str, body: &[u8]) -> reqwest::Response {
        self.post_with_signature(path, body, Some(&sign(KEY, body)))
            .await
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.post(path, &serde_json::to_vec(body).unwrap()).await
    }

    pub async fn post_with_signature(
        &self,
        path: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url(path)).body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("X-Body-Signature", signature);
        }
        request.send().await.expect("gateway answers")
    }

    pub async fn grpc_client(&self) -> EventStreamClient<Channel> {
        EventStreamClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("gRPC connects")
    }

    pub async fn subscribe(&self, request: SubscribeRequest) -> Result<Streaming<Event>, Status> {
        self.grpc_client()
            .await
            .subscribe(request)
            .await
            .map(|r| r.into_inner())
    }

    /// Asks the app to shut down and waits for it to finish.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("app stops within 10 s")
                .expect("app task did not panic")
                .expect("app ran without error");
        }
    }
}

/// How often the polling helpers re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `check` until it yields `Some`, failing the test with `what` if `within` passes
/// first. A check that itself hangs counts against the same deadline.
pub async fn eventually<T>(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    let timed_out = || -> ! { panic!("timed out after {within:?} waiting until {what}") };
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Some(value)) => return value,
            Ok(None) => {}
            Err(_) => timed_out(),
        }
        if tokio::time::Instant::now() >= deadline {
            timed_out();
        }
        // The polling interval itself: the deadline above bounds the wait.
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`eventually`] for a condition without a value.
pub async fn wait_until(within: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    eventually(within, what, async || condition().await.then_some(())).await
}

/// [`wait_until`] for blocking code (no runtime): the condition is checked on this thread.
pub fn wait_until_blocking(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        // The polling interval itself: the deadline above bounds the wait.
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The `google.rpc.ErrorInfo` in `status`'s details, checked to be in the gateway's domain,
/// as `(reason, metadata)`.
pub fn error_info(status: &Status) -> (String, std::collections::HashMap<String, String>) {
    use tonic_types::StatusExt;
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in the details of {status:?}"));
    assert_eq!(info.domain, "spike-gateway", "{info:?}");
    (info.reason, info.metadata)
}

/// The next stream item, failing the test if none arrives within 5 s.
pub async fn next(stream: &mut Streaming<Event>) -> Result<Event, Status> {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an event within 5 s")
        .map(|e| e.expect("stream still open"))
}

/// Reads exactly `n` events.
pub async fn take(stream: &mut Streaming<Event>, n: usize) -> Vec<Event> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        events.push(next(stream).await.expect("an event, not an error"));
    }
    events
}

/// Asserts nothing more arrives for a short while.
pub async fn assert_quiet(stream: &mut Streaming<Event>) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        panic!("expected no more events, got {item:?}");
    }
}

pub fn from_beginning() -> SubscribeRequest {
    SubscribeRequest {
        start: Some(spike_gateway::proto::subscribe_request::Start::FromBeginning(true)),
        ..Default::default()
    }
}

pub fn after_sequence(n: u64) -> SubscribeRequest {
    SubscribeRequest {
        start: Some(spike_gateway::proto::subscribe_request::Start::AfterSequence(n)),
        ..Default::default()
    }
}
