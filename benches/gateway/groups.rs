//! Consumer-group delivery against plain `Subscribe` on the same log: four group members
//! acking each delivery as it arrives, against four plain subscribers.
//!
//! Like with like: both sides read the same stored events from the beginning, with the
//! same payload (no raw JSON), their clients in this process, after one unmeasured
//! `Subscribe` has read the whole log once (so neither side pays for a cold cache). Each
//! side's clock and the gateway's CPU (`/proc`) run from its first delivery to its last
//! one received (plain) or acknowledged (group).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeRequest, consume_open, consume_request,
    event_stream_client::EventStreamClient, subscribe_request::Start,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Server, bulk_load, count_events, load::Cpu, runs, spread, subscribe, wait_for};

/// Events stored and read by both sides.
const EVENTS: u64 = 100_000;
/// Streams on each side: plain subscribers, and group members.
const STREAMS: u64 = 4;

/// One group member: opens `group` from the beginning and acks every delivery at once.
/// Counts first deliveries into `acked` once their ack is queued; returns when the stream
/// ends.
pub async fn member(url: String, group: &'static str, acked: Arc<AtomicU64>) {
    let mut client = EventStreamClient::connect(url).await.unwrap();
    // Acks queued for the stream: one per delivery, at most max_in_flight outstanding.
    let (requests, outgoing) = mpsc::channel(1024);
    let open = ConsumeOpen {
        group: group.to_owned(),
        start: Some(consume_open::Start::FromBeginning(true)),
        max_in_flight: 256,
        ..ConsumeOpen::default()
    };
    let message = |request| ConsumeRequest {
        request: Some(request),
    };
    requests
        .send(message(consume_request::Request::Open(open)))
        .await
        .unwrap();
    let mut deliveries = client
        .consume(ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    while let Ok(Some(delivery)) = deliveries.message().await {
        let sequence = delivery.event.map_or(0, |e| e.sequence);
        let ack = consume_request::Request::Ack(Ack {
            sequences: vec![sequence],
        });
        if requests.send(message(ack)).await.is_err() {
            return;
        }
        if delivery.attempt == 1 {
            acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What one side of a run measured, from its first delivery to its last.
struct Side {
    rate: f64,
    cpu_us: f64,
    cpu: Cpu,
}

/// Starts `readers`, then measures from the first delivery they count until `expected`.
async fn drain(
    gateway: &Server,
    expected: u64,
    readers: impl AsyncFnOnce(Arc<AtomicU64>) -> Vec<tokio::task::JoinHandle<()>>,
) -> Side {
    let counted = Arc::new(AtomicU64::new(0));
    let tasks = readers(counted.clone()).await;
    wait_for(&counted, 1, Duration::from_secs(60)).await;
    let (before, started) = (gateway.cpu(), Instant::now());
    wait_for(&counted, expected, Duration::from_secs(300)).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = gateway.cpu().since(&before);
    tasks.iter().for_each(|t| t.abort());
    Side {
        rate: expected as f64 / seconds,
        cpu_us: cpu.total * 1e6 / expected as f64,
        cpu,
    }
}

/// One run on a fresh gateway: (plain, group).
async fn run(store: &str) -> (Side, Side) {
    let gateway = Server::gateway_with(store, None);
    bulk_load(&gateway, EVENTS).await;
    let url = gateway.grpc_url();
    let warm = drain(&gateway, EVENTS, async |counted| {
        let stream = subscribe(&url, Some(Start::FromBeginning(true))).await;
        vec![count_events(stream, counted)]
    });
    warm.await;
    let plain = drain(&gateway, STREAMS * EVENTS, async |counted| {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let stream = subscribe(&url, Some(Start::FromBeginning(true))).await;
            tasks.push(count_events(stream, counted.clone()));
        }
        tasks
    })
    .await;
    let group = drain(&gateway, EVENTS, async |counted| {
        (0..STREAMS)
            .map(|_| tokio::spawn(member(url.clone(), "bench", counted.clone())))
            .collect()
    })
    .await;
    (plain, group)
}

/// A consumer group of 4 members acking each delivery, against 4 plain `Subscribe`
/// streams, on the memory and the embedded store, [`runs`] each.
pub async fn section() {
    for store in ["memory", "embedded"] {
        let measured: Vec<(Side, Side)> = {
            let mut all = Vec::new();
            for _ in 0..runs() {
                all.push(run(store).await);
            }
            all
        };
        let figure =
            |f: &dyn Fn(&(Side, Side)) -> f64| measured.iter().map(f).collect::<Vec<f64>>();
        let ratios = figure(&|(p, g)| g.rate / p.rate);
        let added = figure(&|(p, g)| g.cpu_us - p.cpu_us);
        let middle = &measured[super::median_index(&added)];
        println!(
            "groups {store:<8} plain Subscribe, {STREAMS} streams from the beginning: {} deliveries/s, gateway CPU {} µs/delivery\n    by thread (median run, µs/delivery): {}",
            spread(&figure(&|(p, _)| p.rate), 0),
            spread(&figure(&|(p, _)| p.cpu_us), 2),
            middle.0.cpu.per_thread(STREAMS * EVENTS),
        );
        println!(
            "groups {store:<8} consumer group, {STREAMS} members acking each delivery: {} acknowledged deliveries/s, gateway CPU {} µs/delivery\n    by thread (median run, µs/delivery): {}",
            spread(&figure(&|(_, g)| g.rate), 0),
            spread(&figure(&|(_, g)| g.cpu_us), 2),
            middle.1.cpu.per_thread(EVENTS),
        );
        println!(
            "groups {store:<8} group / plain: {}x deliveries/s (target >= 0.5x); added gateway CPU {} µs per acknowledged delivery\n",
            spread(&ratios, 2),
            spread(&added, 2),
        );
    }
}
