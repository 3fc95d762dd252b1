//! The `EventLog` contract, against the embedded (redb) and memory backends.

use std::{sync::Arc, time::Duration};

use spike_gateway::{
    events::{
        AppendOutcome, EventLog, LogError,
        embedded::EmbeddedLog,
        memory::MemoryLog,
        time::{from_micros, now_micros, to_micros},
    },
    proto::{DeadLetter, Event, EventType},
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
) -> Vec<(&'static str, Arc<dyn EventLog>, Option<tempfile::TempDir>)> {
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
            let event = live.recv().await.unwrap();
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
        tokio::time::sleep(Duration::from_millis(400)).await;
        log.housekeeping().await.unwrap();
        assert_eq!(
            log.append(events(&["again"])).await.unwrap(),
            [AppendOutcome::Appended { sequence: 2 }],
            "{name}"
        );
    }
}

#[tokio::test]
async fn dead_letters_are_kept_and_counted() {
    for (name, log, _dir) in backends(HOUR, HOUR) {
        log.dead_letter(DeadLetter {
            reason: "cannot classify".into(),
            raw_json: b"{}".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(log.dead_letter_count().await.unwrap(), 1, "{name}");
        assert_eq!(log.bounds().await.unwrap().next, 1, "{name}: not an event");
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
    assigned.sort();
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
