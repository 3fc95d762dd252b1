//! The `EventLog` contract, against the embedded (redb) and memory backends.

use std::{sync::Arc, time::Duration};

use spike_gateway::{
    events::{
        Admission, Admitted, AppendOutcome, EventLog, LocalLog, LogError, NewEvent,
        embedded::EmbeddedLog,
        memory::MemoryLog,
        time::{from_micros, now_micros, to_micros},
    },
    proto::{DeadLetter, Event, EventType, WebhookCategory},
};

const HOUR: Duration = Duration::from_secs(3600);

fn event(id: &str) -> Event {
    Event {
        event_id: id.into(),
        r#type: EventType::RecordChange as i32,
        application_user_id: "u".into(),
        ..Default::default()
    }
}

fn events(ids: &[&str]) -> Vec<Event> {
    ids.iter().map(|id| event(id)).collect()
}

/// Both backends, each with the given dedup window and retention.
fn backends(
    dedup: Duration,
    retention: Duration,
) -> Vec<(&'static str, Arc<dyn LocalLog>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedLog::open(dir.path(), dedup, retention).unwrap();
    vec![
        ("embedded", Arc::new(embedded), Some(dir)),
        (
            "memory",
            Arc::new(MemoryLog::new(1000, dedup, retention)),
            None,
        ),
    ]
}

fn sequences(outcomes: &[AppendOutcome]) -> Vec<u64> {
    outcomes
        .iter()
        .map(|o| match o {
            AppendOutcome::Appended { sequence } | AppendOutcome::Duplicate { sequence } => {
                *sequence
            }
        })
        .collect()
}

#[tokio::test]
async fn sequences_are_contiguous_and_duplicates_point_at_the_original() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        let first = log.append(events(&["a", "b", "a"])).await.unwrap();
        assert_eq!(
            first,
            [
                AppendOutcome::Appended { sequence: 1 },
                AppendOutcome::Appended { sequence: 2 },
                AppendOutcome::Duplicate { sequence: 1 },
            ],
            "{name}"
        );
        let second = log.append(events(&["c", "b"])).await.unwrap();
        assert_eq!(
            second,
            [
                AppendOutcome::Appended { sequence: 3 },
                AppendOutcome::Duplicate { sequence: 2 }
            ],
            "{name}"
        );
        let stored: Vec<_> = log
            .read(1, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.event().event_id.clone())
            .collect();
        assert_eq!(stored, ["a", "b", "c"], "{name}");
        let bounds = log.bounds().await.unwrap();
        assert_eq!(
            (bounds.oldest, bounds.next, bounds.trimmed_through),
            (1, 4, None),
            "{name}"
        );
    }
}

#[tokio::test]
async fn reads_honour_position_and_limit() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        let ids: Vec<String> = (0..10).map(|n| format!("e{n}")).collect();
        log.append(ids.iter().map(|id| event(id)).collect())
            .await
            .unwrap();
        let page: Vec<u64> = log
            .read(4, 3)
            .await
            .unwrap()
            .iter()
            .map(|e| e.sequence())
            .collect();
        assert_eq!(page, [4, 5, 6], "{name}");
        assert!(log.read(11, 5).await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn received_at_never_decreases_and_position_at_finds_the_first_at_or_after() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        let now = now_micros();
        // Received out of order: the log clamps so received_at never goes back.
        let mut stamped = events(&["t1", "t2", "t3"]);
        stamped[0].received_at = Some(from_micros(now - 3_000));
        stamped[1].received_at = Some(from_micros(now - 5_000));
        stamped[2].received_at = Some(from_micros(now - 1_000));
        log.append(stamped).await.unwrap();
        let times: Vec<i64> = log
            .read(1, 3)
            .await
            .unwrap()
            .iter()
            .map(|e| to_micros(e.event().received_at.as_ref().unwrap()))
            .collect();
        assert_eq!(times, [now - 3_000, now - 3_000, now - 1_000], "{name}");
        assert_eq!(log.position_at(now - 10_000).await.unwrap(), 1, "{name}");
        assert_eq!(log.position_at(now - 2_000).await.unwrap(), 3, "{name}");
        assert_eq!(
            log.position_at(now).await.unwrap(),
            4,
            "{name}: after the last = next"
        );
    }
}

#[tokio::test]
async fn live_receivers_get_events_in_order_once_readable() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        let mut live = log.live();
        log.append(events(&["x", "y"])).await.unwrap();
        for expected in [1, 2] {
            let event = tokio::time::timeout(Duration::from_secs(5), live.recv())
                .await
                .unwrap_or_else(|_| panic!("{name}: event {expected} live within 5 s"))
                .unwrap();
            assert_eq!(event.sequence(), expected, "{name}");
            let stored = log.read(event.sequence(), 1).await.unwrap();
            assert_eq!(
                stored[0].event().event_id,
                event.event().event_id,
                "{name}: readable before published"
            );
        }
    }
}

#[tokio::test]
async fn retention_removes_old_events_and_records_how_far() {
    for (name, log, _dir) in backends(HOUR, Duration::from_millis(300)) {
        log.append(events(&["old-1", "old-2"])).await.unwrap();
        // The 300 ms retention must really pass for the old events to age out.
        tokio::time::sleep(Duration::from_millis(400)).await;
        log.append(events(&["new"])).await.unwrap();
        log.housekeeping().await.unwrap();
        let bounds = log.bounds().await.unwrap();
        assert_eq!((bounds.oldest, bounds.next), (3, 4), "{name}");
        assert!(bounds.trimmed_through.is_some(), "{name}");
        let left: Vec<_> = log
            .read(1, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.event().event_id.clone())
            .collect();
        assert_eq!(left, ["new"], "{name}");
    }
}

#[tokio::test]
async fn an_event_id_may_return_after_the_dedup_window() {
    for (name, log, _dir) in backends(Duration::from_millis(300), HOUR) {
        log.append(events(&["again"])).await.unwrap();
        assert_eq!(
            log.append(events(&["again"])).await.unwrap(),
            [AppendOutcome::Duplicate { sequence: 1 }],
            "{name}"
        );
        // The 300 ms dedup window must really pass for the id to be accepted again.
        tokio::time::sleep(Duration::from_millis(400)).await;
        log.housekeeping().await.unwrap();
        assert_eq!(
            log.append(events(&["again"])).await.unwrap(),
            [AppendOutcome::Appended { sequence: 2 }],
            "{name}"
        );
    }
}

fn letter(raw: &str, users: &[&str]) -> DeadLetter {
    DeadLetter {
        reason: "cannot classify".into(),
        path_category: WebhookCategory::Main as i32,
        raw_json: raw.as_bytes().to_vec(),
        application_user_ids: users.iter().map(|u| u.to_string()).collect(),
        ..Default::default()
    }
}

fn request(ids: &[&str], letters: &[DeadLetter]) -> Admission {
    Admission {
        events: events(ids).into_iter().map(NewEvent::from).collect(),
        dead_letters: letters.to_vec(),
        ..Admission::default()
    }
}

#[tokio::test]
async fn a_retried_request_stores_neither_its_events_nor_its_dead_letters_twice() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        let first = log
            .admit(request(&["e"], &[letter("{\"x\":1}", &["u"])]))
            .await
            .unwrap();
        assert_eq!(
            first,
            Admitted {
                events: vec![AppendOutcome::Appended { sequence: 1 }],
                dead_letters: vec![AppendOutcome::Appended { sequence: 1 }],
            },
            "{name}"
        );
        let retry = log
            .admit(request(&["e"], &[letter("{\"x\":1}", &["u"])]))
            .await
            .unwrap();
        assert_eq!(
            retry,
            Admitted {
                events: vec![AppendOutcome::Duplicate { sequence: 1 }],
                dead_letters: vec![AppendOutcome::Duplicate { sequence: 1 }],
            },
            "{name}"
        );
        // The same bytes on another path are another letter.
        let mut other_path = letter("{\"x\":1}", &["u"]);
        other_path.path_category = WebhookCategory::LabReports as i32;
        let other = log.admit(request(&[], &[other_path])).await.unwrap();
        assert_eq!(
            other.dead_letters,
            [AppendOutcome::Appended { sequence: 2 }],
            "{name}"
        );
        assert_eq!(log.dead_letter_count().await.unwrap(), 2, "{name}");
        assert_eq!(log.bounds().await.unwrap().next, 2, "{name}: one event");
    }
}

#[tokio::test]
async fn dead_letter_dedup_expires_with_the_window() {
    for (name, log, _dir) in backends(Duration::from_millis(1), HOUR) {
        log.admit(request(&[], &[letter("[1]", &[])]))
            .await
            .unwrap();
        // The 1 ms dedup window must really pass for the letter to count as new.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let again = log
            .admit(request(&[], &[letter("[1]", &[])]))
            .await
            .unwrap();
        assert_eq!(
            again.dead_letters,
            [AppendOutcome::Appended { sequence: 2 }],
            "{name}"
        );
    }
}

#[tokio::test]
async fn dead_letters_are_listed_by_id_and_user_and_rewritten_or_resolved_atomically() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        let letters = [
            letter("[1]", &["ann"]),
            letter("[2]", &["bob"]),
            letter("[3]", &["ann", "bob"]),
        ];
        log.admit(request(&[], &letters)).await.unwrap();
        let ids = |letters: Vec<DeadLetter>| letters.iter().map(|l| l.id).collect::<Vec<_>>();
        assert_eq!(
            ids(log.dead_letters(0, 10, None).await.unwrap()),
            [1, 2, 3],
            "{name}"
        );
        assert_eq!(
            ids(log.dead_letters(1, 1, None).await.unwrap()),
            [2],
            "{name}"
        );
        assert_eq!(
            ids(log.dead_letters(0, 10, Some("ann")).await.unwrap()),
            [1, 3],
            "{name}"
        );
        assert_eq!(
            ids(log.dead_letters(1, 10, Some("bob")).await.unwrap()),
            [2, 3],
            "{name}"
        );
        assert!(
            log.dead_letters(0, 10, Some("eve"))
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );

        // A redrive's commit: an event, letter 1 resolved, letter 2 rewritten in place.
        let mut rewritten = log.dead_letters(1, 1, None).await.unwrap().remove(0);
        rewritten.reason = "still unknown".into();
        let admitted = log
            .admit(Admission {
                events: vec![NewEvent::from(event("from-letter-1"))],
                updated: vec![rewritten.clone()],
                resolved: vec![1, 99],
                ..Admission::default()
            })
            .await
            .unwrap();
        assert_eq!(
            admitted.events,
            [AppendOutcome::Appended { sequence: 1 }],
            "{name}"
        );
        let left = log.dead_letters(0, 10, None).await.unwrap();
        assert_eq!(
            left,
            [
                rewritten,
                log.dead_letters(2, 1, None).await.unwrap()[0].clone()
            ],
            "{name}"
        );
        assert_eq!(left[1].id, 3, "{name}");
        assert_eq!(log.dead_letter_count().await.unwrap(), 2, "{name}");
    }
}

#[tokio::test]
async fn erasure_removes_the_letters_naming_the_user_by_recorded_ids() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        // The JSON names nobody readable: only the recorded ids say whose it is.
        let theirs = letter("{\"deep\":[[[[\"x\"]]]]}", &["4242", "other"]);
        log.admit(request(&[], &[theirs.clone(), letter("[0]", &["keep"])]))
            .await
            .unwrap();
        let erased = log.erase_user("4242").await.unwrap();
        assert_eq!(
            (erased.dead_letters, erased.dedup_entries),
            (1, 1),
            "{name}"
        );
        let left = log.dead_letters(0, 10, None).await.unwrap();
        assert_eq!(left.len(), 1, "{name}");
        assert_eq!(left[0].application_user_ids, ["keep"], "{name}");
        // Its dedup entry went too: the same bytes again are stored anew.
        let again = log.admit(request(&[], &[theirs])).await.unwrap();
        assert_eq!(
            again.dead_letters,
            [AppendOutcome::Appended { sequence: 3 }],
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_closed_log_refuses_writes() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        log.append(events(&["before"])).await.unwrap();
        log.close().await;
        assert!(
            matches!(log.append(events(&["after"])).await, Err(LogError::Closed)),
            "{name}"
        );
        assert!(!log.is_ready(), "{name}");
    }
}

#[tokio::test]
async fn the_embedded_log_keeps_events_sequence_and_dedup_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path(), HOUR, HOUR).unwrap();
        log.append(events(&["p1", "p2"])).await.unwrap();
        log.close().await;
    }
    let log = EmbeddedLog::open(dir.path(), HOUR, HOUR).unwrap();
    assert_eq!(log.read(1, 10).await.unwrap().len(), 2);
    assert_eq!(
        log.append(events(&["p2", "p3"])).await.unwrap(),
        [
            AppendOutcome::Duplicate { sequence: 2 },
            AppendOutcome::Appended { sequence: 3 }
        ]
    );
}

/// Retention shorter than the dedup window: an event it removed is no longer in the log,
/// so its id must come from the store's own record of removed ids, across a restart too.
#[tokio::test]
async fn an_id_retention_removed_stays_a_duplicate_inside_the_window() {
    for (name, log, dir) in backends(HOUR, Duration::from_millis(300)) {
        log.append(events(&["trimmed"])).await.unwrap();
        // The 300 ms retention must really pass for the event to age out.
        tokio::time::sleep(Duration::from_millis(400)).await;
        log.append(events(&["kept"])).await.unwrap();
        log.housekeeping().await.unwrap();
        assert_eq!(log.bounds().await.unwrap().oldest, 2, "{name}: trimmed");
        let again = log.append(events(&["trimmed"])).await.unwrap();
        assert_eq!(again, [AppendOutcome::Duplicate { sequence: 1 }], "{name}");
        let Some(dir) = dir else { continue };
        log.close().await;
        drop(log);
        let log = EmbeddedLog::open(dir.path(), HOUR, Duration::from_millis(300)).unwrap();
        let outcomes = log
            .append(events(&["trimmed", "kept", "fresh"]))
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            [
                AppendOutcome::Duplicate { sequence: 1 },
                AppendOutcome::Duplicate { sequence: 2 },
                AppendOutcome::Appended { sequence: 3 },
            ],
            "{name} after a restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), HOUR, HOUR).unwrap());
    let appends: Vec<_> = (0..200)
        .map(|n| {
            let log = log.clone();
            tokio::spawn(async move { log.append(vec![event(&format!("burst-{n}"))]).await })
        })
        .collect();
    let mut assigned = Vec::new();
    for append in appends {
        assigned.extend(sequences(&append.await.unwrap().unwrap()));
    }
    assigned.sort_unstable();
    assert_eq!(assigned, (1..=200).collect::<Vec<_>>());
    let commits = log.commits();
    println!("200 concurrent appends took {commits} commits");
    assert!(
        commits < 200,
        "group commit: {commits} commits for 200 appends"
    );
}

#[tokio::test]
async fn the_memory_log_is_bounded() {
    let log = MemoryLog::new(3, HOUR, HOUR);
    log.append(events(&["m1", "m2", "m3", "m4", "m5"]))
        .await
        .unwrap();
    let bounds = log.bounds().await.unwrap();
    assert_eq!((bounds.oldest, bounds.next), (3, 6));
    let kept: Vec<u64> = log
        .read(1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.sequence())
        .collect();
    assert_eq!(kept, [3, 4, 5]);
}

#[tokio::test]
async fn reads_after_an_erasure_skip_the_holes() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        let mut batch = events(&["a1", "b1", "b2", "a2", "a3"]);
        for event in &mut batch {
            event.application_user_id = event.event_id[..1].to_owned();
        }
        log.append(batch).await.unwrap();
        let erased = log.erase_user("b").await.unwrap();
        assert_eq!((erased.events, erased.dedup_entries), (2, 2), "{name}");
        for (from, expected) in [
            (1, vec![1, 4, 5]),
            (2, vec![4, 5]),
            (4, vec![4, 5]),
            (5, vec![5]),
        ] {
            let read: Vec<u64> = log
                .read(from, 10)
                .await
                .unwrap()
                .iter()
                .map(|e| e.sequence())
                .collect();
            assert_eq!(read, expected, "{name}: from {from}");
        }
    }
}

#[tokio::test]
async fn sequences_never_go_back_after_the_newest_events_are_removed_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path(), HOUR, Duration::from_millis(300)).unwrap();
        log.append(events(&["a", "b", "c"])).await.unwrap();
        // The 300 ms retention must really pass for every event to age out.
        tokio::time::sleep(Duration::from_millis(400)).await;
        log.housekeeping().await.unwrap();
        let bounds = log.bounds().await.unwrap();
        assert_eq!(
            (bounds.oldest, bounds.next),
            (4, 4),
            "retention emptied the log"
        );
        log.close().await;
    }
    {
        let log = EmbeddedLog::open(dir.path(), HOUR, HOUR).unwrap();
        assert_eq!(log.bounds().await.unwrap().next, 4, "after reopening");
        let mut last = event("d");
        last.application_user_id = "leaving".into();
        assert_eq!(
            log.append(vec![last]).await.unwrap(),
            [AppendOutcome::Appended { sequence: 4 }]
        );
        assert_eq!(log.erase_user("leaving").await.unwrap().events, 1);
        assert_eq!(
            log.bounds().await.unwrap().next,
            5,
            "after erasing the newest"
        );
        log.close().await;
    }
    let log = EmbeddedLog::open(dir.path(), HOUR, HOUR).unwrap();
    assert_eq!(
        log.append(events(&["e"])).await.unwrap(),
        [AppendOutcome::Appended { sequence: 5 }]
    );
    let stored = log.read(1, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event().event_id, "e");
}

/// A copy of the data directory the 0.1 release wrote (tests/fixtures/legacy-0.1-data).
fn legacy_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/legacy-0.1-data/events.redb"
    );
    std::fs::copy(fixture, dir.path().join("events.redb")).unwrap();
    dir
}

/// Long enough to keep the fixture's entries (written on 2026-12-01) live.
const YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[tokio::test]
async fn a_0_1_store_keeps_recognising_its_event_ids_after_the_upgrade() {
    let dir = legacy_store();
    let log = EmbeddedLog::open(dir.path(), YEARS, YEARS).unwrap();
    let stored = log.read(1, 100).await.unwrap();
    assert_eq!(stored.len(), 11);
    // Each stored item again, now with an id of the new rule: a duplicate by its old id.
    let redelivered: Vec<NewEvent> = stored
        .iter()
        .map(|e| NewEvent {
            event: event(&format!("new-rule:{}", e.event().event_id)),
            legacy_event_id: Some(e.event().event_id.clone()),
        })
        .collect();
    let outcomes = log
        .admit(Admission {
            events: redelivered,
            ..Admission::default()
        })
        .await
        .unwrap()
        .events;
    let expected: Vec<_> = (1..=11)
        .map(|sequence| AppendOutcome::Duplicate { sequence })
        .collect();
    assert_eq!(outcomes, expected);
    // An item 0.1 never saw is new, whatever its legacy id; and an entry this release
    // wrote is not taken for an old-rule one.
    let fresh = NewEvent {
        event: event("new-rule:fresh"),
        legacy_event_id: Some("never-seen".into()),
    };
    let later = NewEvent {
        event: event("new-rule:later"),
        legacy_event_id: Some("new-rule:fresh".into()),
    };
    let outcomes = log
        .admit(Admission {
            events: vec![fresh, later],
            ..Admission::default()
        })
        .await
        .unwrap()
        .events;
    assert_eq!(
        outcomes,
        [
            AppendOutcome::Appended { sequence: 12 },
            AppendOutcome::Appended { sequence: 13 }
        ]
    );
    log.close().await;
    drop(log);

    // The upgrade instant is recorded once: after a restart the old ids still count.
    let log = EmbeddedLog::open(dir.path(), YEARS, YEARS).unwrap();
    let again = NewEvent {
        event: event("new-rule:again"),
        legacy_event_id: Some(stored[0].event().event_id.clone()),
    };
    let outcomes = log
        .admit(Admission {
            events: vec![again],
            ..Admission::default()
        })
        .await
        .unwrap()
        .events;
    assert_eq!(outcomes, [AppendOutcome::Duplicate { sequence: 1 }]);
}

#[tokio::test]
async fn a_store_created_by_this_release_never_matches_legacy_ids() {
    let dir = tempfile::tempdir().unwrap();
    for _restart in 0..2 {
        let log = EmbeddedLog::open(dir.path(), HOUR, HOUR).unwrap();
        log.append(events(&["a"])).await.unwrap();
        let outcomes = log
            .admit(Admission {
                events: vec![NewEvent {
                    event: event(&format!("b-{}", log.bounds().await.unwrap().next)),
                    legacy_event_id: Some("a".into()),
                }],
                ..Admission::default()
            })
            .await
            .unwrap()
            .events;
        assert!(
            matches!(outcomes[..], [AppendOutcome::Appended { .. }]),
            "{outcomes:?}"
        );
        log.close().await;
    }
}
