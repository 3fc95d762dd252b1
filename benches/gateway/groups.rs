//! Consumer-group delivery against plain `Subscribe` on the same log: four group members
//! acking as they go (one `Ack` per delivery, and one per burst received), against four
//! plain subscribers.
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

use futures_util::FutureExt;
use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeRequest, consume_open, consume_request,
    event_stream_client::EventStreamClient, subscribe_request::Start,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Server, bulk_load, count_events, load::Cpu, runs, spread, subscribe, wait_for};

/// Events stored and read by both sides, per round.
const EVENTS: u64 = 100_000;
/// Streams on each side: plain subscribers, and group members.
const STREAMS: u64 = 4;
/// Rounds per side, one after the other within one measurement: each round's streams
/// read the whole log (a new group each round), so a side's window is long enough for
/// `/proc`'s 10 ms CPU ticks (one round of a group takes about 150 ms).
const ROUNDS: u64 = 4;

/// How a member acknowledges.
#[derive(Clone, Copy, Debug)]
pub enum Acks {
    /// One `Ack` message per delivery, sent as it arrives.
    Each,
    /// As it goes, one `Ack` for the deliveries already received: it takes each delivery
    /// as it arrives, then those that arrived meanwhile, and acks them in one message
    /// (what a worker does with `Ack.sequences`; no timer, no waiting for more).
    Received,
}

/// One group member: opens `group` from the beginning and acks every delivery at once
/// (`acks` says how). Counts first deliveries into `acked` once their ack is queued;
/// returns when the stream ends.
pub async fn member(url: String, group: String, acks: Acks, acked: Arc<AtomicU64>) {
    let mut client = EventStreamClient::connect(url).await.unwrap();
    // Ack messages queued for the stream: each answers at least one delivery, so at most
    // max_in_flight are outstanding.
    let (requests, outgoing) = mpsc::channel(1024);
    let open = ConsumeOpen {
        group,
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
        let (mut sequences, mut first) = (Vec::new(), 0);
        let mut next = Some(delivery);
        while let Some(delivery) = next.take() {
            sequences.push(delivery.event.map_or(0, |e| e.sequence));
            first += u64::from(delivery.attempt == 1);
            if let Acks::Received = acks {
                next = deliveries
                    .message()
                    .now_or_never()
                    .and_then(|m| m.ok().flatten());
            }
        }
        let ack = consume_request::Request::Ack(Ack { sequences });
        if requests.send(message(ack)).await.is_err() {
            return;
        }
        acked.fetch_add(first, Ordering::Relaxed);
    }
}

/// What one side of a run measured, from its first delivery to its last.
struct Side {
    rate: f64,
    cpu_us: f64,
    cpu: Cpu,
}

/// Runs [`ROUNDS`] rounds of readers, each started by `round` once the one before it has
/// counted `per_round`, and measures from the first delivery counted to the last.
async fn drain(
    gateway: &Server,
    per_round: u64,
    round: impl AsyncFn(u64, Arc<AtomicU64>) -> Vec<tokio::task::JoinHandle<()>>,
) -> Side {
    let counted = Arc::new(AtomicU64::new(0));
    let mut tasks = round(0, counted.clone()).await;
    wait_for(&counted, 1, Duration::from_secs(60)).await;
    let (before, started) = (gateway.cpu(), Instant::now());
    for r in 1..=ROUNDS {
        wait_for(&counted, r * per_round, Duration::from_secs(300)).await;
        tasks.iter().for_each(|t| t.abort());
        if r < ROUNDS {
            tasks = round(r, counted.clone()).await;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = gateway.cpu().since(&before);
    let total = ROUNDS * per_round;
    Side {
        rate: total as f64 / seconds,
        cpu_us: cpu.total * 1e6 / total as f64,
        cpu,
    }
}

/// One run on a fresh gateway: plain, then a group acking each delivery, then one acking
/// what it received.
async fn run(store: &str) -> [Side; 3] {
    let gateway = Server::gateway_with(store, None);
    bulk_load(&gateway, EVENTS).await;
    let url = gateway.grpc_url();
    let counted = Arc::new(AtomicU64::new(0));
    let warm = subscribe(&url, Some(Start::FromBeginning(true))).await;
    let warm = count_events(warm, counted.clone());
    wait_for(&counted, EVENTS, Duration::from_secs(300)).await;
    warm.abort();
    let plain = drain(&gateway, STREAMS * EVENTS, async |_, counted| {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let stream = subscribe(&url, Some(Start::FromBeginning(true))).await;
            tasks.push(count_events(stream, counted.clone()));
        }
        tasks
    })
    .await;
    let group = async |acks: Acks| {
        drain(&gateway, EVENTS, async |round, counted| {
            let name = format!("bench-{acks:?}-{round}");
            (0..STREAMS)
                .map(|_| tokio::spawn(member(url.clone(), name.clone(), acks, counted.clone())))
                .collect()
        })
        .await
    };
    let each = group(Acks::Each).await;
    let received = group(Acks::Received).await;
    [plain, each, received]
}

/// A consumer group of 4 members acking each delivery, against 4 plain `Subscribe`
/// streams, on the memory and the embedded store, [`runs`] each.
pub async fn section() {
    for store in ["memory", "embedded"] {
        let measured: Vec<[Side; 3]> = {
            let mut all = Vec::new();
            for _ in 0..runs() {
                all.push(run(store).await);
            }
            all
        };
        report(store, &measured);
    }
}

fn report(store: &str, measured: &[[Side; 3]]) {
    let figure = |f: &dyn Fn(&[Side; 3]) -> f64| measured.iter().map(f).collect::<Vec<f64>>();
    let middle = &measured[super::median_index(&figure(&|[p, ..]| p.rate))];
    println!(
        "groups {store:<8} plain Subscribe, {STREAMS} streams from the beginning, {ROUNDS} rounds: {} deliveries/s, gateway CPU {} µs/delivery\n    by thread (median run, µs/delivery): {}",
        spread(&figure(&|[p, ..]| p.rate), 0),
        spread(&figure(&|[p, ..]| p.cpu_us), 2),
        middle[0].cpu.per_thread(ROUNDS * STREAMS * EVENTS),
    );
    for (side, acks) in [(1, Acks::Each), (2, Acks::Received)] {
        let ratios = figure(&|sides| sides[side].rate / sides[0].rate);
        let added = figure(&|sides| sides[side].cpu_us - sides[0].cpu_us);
        let how = match acks {
            Acks::Each => "one Ack per delivery",
            Acks::Received => "one Ack per burst received",
        };
        println!(
            "groups {store:<8} consumer group, {STREAMS} members, {how}: {} acknowledged deliveries/s, gateway CPU {} µs/delivery\n    by thread (median run, µs/delivery): {}",
            spread(&figure(&|sides| sides[side].rate), 0),
            spread(&figure(&|sides| sides[side].cpu_us), 2),
            middle[side].cpu.per_thread(ROUNDS * EVENTS),
        );
        println!(
            "groups {store:<8} group ({how}) / plain: {}x deliveries/s (target >= 0.5x); added gateway CPU {} µs per acknowledged delivery\n",
            spread(&ratios, 2),
            spread(&added, 2),
        );
    }
}
