//! `GET /metrics` moves when webhooks, subscriptions and proxy calls happen.

mod support;

use std::time::Duration;

use spike_gateway::proto::{GetNutritionRecordRequest, spike_records_client::SpikeRecordsClient};
use support::{fake_spike::*, *};

async fn scrape(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    response.text().await.unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn webhook_subscriber_and_upstream_series_move() {
    let fake = FakeSpike::start().await;
    fake.script(
        "GET /nutrition_records/missing",
        vec![Scripted::problem(404, "no such record")],
    );
    let app = gateway_proxying_to(&fake.url).await;
    let before = scrape(&app).await;
    assert_eq!(value(&before, "spike_gateway_subscribers"), Some(0.0));
    assert_eq!(value(&before, "spike_gateway_duplicates_total"), Some(0.0));
    assert_eq!(
        value(&before, "spike_gateway_dead_letters_stored"),
        Some(0.0)
    );

    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    app.post(MAIN, &fixture("main-batch.json")).await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    app.post(LAB, &fixture("lab-report-failed.json")).await;
    app.post_json(MAIN, &serde_json::json!({"hello": "world"}))
        .await;
    // A retry stores no second letter, so neither counter nor gauge moves for it.
    app.post_json(MAIN, &serde_json::json!({"hello": "world"}))
        .await;
    app.post_json(
        LAB,
        &serde_json::json!({"status": "completed", "sections": []}),
    )
    .await;
    app.post_with_signature(MAIN, b"{}", Some(&"0".repeat(64)))
        .await;
    take(&mut stream, 3).await;

    let mut client = SpikeRecordsClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap();
    for id in ["r1", "missing"] {
        let _ = client
            .get_nutrition_record(GetNutritionRecordRequest {
                application_user_id: "u".into(),
                record_id: id.into(),
            })
            .await;
    }

    let text = scrape(&app).await;
    let expect = [
        (
            r#"spike_gateway_webhooks_total{category="main",outcome="accepted"}"#,
            4.0,
        ),
        (
            r#"spike_gateway_webhooks_total{category="main",outcome="bad_signature"}"#,
            1.0,
        ),
        (
            r#"spike_gateway_webhooks_total{category="lab_reports",outcome="accepted"}"#,
            2.0,
        ),
        (
            r#"spike_gateway_events_appended_total{event_type="EVENT_TYPE_RECORD_CHANGE"}"#,
            2.0,
        ),
        (
            r#"spike_gateway_events_appended_total{event_type="EVENT_TYPE_LAB_REPORT_FAILED"}"#,
            1.0,
        ),
        ("spike_gateway_duplicates_total", 2.0),
        (r#"spike_gateway_dead_letters_total{category="main"}"#, 1.0),
        (
            r#"spike_gateway_dead_letters_total{category="lab_reports"}"#,
            1.0,
        ),
        (
            r#"spike_gateway_dead_letter_reasons_total{reason="unclassifiable"}"#,
            1.0,
        ),
        (
            r#"spike_gateway_dead_letter_reasons_total{reason="missing_record_id"}"#,
            1.0,
        ),
        ("spike_gateway_dead_letters_stored", 2.0),
        ("spike_gateway_subscribers", 1.0),
        ("spike_gateway_delivery_seconds_count", 3.0),
        ("spike_gateway_subscriber_lag_events_count", 3.0),
        (
            r#"spike_gateway_webhook_ack_seconds_count{category="main"}"#,
            5.0,
        ),
        (
            r#"spike_gateway_upstream_calls_total{rpc="GetNutritionRecord",status="OK"}"#,
            1.0,
        ),
        (
            r#"spike_gateway_upstream_calls_total{rpc="GetNutritionRecord",status="NOT_FOUND"}"#,
            1.0,
        ),
        (
            r#"spike_gateway_upstream_call_seconds_count{rpc="GetNutritionRecord"}"#,
            2.0,
        ),
    ];
    for (series, expected) in expect {
        assert_eq!(value(&text, series), Some(expected), "{series}\n{text}");
    }
    assert!(!text.contains("User1"), "no user ids in labels");

    drop(stream);
    wait_until(
        Duration::from_secs(2),
        "the subscribers gauge falls to 0 when the client leaves",
        async || value(&scrape(&app).await, "spike_gateway_subscribers") == Some(0.0),
    )
    .await;
}

/// Each commit of the embedded log is timed, and counts the new events it made durable:
/// a retry's duplicates make none.
#[tokio::test]
async fn embedded_commits_are_timed_and_count_the_events_they_made_durable() {
    let app = spawn_app_with(&["--store", "embedded"]).await;
    let count = "spike_gateway_event_log_commit_seconds_count";
    let events = "spike_gateway_event_log_commit_events_sum";
    let before = scrape(&app).await;
    assert_eq!(value(&before, count), Some(0.0));
    assert_eq!(value(&before, events), Some(0.0));

    let mut appended = 0.0;
    for _ in 0..2 {
        let response = app.post(MAIN, &fixture("main-batch.json")).await;
        assert_eq!(response.status(), 200);
        let answer: serde_json::Value = response.json().await.unwrap();
        appended += answer["appended"].as_f64().unwrap();
    }
    assert!(appended > 0.0, "the batch appends events");

    let text = scrape(&app).await;
    let commits = value(&text, count).unwrap();
    assert!((1.0..=2.0).contains(&commits), "{commits} commits");
    assert_eq!(value(&text, events), Some(appended));
    assert!(value(&text, "spike_gateway_event_log_commit_seconds_sum").unwrap() > 0.0);
}

#[tokio::test]
async fn the_stored_dead_letters_gauge_follows_erasure() {
    use support::admin::*;
    let app = spawn_app_with(&["--admin-tokens", ADMIN_TOKEN]).await;
    for user in ["gone", "kept"] {
        let body = serde_json::json!({"event_type": "sleep_changed", "application_user_id": user});
        app.post_json(MAIN, &body).await;
    }
    assert_eq!(
        value(&scrape(&app).await, "spike_gateway_dead_letters_stored"),
        Some(2.0)
    );
    erase_user(&app, "gone").await;
    let text = scrape(&app).await;
    assert_eq!(value(&text, "spike_gateway_dead_letters_stored"), Some(1.0));
    assert_eq!(
        value(
            &text,
            r#"spike_gateway_dead_letter_reasons_total{reason="unknown_event_type"}"#
        ),
        Some(2.0),
        "a counter of letters stored, not of letters kept"
    );
}

#[tokio::test]
async fn grpc_server_series_count_real_calls_when_they_complete() {
    use spike_gateway::proto::GetLabReportRequest;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    const GET: &str = r#"method="spike.gateway.v1.SpikeRecords/GetNutritionRecord",kind="unary""#;
    const SUBSCRIBE: &str =
        r#"method="spike.gateway.v1.EventStream/Subscribe",kind="server_streaming""#;
    let fake = FakeSpike::start().await;
    fake.script(
        "GET /nutrition_records/missing",
        vec![Scripted::problem(404, "no such record")],
    );
    let app = gateway_proxying_to(&fake.url).await;
    let before = scrape(&app).await;
    let build = format!(
        r#"spike_gateway_build_info{{version="{}",git_commit="{}",rustc_version="{}"}}"#,
        env!("CARGO_PKG_VERSION"),
        spike_gateway::metrics::GIT_COMMIT,
        spike_gateway::metrics::RUSTC_VERSION,
    );
    assert_eq!(value(&before, &build), Some(1.0), "{before}");
    assert!(
        !spike_gateway::metrics::RUSTC_VERSION.is_empty(),
        "build.rs found the compiler"
    );
    assert!(!before.contains("spike_gateway_grpc_server_requests_total{"));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut records = SpikeRecordsClient::new(channel.clone());
    for id in ["r1", "missing", "missing"] {
        let _ = records
            .get_nutrition_record(GetNutritionRecordRequest {
                application_user_id: "u".into(),
                record_id: id.into(),
            })
            .await;
    }
    // Refused by validation before Spike is called: a trailers-only answer.
    let invalid = records
        .get_lab_report(GetLabReportRequest {
            application_user_id: String::new(),
            record_id: "r1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    // A stream is counted when it ends, not when it opens.
    let stream = app.subscribe(from_beginning()).await.unwrap();

    let text = scrape(&app).await;
    let expect = [
        (format!(r#"{{{GET},code="OK"}}"#), 1.0),
        (format!(r#"{{{GET},code="NOT_FOUND"}}"#), 2.0),
        (
            r#"{method="spike.gateway.v1.SpikeRecords/GetLabReport",kind="unary",code="INVALID_ARGUMENT"}"#.to_owned(),
            1.0,
        ),
        (
            r#"{method="grpc.health.v1.Health/Check",kind="unary",code="OK"}"#.to_owned(),
            1.0,
        ),
    ];
    for (labels, expected) in expect {
        let series = format!("spike_gateway_grpc_server_requests_total{labels}");
        assert_eq!(value(&text, &series), Some(expected), "{series}\n{text}");
    }
    let latency = format!("spike_gateway_grpc_server_request_seconds_count{{{GET}}}");
    assert_eq!(value(&text, &latency), Some(3.0), "{text}");
    assert!(
        !text.contains(&format!("{{{SUBSCRIBE},code=")),
        "an open stream is not yet counted\n{text}"
    );

    // The client leaves: the stream ends as CANCELLED, with its lifetime observed.
    drop(stream);
    let cancelled =
        format!(r#"spike_gateway_grpc_server_requests_total{{{SUBSCRIBE},code="CANCELLED"}}"#);
    wait_until(
        Duration::from_secs(5),
        "the abandoned stream is counted as CANCELLED",
        async || value(&scrape(&app).await, &cancelled) == Some(1.0),
    )
    .await;
    let text = scrape(&app).await;
    let lifetime = format!("spike_gateway_grpc_server_request_seconds_count{{{SUBSCRIBE}}}");
    assert_eq!(value(&text, &lifetime), Some(1.0), "{text}");
    assert!(!text.contains("code=\"UNKNOWN\""), "{text}");
}

#[tokio::test]
async fn consumer_group_series_follow_the_group() {
    use spike_gateway::proto::{ConsumeOpen, Nak, Term, consume_request::Request};
    use support::consume::*;
    let app = spawn_app_with(&["--store", "memory"]).await;
    assert!(
        !scrape(&app).await.contains("consumer_group"),
        "no group, no series"
    );
    let open = ConsumeOpen {
        max_in_flight: 5,
        ..open_request("billing")
    };
    let mut member = join(&app, open).await.unwrap();
    for n in 0..10 {
        app.post_json(MAIN, &record_change("u", n)).await;
    }
    assert_eq!(
        member.take(5).await.iter().map(seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    member.ack(vec![1, 2]).await;
    member
        .send(Request::Term(Term {
            sequences: vec![3],
            reason: "poison".into(),
        }))
        .await;
    member
        .send(Request::Nak(Nak {
            sequences: vec![4],
            delay: None,
        }))
        .await;
    // 4 again (attempt 2), then 6, 7 and 8: five in flight (4 to 8) of seven pending.
    let mut more: Vec<u64> = member.take(4).await.iter().map(seq).collect();
    more.sort_unstable();
    assert_eq!(more, vec![4, 6, 7, 8]);
    let text = scrape(&app).await;
    let expect = [
        ("pending", 7.0),
        ("in_flight", 5.0),
        ("acks_total", 2.0),
        ("naks_total", 1.0),
        ("redeliveries_total", 1.0),
        ("terminated_total", 1.0),
        ("expired_total", 0.0),
    ];
    for (name, expected) in expect {
        let series = format!(r#"spike_gateway_consumer_group_{name}{{group="billing"}}"#);
        assert_eq!(value(&text, &series), Some(expected), "{series}\n{text}");
    }

    member.ack((4..=8).collect()).await;
    wait_until(Duration::from_secs(5), "the acks show", async || {
        let text = scrape(&app).await;
        let value = |name: &str| {
            value(
                &text,
                &format!(r#"spike_gateway_consumer_group_{name}{{group="billing"}}"#),
            )
        };
        // 9 and 10 went out as room came back.
        value("acks_total") == Some(7.0)
            && value("pending") == Some(2.0)
            && value("in_flight") == Some(2.0)
    })
    .await;
}
