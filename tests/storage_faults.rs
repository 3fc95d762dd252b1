//! Storage faults on the real binary (SPEC §5): a full disk heals by itself, damaged or
//! emptied logs never panic and are refused or reported, and `salvage` recovers what is
//! readable.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use spike_gateway::{
    proto::{Event, event_stream_client::EventStreamClient},
    webhook::signature::sign,
};
use support::{
    KEY, MAIN, from_beginning,
    real_binary::{self, Gateway},
    record_change, wait_until,
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Starts the binary; `Err(its log)` if it exits before listening.
fn start(data_dir: &Path) -> Result<Gateway, String> {
    start_with(data_dir, &[])
}

fn start_with(data_dir: &Path, envs: &[(&str, &str)]) -> Result<Gateway, String> {
    let mut command = real_binary::command(data_dir, KEY);
    command.envs(envs.iter().copied());
    real_binary::start(command)
}

/// SIGTERM and wait for a clean exit (the log is closed cleanly).
fn stop(mut gateway: Gateway) {
    let exit = gateway.terminate(Duration::from_secs(15));
    assert!(exit.success(), "clean exit: {exit:?}");
}

/// Posts one webhook with an event per user; the status, or 0 if no answer.
async fn post_users(client: &reqwest::Client, gateway: &Gateway, users: &[String]) -> u16 {
    let items: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(n, user)| record_change(user, n as u64))
        .collect();
    let body = serde_json::to_vec(&items).unwrap();
    client
        .post(format!("http://{}{MAIN}", gateway.http))
        .header("X-Body-Signature", sign(KEY, &body))
        .body(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

fn users(prefix: &str, range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|n| format!("{prefix}-{n:06}")).collect()
}

/// `/readyz`: status and JSON body.
async fn readyz(client: &reqwest::Client, gateway: &Gateway) -> (u16, serde_json::Value) {
    let response = client
        .get(format!("http://{}/readyz", gateway.http))
        .send()
        .await
        .expect("/readyz answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("/readyz is JSON"))
}

async fn grpc_serving(gateway: &Gateway) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.grpc))
        .unwrap()
        .connect()
        .await
        .expect("gRPC connects");
    let mut client = HealthClient::new(channel);
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

/// Reads the log from the beginning until 1 s of quiet or the stream ends. The error is the
/// status the stream ended with, if any.
async fn read_all(grpc: SocketAddr) -> (Vec<Event>, Option<tonic::Status>) {
    let mut stream = EventStreamClient::connect(format!("http://{grpc}"))
        .await
        .expect("gRPC connects")
        .subscribe(from_beginning())
        .await
        .expect("subscribe starts")
        .into_inner();
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
            Ok(Ok(Some(event))) => events.push(event),
            Ok(Ok(None)) | Err(_) => return (events, None),
            Ok(Err(status)) => return (events, Some(status)),
        }
    }
}

/// A tmpfs mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    for chunk in [1 << 20, 4096, 512] {
        let block = vec![0xa5u8; chunk];
        while file
            .write_all(&block)
            .and_then(|()| file.sync_data())
            .is_ok()
        {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a tmpfs; .ci/test runs it when it runs as root"]
async fn a_full_disk_heals_by_itself_without_losing_or_doubling_an_event() {
    let tmpfs = Tmpfs::mount("20m").unwrap_or_else(|reason| {
        panic!("the disk-full test needs to mount a tmpfs (run as root): {reason}")
    });
    let data = tmpfs.path().join("data");
    let gateway = start(&data).expect("gateway starts");
    let client = reqwest::Client::new();
    let mut acknowledged = BTreeSet::new();
    let mut next = 0u64;
    let mut batch = |size: u64| {
        let batch = users("full", next..next + size);
        next += size;
        batch
    };
    for _ in 0..10 {
        let users = batch(20);
        assert_eq!(post_users(&client, &gateway, &users).await, 200);
        acknowledged.extend(users);
    }

    let filler = tmpfs.path().join("filler");
    fill(&filler);
    // Post until the log runs out of room: every 200 until then is durable.
    let mut refused = false;
    for _ in 0..200 {
        let users = batch(20);
        match post_users(&client, &gateway, &users).await {
            200 => acknowledged.extend(users),
            503 => {
                refused = true;
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused, "a full disk refuses webhooks with 503");
    wait_until(
        Duration::from_secs(5),
        "/readyz reports the write failure",
        async || {
            let (status, body) = readyz(&client, &gateway).await;
            status == 503 && body["reason"] == "storage_write_failing"
        },
    )
    .await;
    wait_until(
        Duration::from_secs(5),
        "gRPC health NOT_SERVING",
        async || grpc_serving(&gateway).await == ServingStatus::NotServing,
    )
    .await;
    // Still full: every webhook is refused, none falsely acknowledged.
    for _ in 0..10 {
        let users = batch(20);
        let status = post_users(&client, &gateway, &users).await;
        assert_eq!(status, 503, "while the disk is full");
        let (ready, _) = readyz(&client, &gateway).await;
        assert_eq!(ready, 503, "/readyz while the disk is full");
        assert_eq!(grpc_serving(&gateway).await, ServingStatus::NotServing);
        // Spread over a second on purpose: the refusal must hold while time passes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    loop {
        let users = batch(20);
        match post_users(&client, &gateway, &users).await {
            200 => {
                acknowledged.extend(users);
                break;
            }
            503 => {}
            other => panic!("unexpected status {other}"),
        }
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "webhooks still refused 10 s after space was freed:\n{}",
            gateway.log.lock().unwrap()
        );
        // The polling interval (a hand loop, not `eventually`, to fail with the log).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = freed.elapsed();
    let (ready, body) = readyz(&client, &gateway).await;
    assert_eq!((ready, &body["reason"]), (200, &serde_json::json!("ready")));
    wait_until(
        Duration::from_secs(2),
        "gRPC health SERVING again",
        async || grpc_serving(&gateway).await == ServingStatus::Serving,
    )
    .await;
    for _ in 0..5 {
        let users = batch(20);
        assert_eq!(post_users(&client, &gateway, &users).await, 200);
        acknowledged.extend(users);
    }
    // The dedup entries of events acknowledged before the fault are intact.
    let first: Vec<String> = acknowledged.iter().take(20).cloned().collect();
    let items: Vec<_> = first
        .iter()
        .map(|user| {
            let n: u64 = user.trim_start_matches("full-").parse().unwrap();
            record_change(user, n % 20)
        })
        .collect();
    let body = serde_json::to_vec(&items).unwrap();
    let again: serde_json::Value = client
        .post(format!("http://{}{MAIN}", gateway.http))
        .header("X-Body-Signature", sign(KEY, &body))
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["duplicates"], 20, "{again}");
    let _ = writeln!(
        std::io::stderr(),
        "disk full: webhooks answered 200 again {recovered:?} after space was freed"
    );

    let (events, end) = read_all(gateway.grpc).await;
    assert!(end.is_none(), "{end:?}");
    let mut seen = BTreeMap::new();
    for event in &events {
        *seen.entry(event.application_user_id.clone()).or_insert(0) += 1;
    }
    for user in &acknowledged {
        assert_eq!(
            seen.get(user),
            Some(&1),
            "{user}: acknowledged once, stored once"
        );
    }
    assert!(seen.values().all(|&n| n == 1), "no event stored twice");
    let sequences: Vec<_> = events.iter().map(|e| e.sequence).collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "sequences increase"
    );
    drop(gateway);
}

/// A log of `batches` × 100 events written by the binary and closed cleanly.
async fn written_log(batches: u64) -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(dir.path()).expect("gateway starts");
    let client = reqwest::Client::new();
    for b in 0..batches {
        let users = users("damage", b * 100..(b + 1) * 100);
        assert_eq!(post_users(&client, &gateway, &users).await, 200);
    }
    stop(gateway);
    (dir, batches * 100)
}

fn log_file(dir: &Path) -> PathBuf {
    dir.join("events.redb")
}

/// Overwrites `len` bytes at `offset` with `f` of the old bytes.
fn damage(path: &Path, offset: u64, len: usize, f: impl Fn(u8) -> u8) {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut bytes = vec![0u8; len];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    let damaged: Vec<u8> = bytes.iter().map(|&b| f(b)).collect();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&damaged).unwrap();
    file.sync_all().unwrap();
}

fn salvage(from: &Path, to: &Path) -> std::process::Output {
    let output = Command::new(env!("CARGO_BIN_EXE_spike-gateway"))
        .env_clear()
        .args(["salvage", "--from"])
        .arg(from)
        .arg("--to")
        .arg(to)
        .output()
        .expect("salvage runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked at"), "{stderr}");
    output
}

/// What a damaged log does at start-up: refuses with the one line, or starts and ends a
/// stream with DATA_LOSS while readiness reports the damage. Returns the sequences a
/// subscriber read before the damage (empty when refused).
async fn refused_or_reported(dir: &Path) -> Vec<u64> {
    match start(dir) {
        Err(stderr) => {
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            let file = log_file(dir);
            assert!(stderr.contains(&file.display().to_string()), "{stderr}");
            assert!(stderr.contains("spike-gateway salvage --from"), "{stderr}");
            assert!(!stderr.contains("panicked at"), "{stderr}");
            let _ = writeln!(std::io::stderr(), "refused at start-up: {}", stderr.trim());
            Vec::new()
        }
        Ok(gateway) => reported(&gateway).await,
    }
}

/// A running gateway on a damaged log: a stream from the beginning ends with DATA_LOSS
/// naming the sequence, and both readiness answers report the damage.
async fn reported(gateway: &Gateway) -> Vec<u64> {
    let (events, end) = read_all(gateway.grpc).await;
    let status = end.expect("the stream ends at the damage");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("at sequence"), "{status:?}");
    assert!(status.message().contains("salvage"), "{status:?}");
    let client = reqwest::Client::new();
    let (ready, body) = readyz(&client, gateway).await;
    assert_eq!(
        (ready, &body["reason"]),
        (503, &serde_json::json!("storage_damaged")),
        "{body}"
    );
    wait_until(
        Duration::from_secs(2),
        "gRPC health NOT_SERVING",
        async || grpc_serving(gateway).await == ServingStatus::NotServing,
    )
    .await;
    let metrics = client
        .get(format!("http://{}/metrics", gateway.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"spike_gateway_readiness{reason="storage_damaged"} 1"#),
        "{metrics}"
    );
    let log = gateway.log.lock().unwrap().clone();
    assert!(!log.contains("panicked at"), "{log}");
    assert!(log.contains("storage_damaged"), "{log}");
    let _ = writeln!(
        std::io::stderr(),
        "reported while serving: {} events, then {}",
        events.len(),
        status.message()
    );
    events.iter().map(|e| e.sequence).collect()
}

/// Salvages `dir` and checks the new log serves exactly what salvage reported: the count
/// and the report.
async fn salvaged(dir: &Path, written: u64) -> (u64, String) {
    let to = tempfile::tempdir().unwrap();
    let target = to.path().join("salvaged");
    let output = salvage(dir, &target);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let count: u64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count: {stdout}"));
    assert!(count > 0 && count <= written, "{stdout}");
    let gateway = start(&target).expect("the salvaged log starts");
    let (events, end) = read_all(gateway.grpc).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(events.len() as u64, count, "{stdout}");
    for event in &events {
        // Original sequences: event n of the written log is user damage-(n-1).
        assert_eq!(
            event.application_user_id,
            format!("damage-{:06}", event.sequence - 1)
        );
    }
    // Dedup survived: re-posting a salvaged event is a duplicate.
    let first = events.first().unwrap().application_user_id.clone();
    let n = first.trim_start_matches("damage-").parse::<u64>().unwrap() % 100;
    let body = serde_json::to_vec(&[record_change(&first, n)]).unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}{MAIN}", gateway.http))
        .header("X-Body-Signature", sign(KEY, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let accepted: serde_json::Value = response.json().await.unwrap();
    assert_eq!(accepted["duplicates"], 1, "{accepted}");
    let _ = writeln!(std::io::stderr(), "salvage: {}", stdout.trim());
    (count, stdout.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_block_mid_file_is_refused_or_reported_and_salvaged() {
    let (dir, written) = written_log(40).await;
    let file = log_file(dir.path());
    let len = std::fs::metadata(&file).unwrap().len();
    damage(&file, (len / 2) & !4095, 16 * 1024, |_| 0);
    let read = refused_or_reported(dir.path()).await;
    assert!((read.len() as u64) < written);
    let (count, report) = salvaged(dir.path(), written).await;
    assert!(count < written, "{report}");
    assert!(
        report.contains("unreadable (not copied):\n  sequences "),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flipped_near_the_tail_are_refused_or_reported_and_salvaged() {
    let (dir, written) = written_log(40).await;
    let file = log_file(dir.path());
    // The newest event stored, wherever the allocator put it: a fixed offset from the end
    // may land on a free page, which no read ever meets.
    let bytes = std::fs::read(&file).unwrap();
    let newest = format!("damage-{:06}", written - 1);
    let at = bytes
        .windows(newest.len())
        .rposition(|w| w == newest.as_bytes())
        .expect("the newest event is in the file") as u64;
    damage(&file, at.saturating_sub(32), 64, |b| !b);
    let read = refused_or_reported(dir.path()).await;
    assert!((read.len() as u64) < written);
    salvaged(dir.path(), written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_or_missing_log_file_is_refused_not_started_empty() {
    let (dir, _) = written_log(1).await;
    assert!(
        dir.path().join("event-log.id").exists(),
        "the marker is written"
    );
    let file = log_file(dir.path());
    std::fs::File::create(&file).unwrap(); // truncates to 0 bytes
    let stderr = start(dir.path())
        .err()
        .expect("an empty log file is refused");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{} is empty", file.display())),
        "{stderr}"
    );
    std::fs::remove_file(&file).unwrap();
    let stderr = start(dir.path())
        .err()
        .expect("a missing log file is refused");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{} is missing", file.display())),
        "{stderr}"
    );
    // Salvage has nothing to read and says so in one line.
    let output = salvage(dir.path(), &dir.path().join("new"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_from_before_markers_gets_one_on_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy-0.1-data");
    std::fs::copy(fixture.join("events.redb"), log_file(dir.path())).unwrap();
    let gateway = start(dir.path()).expect("a 0.1 data directory starts");
    let (events, end) = read_all(gateway.grpc).await;
    assert!(end.is_none() && !events.is_empty(), "{end:?}");
    stop(gateway);
    assert!(dir.path().join("event-log.id").exists());
    std::fs::File::create(log_file(dir.path())).unwrap();
    assert!(start(dir.path()).is_err(), "emptied after marking: refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_met_while_serving_ends_streams_with_data_loss_and_turns_readiness_off() {
    let (dir, written) = written_log(40).await;
    let file = log_file(dir.path());
    // Garble event 2001 (user damage-002000) inside its page: the page is sound, so the
    // open does not notice (and without the start-up check nothing verifies checksums),
    // but the stored event no longer decodes.
    let bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(13)
        .position(|w| w == b"damage-002000")
        .expect("the event is in the file") as u64;
    damage(&file, at - 2, 24, |_| 0xff);
    // Without the start-up check the damage is found by the first read that meets it.
    let gateway = start_with(dir.path(), &[("GATEWAY_LOG_CHECK_ON_START", "false")])
        .expect("starts without the check");
    let read = reported(&gateway).await;
    assert!(written > 2000);
    assert_eq!(
        read,
        (1..=2000).collect::<Vec<_>>(),
        "every event before the damage"
    );
    // Stopped cleanly, the file is salvaged without being written: all but event 2001.
    stop(gateway);
    let (count, report) = salvaged(dir.path(), written).await;
    assert_eq!(count, written - 1, "{report}");
    assert!(
        report.contains("sequences 2001 (undecodable value)"),
        "{report}"
    );
}

#[tokio::test]
async fn readyz_and_grpc_health_agree_on_the_memory_store_too() {
    use support::spawn_app_with;
    let mut app = spawn_app_with(&["--store", "memory"]).await;
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"ready": true, "reason": "ready"}));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "spike.gateway.v1.EventStream", "spike.gateway.v1.Admin"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    // A closed log is not ready: both say so, with the reason.
    app.log.close().await;
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["reason"], "closed", "{body}");
    wait_until(
        Duration::from_secs(2),
        "gRPC health NOT_SERVING once the log is closed",
        async || {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            let status = health.check(request).await.unwrap().into_inner().status();
            status == ServingStatus::NotServing
        },
    )
    .await;
    app.stop().await;
}
