//! The `nats` backend with real nats-server processes: several replicas, one stream.

mod support;

use std::time::Duration;

use spike_gateway::proto::{EventType, SubscribeRequest};
use support::{nats::*, *};

async fn replica(url: &str, stream: &(String, String)) -> TestApp {
    spawn_app_with(&[
        "--store",
        "nats",
        "--nats-url",
        url,
        "--nats-stream",
        &stream.0,
        "--nats-subject-prefix",
        &stream.1,
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn a_webhook_posted_to_one_replica_reaches_a_subscriber_on_another_once() {
    let (url, _server) = url_or_start();
    let stream = unique_stream();
    let (a, b) = (replica(&url, &stream).await, replica(&url, &stream).await);
    let mut on_b = b.subscribe(SubscribeRequest::default()).await.unwrap();

    for (name, path) in SAMPLES {
        assert_eq!(
            a.post(path, &fixture(name)).await.status().as_u16(),
            200,
            "{name}"
        );
    }
    let events = take(&mut on_b, 11).await;
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=11).collect::<Vec<_>>());
    assert_eq!(events[0].r#type(), EventType::RecordChange);
    assert_eq!(events[10].r#type(), EventType::NutritionRecordCompleted);

    // The same bodies through the other replica: acknowledged, no second event.
    for (name, path) in SAMPLES {
        let response = b.post(path, &fixture(name)).await;
        assert_eq!(response.status().as_u16(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["appended"], 0, "{name}: {body}");
    }
    assert_quiet(&mut on_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn resume_by_sequence_works_across_replicas() {
    let (url, _server) = url_or_start();
    let stream = unique_stream();
    let (a, b) = (replica(&url, &stream).await, replica(&url, &stream).await);
    for n in 0..20 {
        let target = if n % 2 == 0 { &a } else { &b };
        let response = target.post_json(MAIN, &record_change("resume", n)).await;
        assert_eq!(response.status().as_u16(), 200);
    }
    let mut on_a = a.subscribe(from_beginning()).await.unwrap();
    let first: Vec<u64> = take(&mut on_a, 10)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(first, (1..=10).collect::<Vec<_>>());
    drop(on_a);
    let mut on_b = b.subscribe(after_sequence(10)).await.unwrap();
    b.post_json(MAIN, &record_change("resume", 99)).await;
    let rest: Vec<u64> = take(&mut on_b, 11)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(rest, (11..=21).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn user_ids_with_dots_filter_exactly() {
    let (url, _server) = url_or_start();
    let stream = unique_stream();
    let app = replica(&url, &stream).await;
    for (n, user) in ["a.b", "a", "a.b.c", "a~2Eb", "a.b"].iter().enumerate() {
        app.post_json(MAIN, &record_change(user, n as u64)).await;
    }
    let mut stream = app
        .subscribe(SubscribeRequest {
            application_user_ids: vec!["a.b".into()],
            ..from_beginning()
        })
        .await
        .unwrap();
    let events = take(&mut stream, 2).await;
    assert!(
        events.iter().all(|e| e.application_user_id == "a.b"),
        "{events:?}"
    );
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 5]
    );
    assert_quiet(&mut stream).await;
}

async fn wait_for_readiness(app: &TestApp, ready: bool) {
    let url = app.url("/readyz");
    wait_until(
        Duration::from_secs(20),
        &format!("/readyz says ready={ready}"),
        async || {
            let status = app.client.get(&url).send().await.unwrap().status();
            (status.as_u16() == 200) == ready
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server on the PATH; .ci/test runs it when one is there"]
async fn nats_down_means_503_and_recovery_needs_no_restart() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    require_installed();
    let mut server = NatsServer::start();
    let stream = unique_stream();
    let app = replica(&server.url(), &stream).await;
    let mut acknowledged = Vec::new();
    let mut post = async |app: &TestApp, n: u64| {
        let status = app
            .post_json(MAIN, &record_change(&format!("outage-{n}"), n))
            .await
            .status()
            .as_u16();
        if status == 200 {
            acknowledged.push(format!("outage-{n}"));
        }
        status
    };
    assert_eq!(post(&app, 1).await, 200);

    server.stop();
    wait_for_readiness(&app, false).await;
    assert_eq!(
        post(&app, 2).await,
        503,
        "Spike must retry while NATS is down"
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    wait_until(
        Duration::from_secs(5),
        "gRPC health says NOT_SERVING",
        async || {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            let answer = health.check(request).await.unwrap().into_inner();
            answer.status() == ServingStatus::NotServing
        },
    )
    .await;

    server.restart();
    wait_for_readiness(&app, true).await;
    assert_eq!(post(&app, 3).await, 200);
    assert_eq!(post(&app, 2).await, 200, "Spike's retry now succeeds");

    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    let users: Vec<String> = take(&mut stream, 3)
        .await
        .into_iter()
        .map(|e| e.application_user_id)
        .collect();
    assert_eq!(users, acknowledged, "every acknowledged event, in order");
    assert_quiet(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn start_positions_and_filters_map_onto_consumers() {
    use prost_types::Timestamp;
    use spike_gateway::proto::subscribe_request::Start;
    use tonic::Code;
    let (url, _server) = url_or_start();
    let stream = unique_stream();
    let app = replica(&url, &stream).await;
    for (name, path) in SAMPLES {
        app.post(path, &fixture(name)).await;
    }
    // Two types: wider than one filter subject, filtered by the gateway.
    let mut failed = app
        .subscribe(SubscribeRequest {
            event_types: vec![
                EventType::LabReportFailed as i32,
                EventType::NutritionRecordFailed as i32,
            ],
            ..from_beginning()
        })
        .await
        .unwrap();
    let types: Vec<_> = take(&mut failed, 2)
        .await
        .iter()
        .map(|e| e.r#type())
        .collect();
    assert_eq!(
        types,
        [EventType::LabReportFailed, EventType::NutritionRecordFailed]
    );
    assert_quiet(&mut failed).await;

    // The clock must move on so `now` falls strictly after the earlier events' receipt
    // time and strictly before the next one's: the times themselves are under test.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.post_json(MAIN, &record_change("late", 1)).await;
    let since = SubscribeRequest {
        start: Some(Start::Since(Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        })),
        ..Default::default()
    };
    let mut stream = app.subscribe(since).await.unwrap();
    assert_eq!(next(&mut stream).await.unwrap().sequence, 12);
    assert_quiet(&mut stream).await;

    let status = app.subscribe(after_sequence(99)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let (reason, metadata) = error_info(&status);
    assert_eq!(reason, "START_AHEAD_OF_LOG");
    assert_eq!(metadata["oldest_sequence"], "1", "{metadata:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn a_stalled_subscriber_on_nats_later_receives_everything() {
    let (url, _server) = url_or_start();
    let stream = unique_stream();
    let app = replica(&url, &stream).await;
    let mut stalled = app.subscribe(from_beginning()).await.unwrap();
    // Well past the client's per-subscription buffer (1024).
    for b in 0..40u64 {
        let batch: Vec<_> = (0..100)
            .map(|i| record_change("stall", b * 100 + i))
            .collect();
        let response = app.post_json(MAIN, &serde_json::Value::Array(batch)).await;
        assert_eq!(response.status().as_u16(), 200);
    }
    let sequences: Vec<u64> = take(&mut stalled, 4000)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, (1..=4000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn await_result_works_across_replicas() {
    use spike_gateway::proto::{
        UploadNutritionImageRequest, spike_records_client::SpikeRecordsClient,
    };
    use support::fake_spike::{FakeSpike, Scripted, nutrition_record};
    let (url, _server) = url_or_start();
    let stream = unique_stream();
    let fake = FakeSpike::start().await;
    fake.script(
        "POST /nutrition_records/image",
        vec![Scripted::new(
            200,
            nutrition_record("meal-x", "pending", ""),
        )],
    );
    let with_spike = |url: &str| {
        vec![
            "--store".to_owned(),
            "nats".into(),
            "--nats-url".into(),
            url.into(),
            "--nats-stream".into(),
            stream.0.clone(),
            "--nats-subject-prefix".into(),
            stream.1.clone(),
            "--spike-api-base-url".into(),
            fake.url.clone(),
            "--spike-application-id".into(),
            "1".into(),
            "--spike-hmac-key".into(),
            "k".into(),
        ]
    };
    let flags = with_spike(&url);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (a, b) = (spawn_app_with(&flags).await, replica(&url, &stream).await);

    let mut client = SpikeRecordsClient::connect(format!("http://{}", a.grpc))
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        client
            .upload_nutrition_image(UploadNutritionImageRequest {
                application_user_id: "user-1".into(),
                image: b"jpeg".to_vec(),
                await_result: true,
                ..Default::default()
            })
            .await
    });
    wait_until(
        Duration::from_secs(10),
        "the upload reaches Spike",
        async || !fake.data_requests().is_empty(),
    )
    .await;
    // Spike's webhook lands on the other replica.
    let webhook = serde_json::json!({
        "application_user_id": "user-1", "record_id": "meal-x", "status": "completed",
        "dish_name": "via-replica-b", "modified_at": "2025-09-15T10:31:00Z",
    });
    assert_eq!(
        b.post_json(NUTRITION, &webhook).await.status().as_u16(),
        200
    );
    let result = call.await.unwrap().unwrap().into_inner();
    assert_eq!(result.dish_name, "via-replica-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn erasure_purges_the_users_subjects() {
    use spike_gateway::proto::{EraseUserRequest, admin_client::AdminClient};
    let (url, _server) = url_or_start();
    let stream = unique_stream();
    let flags = [
        "--store",
        "nats",
        "--nats-url",
        &url,
        "--nats-stream",
        &stream.0,
        "--nats-subject-prefix",
        &stream.1,
        "--admin-tokens",
        "root",
    ];
    let app = spawn_app_with(&flags).await;
    for (n, user) in ["keep.me", "erase.me", "keep.me", "erase.me"]
        .iter()
        .enumerate()
    {
        app.post_json(MAIN, &record_change(user, n as u64)).await;
    }
    let mut request = tonic::Request::new(EraseUserRequest {
        application_user_id: "erase.me".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer root".parse().unwrap());
    let erased = AdminClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap()
        .erase_user(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.events_removed, 2);
    let mut replay = app.subscribe(from_beginning()).await.unwrap();
    let kept: Vec<_> = take(&mut replay, 2)
        .await
        .into_iter()
        .map(|e| (e.sequence, e.application_user_id))
        .collect();
    assert_eq!(kept, [(1, "keep.me".to_owned()), (3, "keep.me".to_owned())]);
    assert_quiet(&mut replay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn the_log_contract_holds_on_nats_through_its_own_follow() {
    use std::sync::Arc;

    use spike_gateway::{
        events::{
            AppendOutcome, EventLog,
            nats::{NatsLog, NatsSettings},
            subscription::{self, Filter, Start},
        },
        proto::Event,
    };
    let (url, _server) = url_or_start();
    let (stream, prefix) = unique_stream();
    let log: Arc<dyn EventLog> = Arc::new(
        NatsLog::connect(NatsSettings {
            url: url.clone(),
            stream: stream.clone(),
            subject_prefix: prefix,
            dedup_window: Duration::from_secs(60),
            retention: Duration::from_secs(3600),
        })
        .await
        .unwrap(),
    );
    let event = |id: &str| Event {
        event_id: id.into(),
        r#type: EventType::RecordChange as i32,
        application_user_id: "u.1".into(),
        ..Default::default()
    };
    let mut live = subscription::open(log.clone(), Start::Live, &Filter::default())
        .await
        .unwrap();
    let outcomes = log
        .append(vec![event("a"), event("b"), event("a")])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            AppendOutcome::Appended { sequence: 1 },
            AppendOutcome::Appended { sequence: 2 },
            AppendOutcome::Duplicate { sequence: 1 },
        ]
    );
    let bounds = log.bounds().await.unwrap();
    assert_eq!((bounds.oldest, bounds.next), (1, 3));
    // Live, from the beginning and since the epoch all see 1 and 2, in order, once.
    let mut history = subscription::open(log.clone(), Start::FromBeginning, &Filter::default())
        .await
        .unwrap();
    let mut since = subscription::open(log.clone(), Start::Since(0), &Filter::default())
        .await
        .unwrap();
    for feed in [&mut live, &mut history, &mut since] {
        let mut got = Vec::new();
        while got.len() < 2 {
            let batch = tokio::time::timeout(Duration::from_secs(5), feed.next_batch())
                .await
                .expect("events arrive within 5 s")
                .unwrap();
            got.extend(batch.iter().map(|e| e.sequence()));
        }
        assert_eq!(got, [1, 2]);
        assert_eq!(feed.position(), 3);
    }
}
