//! Upgrading from 0.1: redeliveries of what 0.1 stored stay duplicates for the rest of
//! their window. Embedded: the real binary on a data directory 0.1 wrote
//! (tests/fixtures/legacy-0.1-data). NATS: a real nats-server with a stream seeded the way
//! 0.1 published (msg ids of the old rule, no id-rule header).

mod support;

use std::time::Duration;

use spike_gateway::{
    events::{
        Admission, AppendOutcome, CommittedEvent, EventLog, NewEvent,
        embedded::EmbeddedLog,
        nats::{NatsLog, NatsSettings, subject_token},
    },
    proto::{
        EraseUserRequest, Event, EventType, ListDeadLettersRequest, admin_client::AdminClient,
    },
    wire::sign,
};
use support::{
    SAMPLES,
    admin::*,
    fixture, nats,
    real_binary::{self, Gateway},
};

/// The key the fixture's webhooks were signed with (its README).
const LEGACY_KEY: &str = "legacy-key";
/// Long enough to keep the fixture's entries (written on 2026-12-01) live.
const LONG: &str = "3650d";

/// The real binary on a copy of the 0.1 data directory (never the fixture in place), with
/// the directory it runs on.
fn start_on_legacy_copy() -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/legacy-0.1-data/events.redb"
    );
    std::fs::copy(fixture, dir.path().join("events.redb")).unwrap();
    let mut command = real_binary::command(dir.path(), LEGACY_KEY);
    command
        .env("GATEWAY_DEDUP_WINDOW", LONG)
        .env("GATEWAY_RETENTION", LONG)
        .env("GATEWAY_ADMIN_TOKENS", ADMIN_TOKEN);
    let gateway = real_binary::start(command)
        .unwrap_or_else(|log| panic!("the gateway starts on the 0.1 data directory:\n{log}"));
    (gateway, dir)
}

async fn post(gateway: &Gateway, path: &str, body: &[u8]) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("http://{}{path}", gateway.http))
        .header("x-body-signature", sign(LEGACY_KEY, body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_on_a_0_1_data_directory_appends_no_redelivery() {
    let (gateway, _dir) = start_on_legacy_copy();
    for (name, path) in SAMPLES {
        let answer = post(&gateway, path, &fixture(name)).await;
        assert_eq!(answer["appended"], 0, "{name}: {answer}");
        assert!(
            answer["duplicates"].as_u64().unwrap() >= 1,
            "{name}: {answer}"
        );
    }
    // The 0.1 dead letter, posted again, is not stored twice.
    let letter = br#"{"event_type":"sleep_changed","application_user_id":4242,"timestamp":"2025-04-15T13:33:55Z"}"#;
    let answer = post(&gateway, "/webhooks/spike", letter).await;
    assert_eq!(answer["dead_lettered"], 1, "{answer}");
    let mut admin = AdminClient::connect(format!("http://{}", gateway.grpc))
        .await
        .unwrap();
    let listed = admin
        .list_dead_letters(authed(ListDeadLettersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.dead_letters.len(),
        1,
        "still the one letter 0.1 stored"
    );
    assert_eq!(listed.dead_letters[0].id, 1);
    let new_item = serde_json::to_vec(&support::record_change("after-upgrade", 1)).unwrap();
    let answer = post(&gateway, "/webhooks/spike", &new_item).await;
    assert_eq!(answer["appended"], 1, "{answer}");
}

/// Webhooks skip deriving 0.1 ids unless the log may still match them: an upgraded store
/// within its dedup window, never a store this release created.
#[tokio::test]
async fn only_an_upgraded_store_within_its_window_wants_legacy_ids() {
    let window = Duration::from_secs(3650 * 24 * 3600);
    let fresh = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(fresh.path(), window, window).unwrap();
    assert!(!log.wants_legacy_ids(), "a new store");
    log.close().await;
    drop(log);
    let reopened = EmbeddedLog::open(fresh.path(), window, window).unwrap();
    assert!(!reopened.wants_legacy_ids(), "a new store, reopened");
    reopened.close().await;

    let upgraded = tempfile::tempdir().unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/legacy-0.1-data/events.redb"
    );
    std::fs::copy(fixture, upgraded.path().join("events.redb")).unwrap();
    let log = EmbeddedLog::open(upgraded.path(), window, window).unwrap();
    assert!(log.wants_legacy_ids(), "0.1's store, inside the window");
    log.close().await;
    drop(log);
    // The window counts from the first start of this release on it: 1 µs has passed.
    let log = EmbeddedLog::open(upgraded.path(), Duration::from_micros(1), window).unwrap();
    assert!(!log.wants_legacy_ids(), "0.1's store, its window passed");
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_0_1_dead_letter_is_backfilled_and_erasable_by_its_numeric_user_id() {
    let (gateway, _dir) = start_on_legacy_copy();
    let mut admin = AdminClient::connect(format!("http://{}", gateway.grpc))
        .await
        .unwrap();
    let listed = admin
        .list_dead_letters(authed(ListDeadLettersRequest {
            application_user_id: Some("4242".into()),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.dead_letters.len(), 1);
    let erased = admin
        .erase_user(authed(EraseUserRequest {
            application_user_id: "4242".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.dead_letters_removed, 1);
}

fn settings(url: &str, stream: &(String, String)) -> NatsSettings {
    NatsSettings {
        url: url.to_owned(),
        stream: stream.0.clone(),
        subject_prefix: stream.1.clone(),
        dedup_window: Duration::from_secs(3600),
        retention: Duration::from_secs(3600),
    }
}

fn event(id: &str) -> Event {
    Event {
        event_id: id.into(),
        r#type: EventType::RecordChange as i32,
        application_user_id: "user.1".into(),
        ..Default::default()
    }
}

/// Publishes events as 0.1 did: `Nats-Msg-Id` = its id, no id-rule header.
async fn publish_as_0_1(url: &str, prefix: &str, ids: &[&str]) {
    let jetstream = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    for id in ids {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", *id);
        let subject = format!("{prefix}.event.record_change.{}", subject_token("user.1"));
        let payload = CommittedEvent::new(event(id)).encoded(true);
        jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

async fn redeliver(log: &NatsLog, id: &str, legacy: &str) -> AppendOutcome {
    let admission = Admission {
        events: vec![NewEvent {
            event: event(id),
            legacy_event_id: Some(legacy.into()),
        }],
        ..Admission::default()
    };
    log.admit(admission).await.unwrap().events[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn a_nats_stream_seeded_by_0_1_keeps_its_ids_as_duplicates() {
    let (url, _server) = nats::url_or_start();
    let stream = nats::unique_stream();
    // The streams exist (as 0.1 created them), then 0.1 publishes two events.
    let fresh = NatsLog::connect(settings(&url, &stream)).await.unwrap();
    assert!(
        !fresh.wants_legacy_ids(),
        "a stream without 0.1 messages needs no legacy ids"
    );
    fresh.close().await;
    publish_as_0_1(&url, &stream.1, &["old-a", "old-b"]).await;

    // The upgraded replica starts: redeliveries (new-rule ids) are duplicates by their
    // legacy ids; an item 0.1 never stored is appended.
    let log = NatsLog::connect(settings(&url, &stream)).await.unwrap();
    assert!(
        log.wants_legacy_ids(),
        "0.1 messages in the window: webhooks must carry legacy ids"
    );
    assert_eq!(
        redeliver(&log, "new-a", "old-a").await,
        AppendOutcome::Duplicate { sequence: 1 }
    );
    assert_eq!(
        redeliver(&log, "new-c", "old-c").await,
        AppendOutcome::Appended { sequence: 3 }
    );
    // Dedup by the new id as ever.
    assert_eq!(
        redeliver(&log, "new-c", "old-c").await,
        AppendOutcome::Duplicate { sequence: 3 }
    );

    // A replica started later, with new-rule messages after the old ones, still knows
    // the old ids; a new-rule id is not taken for a legacy one.
    let later = NatsLog::connect(settings(&url, &stream)).await.unwrap();
    assert_eq!(
        redeliver(&later, "new-b", "old-b").await,
        AppendOutcome::Duplicate { sequence: 2 }
    );
    assert_eq!(
        redeliver(&later, "new-d", "new-c").await,
        AppendOutcome::Appended { sequence: 4 }
    );
    assert_eq!(later.bounds().await.unwrap().next, 5);
}
