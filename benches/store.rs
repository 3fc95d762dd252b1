//! The embedded store alone, without HTTP or gRPC: single appends one after another (the
//! latency of one durable commit as the log grows), bulk appends in batches of 1,000,
//! catch-up reads from the beginning, and the restarts that follow: clean (the dedup index
//! from the checkpoint saved at close) and after a crash (rebuilt from the log); then the
//! checkpoint alone for an index built in memory (CHECKPOINT_ENTRIES, default 10 M).
//! `cargo bench --bench store` (STORE_EVENTS sets the log size, default 1,000,000). Other
//! work on the machine moves these figures; compare runs made back to back.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use spike_gateway::{
    events::{
        EventLog, LocalLog,
        embedded::{CHECKPOINT_FILE as CHECKPOINT, EmbeddedLog, measure_checkpoint},
        subscription::PageLimit,
    },
    proto::Event,
};

const BATCH: u64 = 1000;
/// Batches in flight at once, as from eight webhook connections.
const IN_FLIGHT: usize = 8;
const WINDOW: Duration = Duration::from_secs(72 * 3600);
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// About the size of a typical stored event (~560 bytes with its raw JSON).
fn event(n: u64) -> Event {
    let bits = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    Event {
        event_id: format!("main-{bits:032x}"),
        application_user_id: format!("user-{}", n % 1000),
        raw_json: vec![b'x'; 500].into(),
        ..Event::default()
    }
}

async fn bulk(log: &Arc<EmbeddedLog>, total: u64) -> f64 {
    let started = Instant::now();
    let mut appends = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < total || !appends.is_empty() {
        while appends.len() < IN_FLIGHT && next < total {
            let events: Vec<Event> = (next..next + BATCH).map(event).collect();
            let log = log.clone();
            appends.spawn(async move { log.append(events).await.expect("append") });
            next += BATCH;
        }
        appends
            .join_next()
            .await
            .expect("one in flight")
            .expect("append task");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// One event per append, each awaited: every append is one commit and one fdatasync, on
/// a file that grows as it goes (as under a trickle of webhooks). Numbered after the bulk
/// events so that none is a duplicate.
async fn single_commits(log: &EmbeddedLog, total: u64) {
    const COMMITS: u64 = 3000;
    let mut took = Vec::with_capacity(COMMITS as usize);
    for n in 0..COMMITS {
        let started = Instant::now();
        log.append(vec![event(total + n)]).await.expect("append");
        took.push(started.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "store single appends, one commit each ({COMMITS}): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

async fn replay(log: &EmbeddedLog, total: u64) -> f64 {
    let started = Instant::now();
    let (mut from, mut read) = (1, 0u64);
    while read < total {
        let page = log
            .read_page(from, PageLimit::default())
            .await
            .expect("read");
        let last = page.last().expect("events remain").sequence();
        read += page.len() as u64;
        from = last + 1;
    }
    total as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let total: u64 = std::env::var("STORE_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(EmbeddedLog::open(dir.path(), WINDOW, RETENTION).expect("open"));
    single_commits(&log, total).await;
    let rate = bulk(&log, total).await;
    println!("store bulk append of {total} events in batches of {BATCH}: {rate:.0} events/s");
    let rate = replay(&log, total).await;
    println!("store replay of {total} events by read_page: {rate:.0} events/s");
    let started = Instant::now();
    log.close().await;
    let closed = started.elapsed();
    drop(log);
    println!(
        "store clean close (saves the dedup checkpoint): {:.2} s",
        closed.as_secs_f64()
    );
    let clean = restart(dir.path(), total, "clean, from the checkpoint").await;
    assert!(
        !dir.path().join(CHECKPOINT).exists(),
        "open removes the checkpoint it read"
    );
    clean.close().await;
    drop(clean);
    std::fs::remove_file(dir.path().join(CHECKPOINT)).expect("close saved a checkpoint");
    restart(dir.path(), total, "after a crash, rebuilt from the log")
        .await
        .close()
        .await;
    gate_alone();
}

/// Reopens the log and checks the index knows an event from before.
async fn restart(dir: &std::path::Path, total: u64, how: &str) -> EmbeddedLog {
    let started = Instant::now();
    let log = EmbeddedLog::open_with(dir, WINDOW, RETENTION, false).expect("reopen");
    let took = started.elapsed();
    println!(
        "store restart with {total} events in the dedup window ({how}; no page check): {:.2} s, {:.2} s per 10 M",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e7 / total as f64
    );
    let duplicate = log.append(vec![event(total / 2)]).await.expect("append");
    assert!(
        matches!(
            duplicate[0],
            spike_gateway::events::AppendOutcome::Duplicate { .. }
        ),
        "the index knows every event"
    );
    log
}

/// The checkpoint alone for a dedup index of CHECKPOINT_ENTRIES (default 10 M) built in
/// memory: a log that large takes long to fill here.
fn gate_alone() {
    let entries: u64 = std::env::var("CHECKPOINT_ENTRIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let m = measure_checkpoint(dir.path(), entries).expect("checkpoint");
    println!(
        "dedup checkpoint of {entries} entries built in memory: build {:.2} s, save {:.2} s, load {:.2} s ({:.0} MB)",
        m.build.as_secs_f64(),
        m.save.as_secs_f64(),
        m.load.as_secs_f64(),
        m.bytes as f64 / 1e6
    );
}
