//! Dead letters end to end over gRPC, on every store: one atomic append per request (a
//! retry stores nothing twice), `ListDeadLetters` and `RedriveDeadLetters`.

mod support;

use serde_json::json;
use spike_gateway::{
    events::{
        Admission,
        time::{from_micros, now_micros},
    },
    proto::{
        DeadLetter, ListDeadLettersRequest, RedriveDeadLettersRequest, RedriveDeadLettersResponse,
        WebhookCategory,
    },
};
use support::{admin::*, *};
use tonic::Code;

/// A body with one good item and one that cannot become an event.
fn mixed_body(user: &str) -> serde_json::Value {
    json!([
        record_change(user, 1),
        {"event_type": "sleep_changed", "application_user_id": user},
    ])
}

async fn list(app: &TestApp, request: ListDeadLettersRequest) -> (Vec<DeadLetter>, u64) {
    let answer = admin(app)
        .await
        .list_dead_letters(authed(request))
        .await
        .unwrap()
        .into_inner();
    (answer.dead_letters, answer.next_after_id)
}

async fn all_letters(app: &TestApp) -> Vec<DeadLetter> {
    let request = ListDeadLettersRequest {
        page_size: 1000,
        include_raw_json: true,
        ..Default::default()
    };
    list(app, request).await.0
}

async fn redrive(app: &TestApp, ids: Vec<u64>, all: bool) -> RedriveDeadLettersResponse {
    admin(app)
        .await
        .redrive_dead_letters(authed(RedriveDeadLettersRequest { ids, all }))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_stores_one_dead_letter_and_one_event() {
    for store in local_stores() {
        a_retried_request_stores_one_dead_letter_and_one_event_on(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn a_retried_request_stores_one_dead_letter_and_one_event_on_nats() {
    a_retried_request_stores_one_dead_letter_and_one_event_on(&nats_store()).await;
}

async fn a_retried_request_stores_one_dead_letter_and_one_event_on(store: &Store) {
    let app = spawn_app_with(&store.flags()).await;
    let first: serde_json::Value = app
        .post_json(MAIN, &mixed_body("retry"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&first["appended"], &first["dead_lettered"]),
        (&json!(1), &json!(1))
    );
    // Spike did not see our 200 and sends the same bytes again.
    let retry: serde_json::Value = app
        .post_json(MAIN, &mixed_body("retry"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(retry["duplicates"], 1, "{}: {retry}", store.name);
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        1,
        "{}",
        store.name
    );
    assert_eq!(app.log.bounds().await.unwrap().next, 2, "{}", store.name);
    let letters = all_letters(&app).await;
    assert_eq!(letters.len(), 1, "{}", store.name);
    assert_eq!(letters[0].application_user_ids, ["retry"], "{}", store.name);
    assert_eq!(letters[0].path_category(), WebhookCategory::Main);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_in_pages_by_user_with_raw_json_only_on_request() {
    for store in local_stores() {
        dead_letters_are_listed_in_pages_by_user_with_raw_json_only_on_request_on(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn dead_letters_are_listed_in_pages_by_user_with_raw_json_only_on_request_on_nats() {
    dead_letters_are_listed_in_pages_by_user_with_raw_json_only_on_request_on(&nats_store()).await;
}

async fn dead_letters_are_listed_in_pages_by_user_with_raw_json_only_on_request_on(store: &Store) {
    let app = spawn_app_with(&store.flags()).await;
    for user in ["ann", "bob", "ann"] {
        let n = app.log.clone().backend().dead_letter_count().await.unwrap();
        let body = json!({"event_type": "sleep_changed", "application_user_id": user, "n": n});
        app.post_json(MAIN, &body).await;
    }
    let (page, next) = list(
        &app,
        ListDeadLettersRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page.len(), 2, "{}", store.name);
    assert!(page[0].id < page[1].id, "{}: ids increase", store.name);
    assert_eq!(next, page[1].id, "{}", store.name);
    assert!(page.iter().all(|l| l.raw_json.is_empty()), "{}", store.name);
    assert!(
        page.iter()
            .all(|l| !l.reason.is_empty() && l.received_at.is_some())
    );
    let (rest, next) = list(
        &app,
        ListDeadLettersRequest {
            page_size: 2,
            after_id: next,
            include_raw_json: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((rest.len(), next), (1, 0), "{}", store.name);
    let raw: serde_json::Value = serde_json::from_slice(&rest[0].raw_json).unwrap();
    assert_eq!(raw["application_user_id"], "ann", "{}", store.name);

    let (anns, next) = list(
        &app,
        ListDeadLettersRequest {
            application_user_id: Some("ann".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((anns.len(), next), (2, 0), "{}", store.name);
    assert!(anns.iter().all(|l| l.application_user_ids == ["ann"]));
}

#[tokio::test]
async fn list_and_redrive_check_their_arguments_and_tokens() {
    let app = spawn_app_with(&["--admin-tokens", ADMIN_TOKEN]).await;
    let mut client = admin(&app).await;
    let too_big = ListDeadLettersRequest {
        page_size: 1001,
        ..Default::default()
    };
    let status = client.list_dead_letters(authed(too_big)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("1000"), "{}", status.message());
    let status = client
        .redrive_dead_letters(authed(RedriveDeadLettersRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Extreme ids are no error: nothing there.
    app.post_json(MAIN, &mixed_body("edge")).await;
    let (letters, next) = list(
        &app,
        ListDeadLettersRequest {
            after_id: u64::MAX,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((letters.len(), next), (0, 0));
    let nothing = redrive(&app, vec![0, u64::MAX], false).await;
    assert_eq!(nothing, RedriveDeadLettersResponse::default());
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        1
    );
    let status = client
        .list_dead_letters(ListDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .redrive_dead_letters(RedriveDeadLettersRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// A letter as an earlier release, which could not read `raw`, stored it.
fn stored_earlier(raw: &serde_json::Value, reason: &str) -> DeadLetter {
    DeadLetter {
        // Recent: retention would remove an old letter while the test runs.
        received_at: Some(from_micros(now_micros())),
        path_category: WebhookCategory::Main as i32,
        reason: reason.into(),
        raw_json: serde_json::to_vec(raw).unwrap(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_appends_what_now_parses_and_keeps_what_does_not() {
    for store in local_stores() {
        redrive_appends_what_now_parses_and_keeps_what_does_not_on(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn redrive_appends_what_now_parses_and_keeps_what_does_not_on_nats() {
    redrive_appends_what_now_parses_and_keeps_what_does_not_on(&nats_store()).await;
}

async fn redrive_appends_what_now_parses_and_keeps_what_does_not_on(store: &Store) {
    let app = spawn_app_with(&store.flags()).await;
    app.post_json(MAIN, &record_change("dup", 1)).await;
    let unknown = json!({"event_type": "sleep_changed", "application_user_id": "u"});
    let letters = vec![
        stored_earlier(&record_change("now-readable", 1), "old code said no"),
        stored_earlier(&record_change("dup", 1), "old code said no"),
        stored_earlier(&unknown, "an older reason"),
        DeadLetter {
            whole_body: true,
            ..stored_earlier(
                &json!([record_change("merged", 1), ["bad", 1], ["bad", 2]]),
                "3 items could not be used; the whole body is kept",
            )
        },
    ];
    let stored = app
        .log
        .admit(Admission {
            dead_letters: letters,
            ..Admission::default()
        })
        .await
        .unwrap();
    let ids: Vec<u64> = all_letters(&app).await.iter().map(|l| l.id).collect();
    assert_eq!(ids.len(), 4, "{}: {stored:?}", store.name);

    let mut live = app.subscribe(after_sequence(1)).await.unwrap();
    let answer = redrive(&app, ids.clone(), false).await;
    assert_eq!(
        (answer.appended, answer.duplicates, answer.still_dead),
        (2, 1, 3),
        "{}",
        store.name
    );
    let users: Vec<String> = take(&mut live, 2)
        .await
        .into_iter()
        .map(|e| e.application_user_id)
        .collect();
    assert_eq!(users, ["now-readable", "merged"], "{}", store.name);

    let left = all_letters(&app).await;
    let raw = |l: &DeadLetter| serde_json::from_slice::<serde_json::Value>(&l.raw_json).unwrap();
    let kept = left
        .iter()
        .find(|l| raw(l) == unknown)
        .expect("the unusable letter stays");
    assert_ne!(
        kept.reason, "an older reason",
        "{}: the current reason",
        store.name
    );
    if store.name != "nats" {
        // On NATS a rewritten letter is republished, so it gets a new id.
        assert_eq!(kept.id, ids[2], "{}: the letter stays", store.name);
    }
    let split: Vec<_> = left.iter().filter(|l| raw(l) != unknown).collect();
    assert_eq!(split.len(), 2, "{}", store.name);
    assert_eq!(raw(split[0]), json!(["bad", 1]), "{}", store.name);
    assert_eq!(raw(split[1]), json!(["bad", 2]), "{}", store.name);
    assert!(
        split[0].id > ids[3],
        "{}: split items are new letters",
        store.name
    );

    // Nothing left to recover: redriving everything changes nothing.
    let again = redrive(&app, vec![], true).await;
    assert_eq!(
        (again.appended, again.duplicates, again.still_dead),
        (0, 0, 3),
        "{}",
        store.name
    );
    assert_eq!(all_letters(&app).await, left, "{}", store.name);
    assert_quiet(&mut live).await;
    // Ids no longer stored are ignored.
    let gone = redrive(&app, vec![ids[0], 9_999], false).await;
    assert_eq!(
        gone,
        RedriveDeadLettersResponse::default(),
        "{}",
        store.name
    );
}

#[tokio::test]
async fn redrive_all_pages_through_more_letters_than_one_batch() {
    let app = spawn_app_with(&["--admin-tokens", ADMIN_TOKEN]).await;
    let letters = (0..250)
        .map(|n| stored_earlier(&record_change("many", n), "old code said no"))
        .collect();
    app.log
        .admit(Admission {
            dead_letters: letters,
            ..Admission::default()
        })
        .await
        .unwrap();
    let answer = redrive(&app, vec![], true).await;
    assert_eq!(
        (answer.appended, answer.duplicates, answer.still_dead),
        (250, 0, 0)
    );
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        0
    );
    assert_eq!(app.log.bounds().await.unwrap().next, 251);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_ids_find_nothing_and_are_no_error() {
    for store in local_stores() {
        extreme_ids_find_nothing_and_are_no_error_on(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn extreme_ids_find_nothing_and_are_no_error_on_nats() {
    extreme_ids_find_nothing_and_are_no_error_on(&nats_store()).await;
}

async fn extreme_ids_find_nothing_and_are_no_error_on(store: &Store) {
    let app = spawn_app_with(&store.flags()).await;
    app.post_json(MAIN, &mixed_body("edge")).await;
    let (letters, next) = list(
        &app,
        ListDeadLettersRequest {
            after_id: u64::MAX,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((letters.len(), next), (0, 0), "{}", store.name);
    let nothing = redrive(&app, vec![0, u64::MAX], false).await;
    assert_eq!(
        nothing,
        RedriveDeadLettersResponse::default(),
        "{}",
        store.name
    );
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        1,
        "{}",
        store.name
    );
}

/// A redrive of all letters reads each stored letter once: one that is still dead, with a
/// new reason, counts once, although NATS republishes a rewritten letter under a new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_all_counts_a_rewritten_letter_once() {
    for store in local_stores() {
        redrive_all_counts_a_rewritten_letter_once_on(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn redrive_all_counts_a_rewritten_letter_once_on_nats() {
    redrive_all_counts_a_rewritten_letter_once_on(&nats_store()).await;
}

async fn redrive_all_counts_a_rewritten_letter_once_on(store: &Store) {
    let app = spawn_app_with(&store.flags()).await;
    let unknown = json!({"event_type": "sleep_changed", "application_user_id": "u"});
    app.log
        .admit(Admission {
            dead_letters: vec![stored_earlier(&unknown, "an older reason")],
            ..Admission::default()
        })
        .await
        .unwrap();
    let answer = redrive(&app, vec![], true).await;
    assert_eq!(
        (answer.appended, answer.duplicates, answer.still_dead),
        (0, 0, 1),
        "{}",
        store.name
    );
    let left = all_letters(&app).await;
    assert_eq!(left.len(), 1, "{}", store.name);
    assert_ne!(left[0].reason, "an older reason", "{}", store.name);
}

/// A page larger than the log reads at a time (letters are read in chunks so that a page
/// without raw JSON never holds a page of request bodies) is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_spanning_several_reads_is_exact() {
    for store in local_stores() {
        let app = spawn_app_with(&store.flags()).await;
        let letters = (0..130)
            .map(|n| stored_earlier(&json!({"event_type": "nope", "n": n}), "unknown"))
            .collect();
        app.log
            .admit(Admission {
                dead_letters: letters,
                ..Admission::default()
            })
            .await
            .unwrap();
        let page_of = |after_id, include_raw_json| ListDeadLettersRequest {
            page_size: 120,
            after_id,
            include_raw_json,
            ..Default::default()
        };
        let (first, next) = list(&app, page_of(0, false)).await;
        assert_eq!(first.len(), 120, "{}", store.name);
        assert!(
            first.windows(2).all(|w| w[0].id < w[1].id),
            "{}",
            store.name
        );
        assert!(
            first.iter().all(|l| l.raw_json.is_empty()),
            "{}",
            store.name
        );
        assert_eq!(next, first[119].id, "{}", store.name);
        let (rest, end) = list(&app, page_of(next, true)).await;
        assert_eq!((rest.len(), end), (10, 0), "{}", store.name);
        assert!(rest[0].id > next, "{}", store.name);
        assert!(
            rest.iter().all(|l| !l.raw_json.is_empty()),
            "{}",
            store.name
        );
    }
}
