//! `Admin/EraseUser`: a user's events leave replay and dedup, their dead letters go (found
//! by the user ids recorded when each was stored); other users' stay. On every store.

mod support;

use std::sync::Arc;

use serde_json::json;
use spike_gateway::{
    events::{
        Admission, EventLog,
        embedded::EmbeddedLog,
        time::{from_micros, now_micros},
    },
    proto::{DeadLetter, EraseUserRequest, WebhookCategory, admin_client::AdminClient},
};
use support::{admin::*, *};
use tonic::{Code, Request};

fn erase(user: &str, token: Option<&str>) -> Request<EraseUserRequest> {
    let mut request = Request::new(EraseUserRequest {
        application_user_id: user.into(),
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

async fn erases_one_user_and_keeps_the_others(store: &Store) {
    let app = spawn_app_with(&store.flags()).await;
    let store = store.name;
    app.post(MAIN, &fixture("main-batch.json")).await; // User1, User2
    app.post(LAB, &fixture("lab-report-completed.json")).await; // end_user_id1
    app.post(NUTRITION, &fixture("nutrition-failed.json")).await; // end_user_id1
    app.post_json(
        MAIN,
        &serde_json::json!({"application_user_id": "end_user_id1", "oops": 1}),
    )
    .await; // a dead letter naming the user

    let mut admin = AdminClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap();
    let erased = admin
        .erase_user(erase("end_user_id1", Some("root-token")))
        .await
        .unwrap()
        .into_inner();
    // Dedup entries: the two events' and the letter's. JetStream keeps its message ids
    // until its duplicate window passes (README, Security).
    let dedup_entries = if store == "nats" { 0 } else { 3 };
    assert_eq!(
        (
            erased.events_removed,
            erased.dedup_entries_removed,
            erased.dead_letters_removed
        ),
        (2, dedup_entries, 1),
        "{store}"
    );
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        0,
        "{store}"
    );

    let mut replay = app.subscribe(from_beginning()).await.unwrap();
    let users: Vec<String> = take(&mut replay, 2)
        .await
        .into_iter()
        .map(|e| e.application_user_id)
        .collect();
    assert_eq!(users, ["User1", "User2"], "{store}");
    assert_quiet(&mut replay).await;

    // The dedup entries went too: Spike redelivering the same report appends it again,
    // while the other users' events are still recognised as duplicates. (On NATS the
    // message id stays in JetStream's window, so the redelivery is still a duplicate.)
    let body: serde_json::Value = app
        .post(LAB, &fixture("lab-report-completed.json"))
        .await
        .json()
        .await
        .unwrap();
    let again = if store == "nats" { 0 } else { 1 };
    assert_eq!(body["appended"], again, "{store}: {body}");
    let body: serde_json::Value = app
        .post(MAIN, &fixture("main-batch.json"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["duplicates"], 2, "{store}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_on_embedded_and_memory() {
    for store in local_stores() {
        erases_one_user_and_keeps_the_others(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn erasure_on_nats() {
    erases_one_user_and_keeps_the_others(&nats_store()).await;
}

/// Dead letters the old reading of user ids missed: a merged letter of more than 100
/// items, an item nested deeper than 32 levels, a numeric user id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_finds_every_dead_letter_naming_the_user() {
    for store in local_stores() {
        erasure_finds_every_dead_letter_naming_the_user_on(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn erasure_finds_every_dead_letter_naming_the_user_on_nats() {
    erasure_finds_every_dead_letter_naming_the_user_on(&nats_store()).await;
}

async fn erasure_finds_every_dead_letter_naming_the_user_on(store: &Store) {
    let mut deep = json!({"application_user_id": "victim"});
    for _ in 0..40 {
        deep = json!({"application_user_id": "victim", "data": [deep]});
    }
    let merged: Vec<_> = (0..150)
        .map(|n| json!({"event_type": "sleep_changed", "application_user_id": "victim", "n": n}))
        .collect();
    let numeric = json!({"event_type": "sleep_changed", "application_user_id": 4242});
    let app = spawn_app_with(&store.flags()).await;
    for body in [&deep, &json!(merged), &numeric] {
        let answer: serde_json::Value = app.post_json(MAIN, body).await.json().await.unwrap();
        assert_eq!(answer["dead_lettered"], 1, "{}: {answer}", store.name);
    }
    let victim = erase_user(&app, "victim").await;
    assert_eq!(victim.dead_letters_removed, 2, "{}", store.name);
    let numbered = erase_user(&app, "4242").await;
    assert_eq!(numbered.dead_letters_removed, 1, "{}", store.name);
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        0,
        "{}",
        store.name
    );
}

/// A letter as the 0.1 release stored it: no user ids recorded.
fn letter_from_0_1(user: &str) -> DeadLetter {
    let raw = json!({"event_type": "sleep_changed", "application_user_id": user});
    DeadLetter {
        received_at: Some(from_micros(now_micros())),
        path_category: WebhookCategory::Main as i32,
        reason: "unknown event_type".into(),
        raw_json: serde_json::to_vec(&raw).unwrap(),
        ..Default::default()
    }
}

async fn store_letters(log: &dyn EventLog, letters: Vec<DeadLetter>) {
    log.admit(Admission {
        dead_letters: letters,
        ..Admission::default()
    })
    .await
    .unwrap();
}

/// At start the gateway records the user ids of letters stored without them, so erasure
/// (which reads no JSON) still finds them.
#[tokio::test]
async fn letters_stored_without_user_ids_are_backfilled_at_start_and_erasable() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    {
        let log = EmbeddedLog::open(dir.path(), HOUR, HOUR).unwrap();
        store_letters(
            &log,
            vec![letter_from_0_1("old-user"), letter_from_0_1("other")],
        )
        .await;
        log.close().await;
    }
    let app = spawn_app_in(dir, &["--admin-tokens", ADMIN_TOKEN]).await;
    let letters = app.log.dead_letters(0, 10, None).await.unwrap();
    let recorded: Vec<_> = letters
        .iter()
        .map(|l| l.application_user_ids.clone())
        .collect();
    assert_eq!(recorded, [["old-user"], ["other"]]);
    let erased = erase_user(&app, "old-user").await;
    assert_eq!(erased.dead_letters_removed, 1);
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn nats_letters_stored_without_user_ids_are_backfilled_and_erasable() {
    let store = nats_store();
    {
        let seeding = spawn_app_with(&store.flags()).await;
        store_letters(seeding.log.as_ref(), vec![letter_from_0_1("old-user")]).await;
    }
    let app = spawn_app_with(&store.flags()).await;
    let letters = app.log.dead_letters(0, 10, Some("old-user")).await.unwrap();
    assert_eq!(letters.len(), 1, "the replica recorded the ids at start");
    let erased = erase_user(&app, "old-user").await;
    assert_eq!(erased.dead_letters_removed, 1);
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        0
    );
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

#[tokio::test]
async fn erasure_needs_an_admin_token() {
    let app = spawn_app_with(&["--admin-tokens", "root-token", "--grpc-tokens", "reader"]).await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    let mut admin = AdminClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap();
    for token in [None, Some("wrong"), Some("reader")] {
        let status = admin.erase_user(erase("User1", token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    assert_eq!(app.log.bounds().await.unwrap().next, 3);
    let status = admin
        .erase_user(erase("", Some("root-token")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Without admin tokens the service is closed, whatever the caller sends.
    let closed = spawn_app().await;
    let mut admin = AdminClient::connect(format!("http://{}", closed.grpc))
        .await
        .unwrap();
    let status = admin
        .erase_user(erase("User1", Some("anything")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("GATEWAY_ADMIN_TOKENS"),
        "{}",
        status.message()
    );
}
