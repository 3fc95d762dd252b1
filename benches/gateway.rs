//! End-to-end benchmarks: `cargo bench --bench gateway` (figures in the README).
//!
//! Drives the release `spike-gateway` binary (embedded store, fresh data directory each
//! time) over real HTTP and gRPC, and compares it in the same run with two baselines this
//! program also serves (it re-executes itself with BENCH_ROLE): a bare axum handler
//! answering 200, and a minimal one that verifies the HMAC and parses the JSON. Fan-out is
//! compared with nats-server core pub/sub when nats-server is on the PATH.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use spike_gateway::{
    proto::{SubscribeRequest, event_stream_client::EventStreamClient, subscribe_request::Start},
    webhook::signature::sign,
};
use tokio::task::JoinSet;

#[path = "gateway/groups.rs"]
mod groups;
#[path = "gateway/load.rs"]
mod load;

use load::{Cpu, spread};

const KEY: &str = "bench-signature-key";
/// Runs per figure (medians and spread over them): 3, or `BENCH_RUNS` (e.g. 1 under a
/// profiler).
fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}

fn main() {
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("bare") => return baseline(false),
        Ok("verify") => return baseline(true),
        _ => {}
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run());
}

/// A baseline server on an ephemeral port; prints `READY <addr>`.
fn baseline(verify: bool) {
    use axum::{Router, body::Bytes, http::HeaderMap, http::StatusCode, routing::post};
    use hmac::{Hmac, Mac};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let handler = move |headers: HeaderMap, body: Bytes| async move {
            if !verify {
                return StatusCode::OK;
            }
            let Some(signature) = headers
                .get("x-body-signature")
                .and_then(|v| hex::decode(v.as_bytes()).ok())
            else {
                return StatusCode::UNAUTHORIZED;
            };
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
            mac.update(&body);
            if mac.verify_slice(&signature).is_err() {
                return StatusCode::UNAUTHORIZED;
            }
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(_) => StatusCode::OK,
                Err(_) => StatusCode::BAD_REQUEST,
            }
        };
        let app = Router::new().route("/webhooks/spike", post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("READY {}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

struct Server {
    child: Child,
    http: SocketAddr,
    grpc: Option<SocketAddr>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn gateway() -> Self {
        Self::gateway_with("embedded", None)
    }

    /// A gateway on `store` (`embedded` or `memory`), pinned to the CPUs `pin` names
    /// (taskset's list syntax) when given.
    fn gateway_with(store: &str, pin: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // BENCH_GATEWAY_BIN runs another build (e.g. a copy from before a change) for A/B.
        let binary = std::env::var("BENCH_GATEWAY_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_spike-gateway").to_owned());
        let binary = binary.as_str();
        let mut command = match pin {
            // taskset execs the binary, so the child's pid is the gateway's.
            Some(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset.args(["-c", cpus, binary]);
                taskset
            }
            None => Command::new(binary),
        };
        let mut child = command
            .env("SPIKE_WEBHOOK_SIGNATURE_KEY", KEY)
            .env("GATEWAY_STORE", store)
            // Room for every event a scenario sends: no eviction during a run.
            .env("GATEWAY_MEMORY_CAPACITY", "1000000")
            .env("GATEWAY_DATA_DIR", dir.path())
            .env("GATEWAY_HTTP_ADDR", "127.0.0.1:0")
            .env("GATEWAY_GRPC_ADDR", "127.0.0.1:0")
            // Per-request info lines would cost more than the work measured.
            .env("RUST_LOG", "warn,spike_gateway::app=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the release binary runs");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains("spike-gateway listening"))
            .expect("gateway starts");
        std::thread::spawn(move || lines.for_each(drop));
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Self {
            http: field("http"),
            grpc: Some(field("grpc")),
            child,
            _dir: Some(dir),
        }
    }

    fn baseline(role: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("BENCH_ROLE", role)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Self {
            http: line.trim().trim_start_matches("READY ").parse().unwrap(),
            grpc: None,
            child,
            _dir: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> Cpu {
        Cpu::of(self.pid())
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn url(&self) -> String {
        format!("http://{}/webhooks/spike", self.http)
    }

    fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc.unwrap())
    }
}

/// A distinct, signed record_change; `n` makes it unique.
fn webhook(run: u64, n: u64) -> (Vec<u8>, String) {
    let body = format!(
        r#"{{"application_user_id":"u-{run}-{n}","timestamp":"2025-04-15T13:33:55.{n:09}Z","event_type":"record_change","metrics":["steps","distance"],"activity_types":["walking"],"provider_slug":"garmin","earliest_record_start_at":"2025-04-15T09:30:00Z","latest_record_end_at":"2025-04-15T13:33:00Z"}}"#
    );
    let signature = sign(KEY, body.as_bytes());
    (body.into_bytes(), signature)
}

fn batch(run: u64, from: u64, count: u64) -> (Vec<u8>, String) {
    let items: Vec<String> = (from..from + count)
        .map(|n| String::from_utf8(webhook(run, n).0).unwrap())
        .collect();
    let body = format!("[{}]", items.join(","));
    let signature = sign(KEY, body.as_bytes());
    (body.into_bytes(), signature)
}

/// Posts a body with its `X-Body-Signature`, as `webhook` and `batch` produce them.
async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    (body, signature): (Vec<u8>, String),
) -> reqwest::Result<reqwest::Response> {
    client
        .post(url)
        .header("X-Body-Signature", signature)
        .body(body)
        .send()
        .await
}

fn http_client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .http1_only()
        .build()
        .unwrap()
}

/// Which server an ingest run measures.
#[derive(Clone, Copy)]
enum Target {
    /// A baseline role of this program (`bare` or `verify`).
    Baseline(&'static str),
    /// The gateway on a store (`memory` or `embedded`), with one live subscriber.
    Gateway(&'static str),
}

/// Webhooks in one fixed-count ingest run.
const INGEST_WEBHOOKS: u64 = 100_000;

/// One fixed-count ingest run against a fresh server: [`INGEST_WEBHOOKS`] distinct signed
/// webhooks over `connections` keep-alive connections, closed loop.
async fn ingest_run(target: Target, connections: usize, run: u64) -> load::Load {
    let server = match target {
        Target::Baseline(role) => Server::baseline(role),
        Target::Gateway(store) => Server::gateway_with(store, None),
    };
    let received = Arc::new(AtomicU64::new(0));
    let subscriber = match target {
        Target::Gateway(_) => Some(count_events(
            subscribe(&server.grpc_url(), None).await,
            received.clone(),
        )),
        Target::Baseline(_) => None,
    };
    let requests = (0..INGEST_WEBHOOKS)
        .map(|n| load::request("/webhooks/spike", webhook(run, n)))
        .collect();
    let measured = load::closed_loop(server.http, server.pid(), requests, connections).await;
    assert_eq!(
        measured.acknowledged, INGEST_WEBHOOKS,
        "every webhook acknowledged"
    );
    if let Some(subscriber) = subscriber {
        wait_for(&received, INGEST_WEBHOOKS, Duration::from_secs(20)).await;
        subscriber.abort();
    }
    measured
}

/// Waits until `counter` reaches `expected`, failing the bench past `deadline`.
async fn wait_for(counter: &AtomicU64, expected: u64, deadline: Duration) {
    let until = Instant::now() + deadline;
    while counter.load(Ordering::Relaxed) < expected {
        assert!(
            Instant::now() < until,
            "only {} of {expected} arrived within {deadline:?}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Ingest at 64 and 256 connections: throughput and server CPU per acknowledged webhook
/// for both baselines and the gateway on both local stores, [`runs`] each.
async fn ingest_section() {
    let targets = [
        ("bare axum 200", Target::Baseline("bare")),
        ("verify + parse", Target::Baseline("verify")),
        ("gateway memory, 1 subscriber", Target::Gateway("memory")),
        (
            "gateway embedded, 1 subscriber",
            Target::Gateway("embedded"),
        ),
    ];
    // BENCH_INGEST picks targets by a word of their name (e.g. `memory`), for profiling.
    let only = std::env::var("BENCH_INGEST").unwrap_or_default();
    for connections in [64, 256] {
        let mut medians = Vec::new();
        for (name, target) in targets {
            if !name.contains(only.as_str()) {
                medians.push((f64::NAN, f64::NAN));
                continue;
            }
            let mut measured = Vec::new();
            for run in 0..runs() as u64 {
                measured.push(ingest_run(target, connections, run).await);
            }
            let rates: Vec<f64> = measured.iter().map(load::Load::rate).collect();
            let cpus: Vec<f64> = measured.iter().map(load::Load::cpu_us).collect();
            let middle = &measured[median_index(&cpus)];
            println!(
                "ingest {connections:>3} conns  {name:<31} {} webhooks/s  server CPU {} µs/webhook\n    by thread (median run, µs/webhook): {}",
                spread(&rates, 0),
                spread(&cpus, 1),
                middle.cpu.per_thread(middle.acknowledged)
            );
            medians.push((median(rates), median(cpus)));
        }
        let (rate, cpu) = medians[1];
        for (i, (name, _)) in targets.iter().enumerate().skip(2) {
            if medians[i].0.is_nan() || rate.is_nan() {
                continue;
            }
            let limit = if name.contains("memory") { 1.5 } else { 2.0 };
            println!(
                "ingest {connections:>3} conns  {name}: throughput {:.2}x verify+parse (target >= 0.5x), CPU per webhook {:.2}x (target <= {limit}x)",
                medians[i].0 / rate,
                medians[i].1 / cpu,
            );
        }
        println!();
    }
}

/// The index of the run whose value is the median.
fn median_index(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|a, b| values[*a].total_cmp(&values[*b]));
    order[order.len() / 2]
}

/// Pins every thread of this process (loader and receiving clients) to `cpus`.
fn pin_self(cpus: &str) {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset runs");
    assert!(status.success(), "taskset -a -p -c {cpus}");
}

/// `Subscribe` read by a client that decodes whole events, as users' clients do.
async fn subscribe(
    url: &str,
    start: Option<Start>,
) -> tonic::Streaming<spike_gateway::proto::Event> {
    subscribe_as(url, start).await
}

/// An `Event` as a client that reads only positions decodes it: prost skips every other
/// field without allocating, so this client's replay rate is bounded by the gateway and the
/// wire rather than by decoding whole events on the same two cores.
#[derive(Clone, PartialEq, prost::Message)]
struct SequenceOnly {
    #[prost(uint64, tag = "1")]
    sequence: u64,
}

/// An `Event` as the latency clients need it: only the user id, which names the webhook.
#[derive(Clone, PartialEq, prost::Message)]
struct UserOnly {
    #[prost(string, tag = "5")]
    application_user_id: String,
}

/// What a latency client reads from each event it receives.
trait Received: prost::Message + Default + Send + 'static {
    fn user(&self) -> &str;
}

impl Received for spike_gateway::proto::Event {
    fn user(&self) -> &str {
        &self.application_user_id
    }
}

impl Received for UserOnly {
    fn user(&self) -> &str {
        &self.application_user_id
    }
}

/// `Subscribe` read by a client that decodes each event as `T` (a subset of `Event`'s fields).
async fn subscribe_as<T: prost::Message + Default + Send + 'static>(
    url: &str,
    start: Option<Start>,
) -> tonic::Streaming<T> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = SubscribeRequest {
        start,
        ..Default::default()
    };
    let path = http::uri::PathAndQuery::from_static("/spike.gateway.v1.EventStream/Subscribe");
    grpc.server_streaming(
        tonic::Request::new(request),
        path,
        tonic_prost::ProstCodec::default(),
    )
    .await
    .unwrap()
    .into_inner()
}

/// A subscriber that counts what it receives, until `stop`.
fn count_events<T: Send + 'static>(
    mut stream: tonic::Streaming<T>,
    counter: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(_)) = stream.message().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Events/s of a replay of `total` events, read from the stream `open` opens until its last
/// one arrives. The clock starts before the call, as a resuming client's would.
async fn replay_rate<T: Send + 'static>(
    open: impl Future<Output = tonic::Streaming<T>>,
    total: u64,
) -> f64 {
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let reader = count_events(open.await, received.clone());
    let deadline = started + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < total {
        assert!(
            Instant::now() < deadline,
            "replay of {total} events did not finish in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    reader.abort();
    rate
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// Posts distinct webhooks `0..total` at `rate` per second from 16 concurrent senders;
/// `on_send(n)` runs just before webhook `n` goes out. The caller awaits the senders.
fn post_paced(
    url: String,
    rate: u64,
    total: u64,
    run: u64,
    on_send: impl Fn(u64) + Clone + Send + 'static,
) -> JoinSet<()> {
    let client = http_client(16);
    let per_sender = 16u64;
    let mut senders = JoinSet::new();
    for s in 0..per_sender {
        let (client, url, on_send) = (client.clone(), url.clone(), on_send.clone());
        senders.spawn(async move {
            let mut ticks =
                tokio::time::interval(Duration::from_micros(1_000_000 * per_sender / rate));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in (s..total).step_by(per_sender as usize) {
                ticks.tick().await;
                let signed = webhook(run, n);
                on_send(n);
                let _ = post_signed(&client, &url, signed).await;
            }
        });
    }
    senders
}

/// `subscribers` live subscribers that count what they receive into `received`.
async fn counting_subscribers(
    gateway: &Server,
    subscribers: usize,
    received: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut readers = Vec::new();
    for _ in 0..subscribers {
        readers.push(count_events(
            subscribe(&gateway.grpc_url(), None).await,
            received.clone(),
        ));
    }
    readers
}

/// One latency run: percentiles in ms, the gateway's RSS growth, and how busy the gateway
/// and this process (senders and receiving clients) were over the sending window, in
/// percent of one core.
struct Latency {
    p50: f64,
    p99: f64,
    rss_growth_kib: i64,
    gateway_busy: f64,
    clients_busy: f64,
}

/// One latency scenario: how many subscribers, whether the gateway and the clients are
/// pinned to a core each, and the gateway's store.
#[derive(Clone, Copy)]
struct Case {
    subscribers: usize,
    pinned: bool,
    store: &'static str,
}

/// p50/p99 (ms) from webhook sent to event received, at `rate` per second, with
/// `subscribers` live subscribers decoding each event as `T`, and the gateway's RSS growth
/// over the run, on the case's store. `pinned` puts the gateway on CPU 0 and this process
/// (senders and receiving clients) on CPU 1.
async fn latency<T: Received>(
    rate: u64,
    seconds: u64,
    Case {
        subscribers,
        pinned,
        store,
    }: Case,
) -> Latency {
    let gateway = Server::gateway_with(store, pinned.then_some("0"));
    if pinned {
        pin_self("1");
    }
    let base = Instant::now();
    let total = rate * seconds;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let mut receivers = JoinSet::new();
    for _ in 0..subscribers {
        let mut stream = subscribe_as::<T>(&gateway.grpc_url(), None).await;
        let sent_at = sent_at.clone();
        receivers.spawn(async move {
            let mut latencies = Vec::with_capacity(total as usize);
            while (latencies.len() as u64) < total {
                let Ok(Ok(Some(event))) =
                    tokio::time::timeout(Duration::from_secs(20), stream.message()).await
                else {
                    break;
                };
                let n: u64 = event.user().rsplit('-').next().unwrap().parse().unwrap();
                let now = base.elapsed().as_micros() as u64;
                latencies.push(now.saturating_sub(sent_at[n as usize].load(Ordering::Relaxed)));
            }
            latencies
        });
    }
    let rss_start = gateway.rss_kib() as i64;
    let (gateway_cpu, own_cpu) = (gateway.cpu(), Cpu::of(std::process::id()));
    let window = Instant::now();
    let mut senders = post_paced(gateway.url(), rate, total, 0, move |n| {
        sent_at[n as usize].store(base.elapsed().as_micros() as u64, Ordering::Relaxed);
    });
    while senders.join_next().await.is_some() {}
    let rss_end = gateway.rss_kib() as i64;
    let seconds = window.elapsed().as_secs_f64();
    let busy = |cpu: Cpu| 100.0 * cpu.total / seconds;
    let gateway_busy = busy(gateway.cpu().since(&gateway_cpu));
    let clients_busy = busy(Cpu::of(std::process::id()).since(&own_cpu));
    let mut all = Vec::new();
    while let Some(latencies) = receivers.join_next().await {
        all.extend(latencies.unwrap());
    }
    if pinned {
        pin_self(&format!("0-{}", cores() - 1));
        let now = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            now,
            cores(),
            "the bench runs on every core again after a pinned case"
        );
    }
    all.sort_unstable();
    assert_eq!(
        all.len() as u64,
        total * subscribers as u64,
        "every subscriber got every event"
    );
    Latency {
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        rss_growth_kib: rss_end - rss_start,
        gateway_busy,
        clients_busy,
    }
}

/// RSS samples (seconds since start, KiB) of a gateway taking `rate` distinct webhooks per
/// second for `seconds`, with `subscribers` live subscribers: shows whether memory levels
/// off under steady load (live ring, redb's cache, allocator) or keeps growing.
async fn steady(rate: u64, seconds: u64, subscribers: usize) -> Vec<(u64, u64)> {
    let gateway = Server::gateway();
    let received = Arc::new(AtomicU64::new(0));
    let readers = counting_subscribers(&gateway, subscribers, &received).await;
    let total = rate * seconds;
    let mut senders = post_paced(gateway.url(), rate, total, 7, |_| {});
    let mut samples = vec![(0, gateway.rss_kib())];
    let mut every = tokio::time::interval(Duration::from_secs(10));
    every.tick().await;
    for at in (10..=seconds).step_by(10) {
        every.tick().await;
        samples.push((at, gateway.rss_kib()));
    }
    while senders.join_next().await.is_some() {}
    let expected = total * subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        received.load(Ordering::Relaxed),
        expected,
        "every subscriber got every event"
    );
    readers.iter().for_each(|r| r.abort());
    samples
}

/// Deliveries per second to `subscribers` subscribers of `events` events posted in batches,
/// and the gateway's CPU per delivery in µs (its ingest of the batches included).
async fn fanout(subscribers: usize, events: u64) -> (f64, f64) {
    let gateway = Server::gateway();
    let received = Arc::new(AtomicU64::new(0));
    let readers = counting_subscribers(&gateway, subscribers, &received).await;
    let client = http_client(4);
    let before = gateway.cpu();
    let started = Instant::now();
    for from in (0..events).step_by(100) {
        post_signed(&client, &gateway.url(), batch(0, from, 100))
            .await
            .unwrap();
    }
    let expected = events * subscribers as u64;
    while received.load(Ordering::Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = expected as f64 / started.elapsed().as_secs_f64();
    let cpu = gateway.cpu().since(&before).total * 1e6 / expected as f64;
    readers.iter().for_each(|r| r.abort());
    (rate, cpu)
}

/// The same fan-out through nats-server core pub/sub (no persistence), same payload size.
async fn nats_fanout(subscribers: usize, events: u64, payload: usize) -> Option<f64> {
    use futures_util::StreamExt;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let mut server = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let url = format!("nats://127.0.0.1:{port}");
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = async_nats::connect(&url).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publisher = client?;
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..subscribers {
        let client = async_nats::connect(&url).await.ok()?;
        let mut subscription = client.subscribe("bench.fanout").await.ok()?;
        client.flush().await.ok()?;
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let _client = client;
            while subscription.next().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let body = bytes::Bytes::from(vec![b'x'; payload]);
    let started = Instant::now();
    for _ in 0..events {
        publisher.publish("bench.fanout", body.clone()).await.ok()?;
    }
    publisher.flush().await.ok()?;
    let expected = events * subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = received.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    readers.iter().for_each(|r| r.abort());
    let _ = server.kill();
    let _ = server.wait();
    Some(rate)
}

/// Whether a section runs: all by default, or those named in BENCH_ONLY (comma-separated:
/// ingest, latency, fanout, groups, replay, steady, idle).
fn enabled(section: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|s| s.trim() == section))
}

/// The machine's cores, as found when the bench starts (its header reads them first).
/// Read once: `available_parallelism` follows this process's CPU affinity, so read while a
/// pinned case holds the process on one core it says 1, and "unpinning" to that would
/// leave every later section (and every gateway it spawns) on one core.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Posts `total` distinct events in batches of 1,000 from 8 concurrent senders; events/s.
async fn bulk_load(gateway: &Server, total: u64) -> f64 {
    let client = http_client(8);
    let started = Instant::now();
    let mut posts = JoinSet::new();
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..8 {
        let (client, url, next) = (client.clone(), gateway.url(), next.clone());
        posts.spawn(async move {
            loop {
                let from = next.fetch_add(1000, Ordering::Relaxed);
                if from >= total {
                    break;
                }
                let response = post_signed(&client, &url, batch(0, from, 1000))
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200);
            }
        });
    }
    while posts.join_next().await.is_some() {}
    total as f64 / started.elapsed().as_secs_f64()
}

/// Delivery latency at 5,000/s with 1 and 100 subscribers, with 100 subscribers with the
/// gateway and the clients pinned to different CPUs, and that pinned case on `memory`.
async fn latency_section() {
    let case = |subscribers, pinned, store| Case {
        subscribers,
        pinned,
        store,
    };
    // (case, clients decode whole events)
    let mut cases = vec![
        (case(1, false, "embedded"), true),
        (case(100, false, "embedded"), true),
    ];
    if cores() >= 2 {
        // Pinned, the clients' decoding has one core to itself; with clients that decode
        // only the user id, what is left is the gateway's part of the tail. On `memory`,
        // the same without the durable commits: what the fsyncs cost the tail.
        cases.extend([
            (case(100, true, "embedded"), true),
            (case(100, true, "embedded"), false),
            (case(100, true, "memory"), false),
        ]);
    }
    for (case, whole) in cases {
        let Case {
            subscribers,
            pinned,
            store,
        } = case;
        let mut measured = Vec::new();
        for _ in 0..runs() {
            measured.push(if whole {
                latency::<spike_gateway::proto::Event>(5000, 4, case).await
            } else {
                latency::<UserOnly>(5000, 4, case).await
            });
        }
        let figure = |f: fn(&Latency) -> f64| measured.iter().map(f).collect::<Vec<f64>>();
        let growth: Vec<i64> = measured.iter().map(|r| r.rss_growth_kib).collect();
        let how = if pinned {
            "gateway on CPU 0, clients on CPU 1"
        } else {
            "unpinned"
        };
        let decoding = if whole {
            "whole events"
        } else {
            "only user ids"
        };
        println!(
            "latency at 5000/s, {store}, {subscribers:>3} subscribers, {how}, clients decoding {decoding}: p50 {} ms, p99 {} ms; RSS change {growth:?} KiB",
            spread(&figure(|r| r.p50), 2),
            spread(&figure(|r| r.p99), 2)
        );
        println!(
            "    busy, % of one core: gateway {}, senders and clients {}",
            spread(&figure(|r| r.gateway_busy), 0),
            spread(&figure(|r| r.clients_busy), 0)
        );
    }
    println!();
}

/// Fan-out to 100 subscribers, with the gateway's CPU per delivery, against nats-server.
async fn fanout_section() {
    let events = 10_000;
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..runs() {
        let (rate, cpu) = fanout(100, events).await;
        rates.push(rate);
        cpus.push(cpu);
    }
    let ours = median(rates.clone());
    println!(
        "fan-out spike-gateway, 100 subscribers: {} deliveries/s, gateway CPU {} µs/delivery (target <= 1.0)",
        spread(&rates, 0),
        spread(&cpus, 2)
    );
    let mut nats = Vec::new();
    for _ in 0..runs() {
        if let Some(rate) = nats_fanout(100, events, 300).await {
            nats.push(rate);
        }
    }
    if nats.is_empty() {
        println!("fan-out nats-server: skipped (nats-server not on the PATH)\n");
    } else {
        println!(
            "fan-out nats-server core, 100 subscribers: {} deliveries/s; ratio {:.2}x\n",
            spread(&nats, 0),
            ours / median(nats.clone())
        );
    }
}

/// Runs one section, then prints the hypervisor's steal over it: figures from a section
/// with much steal are not comparable with a quiet run's, even as same-run ratios.
async fn with_steal(section: &str, run: impl Future<Output = ()>) {
    let started = load::MachineTime::now();
    run.await;
    let steal = load::MachineTime::now().steal_percent_since(&started);
    println!("section {section}: CPU steal {steal:.1}% of the machine's time\n");
}

/// Bulk ingest of a 1,000,000-event log, its replay by two kinds of client, and the RSS
/// after it.
async fn replay_section() {
    let gateway = Server::gateway();
    let total = 1_000_000u64;
    println!(
        "bulk ingest of {total} events in batches of 1000: {:.0} events/s",
        bulk_load(&gateway, total).await
    );
    let url = gateway.grpc_url();
    let whole = subscribe(&url, Some(Start::FromBeginning(true)));
    let rate = replay_rate(whole, total).await;
    println!(
        "replay from_beginning of {total} events, client decoding every Event: {rate:.0} events/s"
    );
    let light = subscribe_as::<SequenceOnly>(&url, Some(Start::FromBeginning(true)));
    let rate = replay_rate(light, total).await;
    println!(
        "replay from_beginning of {total} events, client decoding only sequences: {rate:.0} events/s"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("RSS after {total} events: {} KiB", gateway.rss_kib());
}

async fn run() {
    println!(
        "spike-gateway benchmarks: {} cores, CPU {:?}, {} runs per figure: median [min–max]\n",
        cores(),
        load::cpu_model(),
        runs(),
    );
    if enabled("ingest") {
        with_steal("ingest", ingest_section()).await;
    }
    if enabled("latency") {
        with_steal("latency", latency_section()).await;
    }
    if enabled("fanout") {
        with_steal("fanout", fanout_section()).await;
    }
    if enabled("groups") {
        with_steal("groups", groups::section()).await;
    }
    // 4 and 5. Replay of a 1,000,000-event log, RSS after it, and idle subscribers.
    if enabled("replay") {
        with_steal("replay", replay_section()).await;
    }
    // 5b. RSS under steady load: 2,000 webhooks/s with 10 subscribers for 120 s.
    if enabled("steady") {
        let samples = steady(2000, 120, 10).await;
        let series: Vec<String> = samples
            .iter()
            .map(|(at, kib)| format!("{at}s {:.1}", *kib as f64 / 1024.0))
            .collect();
        let at = |t: u64| samples.iter().find(|s| s.0 == t).map_or(0, |s| s.1) as i64;
        println!(
            "steady load 2000/s, 10 subscribers, RSS MiB: {}\nsteady RSS change 60 s -> 120 s: {:+.1} MiB (0 -> 60 s: {:+.1} MiB)\n",
            series.join(", "),
            (at(120) - at(60)) as f64 / 1024.0,
            (at(60) - at(0)) as f64 / 1024.0,
        );
    }
    if !enabled("idle") {
        return;
    }

    let gateway = Server::gateway();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gateway.rss_kib();
    let mut idle = Vec::new();
    for _ in 0..50 {
        let mut client = EventStreamClient::connect(gateway.grpc_url())
            .await
            .unwrap();
        for _ in 0..200 {
            idle.push(
                client
                    .subscribe(SubscribeRequest::default())
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = gateway.rss_kib();
    println!(
        "idle subscribers: {} open, RSS {before} → {after} KiB, {:.1} KiB per subscriber",
        idle.len(),
        (after.saturating_sub(before)) as f64 / idle.len() as f64
    );
}
