//! `EventStream/Subscribe` through a real tonic client (SPEC §4.1).

mod support;

use std::{collections::HashSet, time::Duration};

use prost_types::Timestamp;
use spike_gateway::proto::{
    EventType, SubscribeRequest, WebhookCategory, event::Payload, subscribe_request::Start,
};
use support::*;
use tonic::Code;

async fn post_all_samples(app: &TestApp) {
    for (name, path) in SAMPLES {
        assert_eq!(
            app.post(path, &fixture(name)).await.status().as_u16(),
            200,
            "{name}"
        );
    }
}

#[tokio::test]
async fn every_sample_shape_arrives_typed_and_in_order() {
    let app = spawn_app().await;
    post_all_samples(&app).await;
    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    let events = take(&mut stream, 11).await;
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=11).collect::<Vec<_>>());

    let summary: Vec<(EventType, WebhookCategory, &str)> = events
        .iter()
        .map(|e| (e.r#type(), e.category(), e.application_user_id.as_str()))
        .collect();
    use EventType::*;
    use WebhookCategory::*;
    assert_eq!(
        summary,
        [
            (RecordChange, Main, "User1"),
            (RecordChange, Main, "User2"),
            (RecordChange, Main, "user_xyz789"),
            (ProviderIntegrationCreated, Main, "user_xyz789"),
            (ProviderIntegrationDeleted, Main, "user_xyz789"),
            (LabReportCompleted, LabReports, "end_user_id1"),
            (LabReportFailed, LabReports, "end_user_id1"),
            (LabReportCompleted, LabReports, "end_user_id2"),
            (NutritionRecordCompleted, NutritionRecords, "end_user_id1"),
            (NutritionRecordFailed, NutritionRecords, "end_user_id1"),
            (NutritionRecordCompleted, NutritionRecords, "end_user_id3"),
        ]
    );
    // Payloads are typed; details are covered shape by shape in tests/normalize.rs.
    let Some(Payload::LabReportResult(lab)) = &events[5].payload else {
        panic!("lab payload expected: {:?}", events[5].payload);
    };
    assert_eq!(lab.sections[0].results[0].value, Some(7.2));
    let Some(Payload::NutritionResult(meal)) = &events[10].payload else {
        panic!("nutrition payload expected");
    };
    assert_eq!(meal.nutritional_fields["energy_kcal"], 310.0);
    for event in &events {
        assert!(event.received_at.is_some() && event.occurred_at.is_some());
        assert!(!event.event_id.is_empty());
        assert!(event.raw_json.is_empty(), "raw_json only when asked for");
    }
}

#[tokio::test]
async fn raw_json_is_the_items_own_bytes_when_asked_for() {
    let app = spawn_app().await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    let mut stream = app
        .subscribe(SubscribeRequest {
            include_raw_json: true,
            ..from_beginning()
        })
        .await
        .unwrap();
    let events = take(&mut stream, 2).await;
    let batch: Vec<serde_json::Value> =
        serde_json::from_slice(&fixture("main-batch.json")).unwrap();
    for (event, item) in events.iter().zip(&batch) {
        let raw: serde_json::Value = serde_json::from_slice(&event.raw_json).unwrap();
        assert_eq!(&raw, item);
    }
}

#[tokio::test]
async fn filters_select_by_type_user_and_provider() {
    let app = spawn_app().await;
    post_all_samples(&app).await;

    let by_type = SubscribeRequest {
        event_types: vec![
            EventType::LabReportFailed as i32,
            EventType::NutritionRecordFailed as i32,
        ],
        ..from_beginning()
    };
    let mut stream = app.subscribe(by_type).await.unwrap();
    let types: Vec<_> = take(&mut stream, 2)
        .await
        .iter()
        .map(|e| e.r#type())
        .collect();
    assert_eq!(
        types,
        [EventType::LabReportFailed, EventType::NutritionRecordFailed]
    );
    assert_quiet(&mut stream).await;

    let by_user = SubscribeRequest {
        application_user_ids: vec!["end_user_id1".into()],
        ..from_beginning()
    };
    let mut stream = app.subscribe(by_user).await.unwrap();
    let events = take(&mut stream, 4).await;
    assert!(
        events
            .iter()
            .all(|e| e.application_user_id == "end_user_id1")
    );
    assert_quiet(&mut stream).await;

    // provider_slugs constrains main events only; results carry no provider and pass.
    let by_provider = SubscribeRequest {
        provider_slugs: vec!["oura".into()],
        event_types: vec![
            EventType::ProviderIntegrationCreated as i32,
            EventType::RecordChange as i32,
            EventType::LabReportCompleted as i32,
        ],
        ..from_beginning()
    };
    let mut stream = app.subscribe(by_provider).await.unwrap();
    let types: Vec<_> = take(&mut stream, 3)
        .await
        .iter()
        .map(|e| e.r#type())
        .collect();
    assert_eq!(
        types,
        [
            EventType::ProviderIntegrationCreated,
            EventType::LabReportCompleted,
            EventType::LabReportCompleted
        ]
    );
    assert_quiet(&mut stream).await;
}

#[tokio::test]
async fn an_unknown_event_type_filter_is_invalid_argument() {
    let app = spawn_app().await;
    for bad in [0, 99] {
        let status = app
            .subscribe(SubscribeRequest {
                event_types: vec![bad],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
    }
}

#[tokio::test]
async fn without_a_start_position_the_stream_is_live_from_now() {
    let app = spawn_app().await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    let mut stream = app.subscribe(SubscribeRequest::default()).await.unwrap();
    app.post(LAB, &fixture("lab-report-failed.json")).await;
    let event = next(&mut stream).await.unwrap();
    assert_eq!(
        (event.sequence, event.r#type()),
        (3, EventType::LabReportFailed)
    );
    assert_quiet(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_by_after_sequence_while_events_keep_arriving() {
    let app = spawn_app().await;
    const TOTAL: u64 = 300;
    let poster = {
        let (client, url) = (app.client.clone(), app.url(MAIN));
        tokio::spawn(async move {
            for n in 0..TOTAL {
                let body = serde_json::to_vec(&record_change("resumer", n)).unwrap();
                let response = client
                    .post(&url)
                    .header(
                        "X-Body-Signature",
                        spike_gateway::webhook::signature::sign(KEY, &body),
                    )
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200);
            }
        })
    };
    let mut seen = Vec::new();
    let mut last = 0;
    // Connect, read a few, drop the connection, resume — several times under load.
    while (seen.len() as u64) < TOTAL {
        let mut stream = app.subscribe(after_sequence(last)).await.unwrap();
        for event in take(&mut stream, 37.min(TOTAL as usize - seen.len())).await {
            last = event.sequence;
            seen.push(event.sequence);
        }
    }
    poster.await.unwrap();
    assert_eq!(
        seen,
        (1..=TOTAL).collect::<Vec<_>>(),
        "contiguous, no duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_slows_no_one_and_later_receives_everything() {
    let app = spawn_app().await;
    // Subscribes and then reads nothing while far more than the live ring (4096) arrives.
    let mut stalled = app.subscribe(from_beginning()).await.unwrap();
    let mut healthy = app.subscribe(from_beginning()).await.unwrap();

    const BATCHES: u64 = 120;
    const PER_BATCH: u64 = 50;
    let total = (BATCHES * PER_BATCH) as usize;
    let reader = tokio::spawn(async move {
        let events = take(&mut healthy, total).await;
        events.iter().map(|e| e.sequence).collect::<Vec<_>>()
    });
    for b in 0..BATCHES {
        let batch: Vec<_> = (0..PER_BATCH)
            .map(|i| record_change("burst", b * PER_BATCH + i))
            .collect();
        let response = app.post_json(MAIN, &serde_json::Value::Array(batch)).await;
        assert_eq!(response.status().as_u16(), 200);
    }
    let healthy_sequences = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the healthy subscriber keeps up")
        .unwrap();
    assert_eq!(healthy_sequences, (1..=total as u64).collect::<Vec<_>>());

    let stalled_sequences: Vec<u64> = take(&mut stalled, total)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(
        stalled_sequences,
        (1..=total as u64).collect::<Vec<_>>(),
        "nothing missed after lagging"
    );
}

#[tokio::test]
async fn a_position_the_log_no_longer_retains_is_out_of_range() {
    let app = spawn_app_with(&["--retention", "1s"]).await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    // The 1 s retention must really pass for the first batch to age out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.log.housekeeping().await.unwrap();
    app.post(LAB, &fixture("lab-report-failed.json")).await;

    let status = app.subscribe(after_sequence(0)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("oldest retained sequence is 3"),
        "{}",
        status.message()
    );
    let (reason, metadata) = error_info(&status);
    assert_eq!(reason, "START_NOT_RETAINED");
    assert_eq!(metadata["oldest_sequence"], "3", "{metadata:?}");

    let long_ago = SubscribeRequest {
        start: Some(Start::Since(Timestamp {
            seconds: 0,
            nanos: 0,
        })),
        ..Default::default()
    };
    let status = app.subscribe(long_ago).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let (reason, metadata) = error_info(&status);
    assert_eq!(reason, "START_NOT_RETAINED");
    assert_eq!(metadata["oldest_sequence"], "3", "{metadata:?}");

    // What is retained still streams.
    let mut stream = app.subscribe(after_sequence(2)).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().sequence, 3);
    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().sequence, 3);
}

#[tokio::test]
async fn after_sequence_ahead_of_the_log_is_out_of_range() {
    let app = spawn_app().await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    let status = app.subscribe(after_sequence(10)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("ahead of the log"), "{status:?}");
    let (reason, metadata) = error_info(&status);
    assert_eq!(reason, "START_AHEAD_OF_LOG");
    assert_eq!(metadata["oldest_sequence"], "1", "{metadata:?}");
    assert_eq!(metadata["last_sequence"], "2", "{metadata:?}");
    // The newest sequence itself is a valid resume point: live from there.
    let mut stream = app.subscribe(after_sequence(2)).await.unwrap();
    app.post(LAB, &fixture("lab-report-failed.json")).await;
    assert_eq!(next(&mut stream).await.unwrap().sequence, 3);
}

#[tokio::test]
async fn since_starts_at_the_first_event_received_at_or_after_it() {
    let app = spawn_app().await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    // The clock must move on so `now` falls strictly after the earlier events' receipt
    // time and strictly before the next one's: the times themselves are under test.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    app.post(LAB, &fixture("lab-report-failed.json")).await;
    let request = SubscribeRequest {
        start: Some(Start::Since(Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        })),
        ..Default::default()
    };
    let mut stream = app.subscribe(request).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().sequence, 3);
    assert_quiet(&mut stream).await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable_and_the_resume_position() {
    let mut app = spawn_app().await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    take(&mut stream, 2).await;
    // Live from now, so nothing is delivered: it resumes after the position it started at.
    let mut idle = app.subscribe(SubscribeRequest::default()).await.unwrap();
    app.stop().await;
    for stream in [&mut stream, &mut idle] {
        let status = next(stream).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("after_sequence=2"),
            "{}",
            status.message()
        );
        let (reason, metadata) = error_info(&status);
        assert_eq!(reason, "SHUTTING_DOWN");
        assert_eq!(metadata["after_sequence"], "2", "{metadata:?}");
    }
}

#[tokio::test]
async fn shutdown_names_the_last_delivered_sequence_not_the_start() {
    let mut app = spawn_app().await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    app.post(LAB, &fixture("lab-report-failed.json")).await;
    let mut stream = app.subscribe(after_sequence(1)).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().sequence, 2);
    assert_eq!(next(&mut stream).await.unwrap().sequence, 3);
    app.stop().await;
    let status = next(&mut stream).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let (_, metadata) = error_info(&status);
    assert_eq!(metadata["after_sequence"], "3", "{metadata:?}");
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_subscription() {
    let app = spawn_app().await;
    let streams = vec![
        app.subscribe(SubscribeRequest::default()).await.unwrap(),
        app.subscribe(from_beginning()).await.unwrap(),
        app.subscribe(after_sequence(0)).await.unwrap(),
    ];
    assert_eq!(app.subscribers.get(), 3);
    drop(streams);
    wait_until(
        Duration::from_secs(2),
        "every producer has stopped",
        async || app.subscribers.get() == 0,
    )
    .await;
}

#[tokio::test]
async fn the_memory_store_streams_too() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    post_all_samples(&app).await;
    let mut stream = app.subscribe(after_sequence(9)).await.unwrap();
    let sequences: Vec<u64> = take(&mut stream, 2)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, [10, 11]);
    let ids: HashSet<_> = {
        let mut all = app.subscribe(from_beginning()).await.unwrap();
        take(&mut all, 11)
            .await
            .into_iter()
            .map(|e| e.event_id)
            .collect()
    };
    assert_eq!(ids.len(), 11, "event ids are distinct");
}
