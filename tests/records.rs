//! `SpikeRecords` against a fake Spike over real HTTP (SPEC §4.2).

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use prost_types::Timestamp;
use serde_json::json;
use spike_gateway::{
    proto::{
        GetLabReportRequest, GetNutritionRecordRequest, ListLabReportsRequest,
        ListNutritionRecordsRequest, RecordStatus, UploadLabReportRequest,
        UploadNutritionImageRequest, spike_records_client::SpikeRecordsClient,
    },
    webhook::signature::sign,
};
use support::{fake_spike::*, *};
use tonic::{Code, Request, Status, transport::Channel};

async fn gateway_for(fake: &FakeSpike) -> TestApp {
    gateway_proxying_to(&fake.url).await
}

async fn records(app: &TestApp) -> SpikeRecordsClient<Channel> {
    SpikeRecordsClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap()
        .max_encoding_message_size(16 * 1024 * 1024)
}

fn get(user: &str, id: &str) -> GetNutritionRecordRequest {
    GetNutritionRecordRequest {
        application_user_id: user.into(),
        record_id: id.into(),
    }
}

fn image(bytes: &[u8]) -> UploadNutritionImageRequest {
    UploadNutritionImageRequest {
        application_user_id: "user-1".into(),
        image: bytes.to_vec(),
        ..Default::default()
    }
}

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

fn ts(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

#[tokio::test]
async fn the_token_request_is_signed_and_data_calls_carry_the_bearer_token() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    let record = records(&app)
        .await
        .get_nutrition_record(get("user.1", "rec-9"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (record.record_id.as_str(), record.dish_name.as_str()),
        ("rec-9", "from-get")
    );

    let auth = fake.auth_requests();
    assert_eq!(auth.len(), 1);
    assert_eq!(
        auth[0].body,
        json!({
            "application_id": 4242,
            "application_user_id": "user.1",
            "signature": sign(HMAC_KEY, b"user.1"),
        })
    );
    assert!(
        auth[0].body["application_id"].is_u64(),
        "application_id is a JSON integer"
    );
    let data = fake.data_requests();
    assert_eq!(data[0].path, "/nutrition_records/rec-9");
    assert_eq!(
        data[0].authorization.as_deref(),
        Some("Bearer token-user.1-1")
    );
}

#[tokio::test]
async fn tokens_are_reused_and_twenty_concurrent_calls_fetch_one() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    let client = records(&app).await;
    let calls: Vec<_> = (0..20)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .get_nutrition_record(get("new-user", &format!("r{n}")))
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(
        fake.auth_requests().len(),
        1,
        "one token request for 20 concurrent calls"
    );
    records(&app)
        .await
        .get_nutrition_record(get("new-user", "again"))
        .await
        .unwrap();
    assert_eq!(fake.auth_requests().len(), 1, "the cached token is reused");
    records(&app)
        .await
        .get_nutrition_record(get("other-user", "x"))
        .await
        .unwrap();
    assert_eq!(fake.auth_requests().len(), 2, "tokens are per user");
}

#[tokio::test]
async fn a_401_refreshes_the_token_once_and_retries() {
    let fake = FakeSpike::start().await;
    fake.script(
        "GET /nutrition_records/r1",
        vec![
            Scripted::problem(401, "token expired"),
            Scripted::new(200, nutrition_record("r1", "completed", "after-refresh")),
        ],
    );
    let app = gateway_for(&fake).await;
    let record = records(&app)
        .await
        .get_nutrition_record(get("u", "r1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.dish_name, "after-refresh");
    let data = fake.data_requests();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0].authorization.as_deref(), Some("Bearer token-u-1"));
    assert_eq!(data[1].authorization.as_deref(), Some("Bearer token-u-2"));
}

#[tokio::test]
async fn credentials_still_refused_after_a_refresh_is_permission_denied() {
    let fake = FakeSpike::start().await;
    fake.script(
        "GET /nutrition_records/r1",
        vec![Scripted::problem(403, "nope")],
    );
    let app = gateway_for(&fake).await;
    let status = records(&app)
        .await
        .get_nutrition_record(get("u", "r1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("Spike rejected the gateway's credentials"),
        "{}",
        status.message()
    );
    assert_eq!(fake.data_requests().len(), 2, "exactly one retry");

    // A refused token request is the same failure.
    let fake = FakeSpike::start().await;
    fake.script(
        "POST /auth/hmac",
        vec![Scripted::problem(401, "bad signature")],
    );
    let app = gateway_for(&fake).await;
    let status = records(&app)
        .await
        .get_nutrition_record(get("u", "r1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(fake.data_requests().is_empty());
}

async fn status_for(answer: Scripted) -> (Status, usize) {
    let fake = FakeSpike::start().await;
    fake.script("GET /nutrition_records/r1", vec![answer]);
    let app = gateway_for(&fake).await;
    let status = records(&app)
        .await
        .get_nutrition_record(get("u", "r1"))
        .await
        .unwrap_err();
    (status, fake.data_requests().len())
}

#[tokio::test]
async fn spikes_errors_map_to_grpc_codes_with_its_detail() {
    for (http, code) in [
        (400, Code::InvalidArgument),
        (404, Code::NotFound),
        (422, Code::InvalidArgument),
        (413, Code::ResourceExhausted),
    ] {
        let (status, attempts) =
            status_for(Scripted::problem(http, &format!("detail for {http}"))).await;
        assert_eq!(status.code(), code, "{http}");
        assert_eq!(status.message(), format!("detail for {http}"));
        assert_eq!(attempts, 1, "{http} is not retried");
    }
}

#[tokio::test]
async fn look_ups_retry_429_and_5xx_with_bounded_attempts() {
    let (status, attempts) =
        status_for(Scripted::problem(429, "slow down").header("retry-after", "0")).await;
    assert_eq!((status.code(), attempts), (Code::ResourceExhausted, 4));
    assert_eq!(status.message(), "slow down");

    let (status, attempts) = status_for(Scripted::problem(500, "boom")).await;
    assert_eq!((status.code(), attempts), (Code::Unavailable, 4));

    // A transient failure followed by success is invisible to the caller.
    let fake = FakeSpike::start().await;
    fake.script(
        "GET /nutrition_records/r1",
        vec![
            Scripted::problem(429, "slow down").header("retry-after", "1"),
            Scripted::new(200, nutrition_record("r1", "completed", "eventually")),
        ],
    );
    let app = gateway_for(&fake).await;
    let started = Instant::now();
    let record = records(&app)
        .await
        .get_nutrition_record(get("u", "r1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.dish_name, "eventually");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
}

#[tokio::test]
async fn uploads_are_not_retried_once_sent() {
    let fake = FakeSpike::start().await;
    fake.script(
        "POST /nutrition_records/image",
        vec![Scripted::problem(503, "busy")],
    );
    let app = gateway_for(&fake).await;
    let status = records(&app)
        .await
        .upload_nutrition_image(image(b"jpeg"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(fake.data_requests().len(), 1);
}

#[tokio::test]
async fn a_deadline_shorter_than_spikes_delay_is_deadline_exceeded_promptly() {
    let fake = FakeSpike::start().await;
    fake.script(
        "GET /nutrition_records/r1",
        vec![
            Scripted::new(200, nutrition_record("r1", "completed", "late"))
                .delay(Duration::from_secs(5)),
        ],
    );
    let app = gateway_for(&fake).await;
    let started = Instant::now();
    let status = records(&app)
        .await
        .get_nutrition_record(with_deadline(get("u", "r1"), Duration::from_millis(400)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_unreachable_spike_is_unavailable() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = gateway_proxying_to(&url).await;
    let status = records(&app)
        .await
        .get_nutrition_record(get("u", "r1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn without_spike_credentials_the_proxy_is_failed_precondition() {
    let app = spawn_app().await;
    let status = records(&app)
        .await
        .get_nutrition_record(get("u", "r1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("SPIKE_APPLICATION_ID"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn invalid_requests_never_reach_spike() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    let mut client = records(&app).await;
    let too_big = vec![0u8; 10 * 1024 * 1024 / 4 * 3 + 1];
    let mut failures = vec![
        client
            .get_nutrition_record(get("", "r1"))
            .await
            .unwrap_err(),
        client
            .get_nutrition_record(get("has space", "r1"))
            .await
            .unwrap_err(),
        client
            .get_nutrition_record(get(&"x".repeat(129), "r1"))
            .await
            .unwrap_err(),
        client.get_nutrition_record(get("u", "")).await.unwrap_err(),
        client
            .get_nutrition_record(get("u", "../admin"))
            .await
            .unwrap_err(),
        client.upload_nutrition_image(image(b"")).await.unwrap_err(),
        client
            .upload_nutrition_image(image(&too_big))
            .await
            .unwrap_err(),
        client
            .upload_nutrition_image(UploadNutritionImageRequest {
                await_result: true,
                wait_on_process: Some(true),
                ..image(b"x")
            })
            .await
            .unwrap_err(),
    ];
    for (keys, names) in [
        (
            vec!["Energy_kcal".to_owned()],
            "include_nutrition_fields[0]",
        ),
        (
            vec!["protein_g".to_owned(), String::new()],
            "include_nutrition_fields[1]",
        ),
        (vec!["protein_g".to_owned(); 65], "at most 64"),
    ] {
        let status = client
            .upload_nutrition_image(UploadNutritionImageRequest {
                include_nutrition_fields: keys,
                ..image(b"x")
            })
            .await
            .unwrap_err();
        assert!(status.message().contains(names), "{status:?}");
        failures.push(status);
    }
    failures.push(
        client
            .upload_lab_report(UploadLabReportRequest {
                application_user_id: "u".into(),
                document: b"%PDF".to_vec(),
                mime_type: "text/plain".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    for (from, to) in [(ts(10), ts(5)), (None, ts(5)), (ts(1), None)] {
        failures.push(
            client
                .list_nutrition_records(ListNutritionRecordsRequest {
                    application_user_id: "u".into(),
                    from_timestamp: from,
                    to_timestamp: to,
                })
                .await
                .unwrap_err(),
        );
    }
    for status in &failures {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert!(
        fake.requests().is_empty(),
        "nothing sent: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn the_upload_body_is_the_exact_bytes_in_base64_with_the_options() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    // Every byte value, and large: 7 MiB raw is ~9.3 MiB encoded, under the 10 MiB limit.
    let bytes: Vec<u8> = (0..7 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let result = records(&app)
        .await
        .upload_nutrition_image(UploadNutritionImageRequest {
            include_ingredients: Some(true),
            include_nutri_score: Some(false),
            analysis_mode: "precise".into(),
            country_code: "DE".into(),
            language_code: "de".into(),
            consumed_at: Some(Timestamp {
                seconds: 1_757_932_204,
                nanos: 0,
            }),
            ..image(&bytes)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(result.dish_name, "from-upload");
    assert_eq!(result.status(), RecordStatus::Completed);

    let upload = &fake.data_requests()[0];
    assert_eq!(upload.path, "/nutrition_records/image");
    let sent = base64::engine::general_purpose::STANDARD
        .decode(upload.body["body"].as_str().unwrap())
        .unwrap();
    assert!(sent == bytes, "the decoded body is the input");
    assert_eq!(upload.body["include_ingredients"], true);
    assert_eq!(upload.body["include_nutri_score"], false);
    assert_eq!(upload.body["analysis_mode"], "precise");
    assert_eq!(upload.body["country_code"], "DE");
    assert_eq!(upload.body["language_code"], "de");
    assert_eq!(upload.body["consumed_at"], "2025-09-15T10:30:04Z");
    assert!(
        upload.body.get("include_dish_description").is_none(),
        "unset options are omitted"
    );
}

#[tokio::test]
async fn include_nutrition_fields_reach_spike_as_an_array_only_when_given() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    let mut client = records(&app).await;
    client
        .upload_nutrition_image(UploadNutritionImageRequest {
            include_nutrition_fields: vec!["energy_kcal".into(), "protein_g".into()],
            ..image(b"meal")
        })
        .await
        .unwrap();
    client.upload_nutrition_image(image(b"meal")).await.unwrap();

    let uploads = fake.data_requests();
    assert_eq!(
        uploads[0].body["include_nutrition_fields"],
        json!(["energy_kcal", "protein_g"])
    );
    assert!(
        uploads[1].body.get("include_nutrition_fields").is_none(),
        "empty is omitted, so Spike applies its default fields: {}",
        uploads[1].body
    );
}

#[tokio::test]
async fn lab_uploads_unwrap_the_lab_report_and_look_ups_are_flat() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    let mut client = records(&app).await;
    let uploaded = client
        .upload_lab_report(UploadLabReportRequest {
            application_user_id: "u".into(),
            document: b"%PDF-1.7".to_vec(),
            mime_type: "application/pdf".into(),
            filename: "blood.pdf".into(),
            wait_on_process: Some(true),
            await_result: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uploaded.record_id, "lab-1");
    assert_eq!(uploaded.sections[0].results[0].value, Some(7.2));
    let sent = &fake.data_requests()[0];
    assert_eq!(sent.body["mime_type"], "application/pdf");
    assert_eq!(sent.body["filename"], "blood.pdf");
    assert_eq!(sent.body["wait_on_process"], true);
    assert_eq!(sent.body["body"], "JVBERi0xLjc=");

    let report = client
        .get_lab_report(GetLabReportRequest {
            application_user_id: "u".into(),
            record_id: "lab-7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (report.record_id.as_str(), report.collection_date.as_str()),
        ("lab-7", "2024-01-15")
    );
}

#[tokio::test]
async fn lists_pass_the_range_and_map_every_record() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    let mut client = records(&app).await;
    let meals = client
        .list_nutrition_records(ListNutritionRecordsRequest {
            application_user_id: "u".into(),
            from_timestamp: ts(1_735_689_600),
            to_timestamp: Some(Timestamp {
                seconds: 1_735_776_000,
                nanos: 500_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let summary: Vec<_> = meals
        .iter()
        .map(|m| (m.record_id.as_str(), m.status()))
        .collect();
    assert_eq!(
        summary,
        [
            ("n1", RecordStatus::Completed),
            ("n2", RecordStatus::Failed)
        ]
    );
    let query = fake.data_requests()[0].query.clone().unwrap();
    assert_eq!(
        query,
        "from_timestamp=2025-01-01T00%3A00%3A00Z&to_timestamp=2025-01-02T00%3A00%3A00.500Z"
    );

    let labs = client
        .list_lab_reports(ListLabReportsRequest {
            application_user_id: "u".into(),
            from_timestamp: ts(0),
            to_timestamp: ts(1),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(labs.len(), 1);
    assert_eq!(fake.data_requests()[1].path, "/lab_reports");
}

fn completed_meal_webhook(app: &TestApp, record_id: &str, dish: &str) -> (String, Vec<u8>, String) {
    let body = serde_json::to_vec(&json!({
        "application_user_id": "user-1",
        "record_id": record_id,
        "status": "completed",
        "dish_name": dish,
        "nutritional_fields": {"energy_kcal": 410},
        "modified_at": "2025-09-15T10:31:00Z",
    }))
    .unwrap();
    let signature = sign(KEY, &body);
    (app.url(NUTRITION), body, signature)
}

#[tokio::test]
async fn await_result_answers_with_the_webhooks_result() {
    let fake = FakeSpike::start().await;
    fake.script(
        "POST /nutrition_records/image",
        vec![Scripted::new(
            200,
            nutrition_record("meal-1", "pending", ""),
        )],
    );
    let app = gateway_for(&fake).await;
    let call = {
        let mut client = records(&app).await;
        tokio::spawn(async move {
            client
                .upload_nutrition_image(UploadNutritionImageRequest {
                    await_result: true,
                    ..image(b"jpeg")
                })
                .await
        })
    };
    // Wait for the upload to reach Spike, then deliver the webhook as Spike would.
    wait_until(
        Duration::from_secs(10),
        "the upload reaches Spike",
        async || !fake.data_requests().is_empty(),
    )
    .await;
    let (url, body, signature) = completed_meal_webhook(&app, "meal-1", "from-webhook");
    let status = app
        .client
        .post(url)
        .header("X-Body-Signature", signature)
        .body(body)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200);

    let result = call.await.unwrap().unwrap().into_inner();
    assert_eq!(
        (result.dish_name.as_str(), result.status()),
        ("from-webhook", RecordStatus::Completed)
    );
    assert_eq!(result.nutritional_fields["energy_kcal"], 410.0);
    assert_eq!(
        fake.data_requests()[0].body["wait_on_process"],
        false,
        "uploaded asynchronously"
    );
    assert_eq!(fake.data_requests().len(), 1, "no polling of Spike");
}

#[tokio::test]
async fn await_result_sees_a_webhook_that_beats_the_upload_answer() {
    let fake = FakeSpike::start().await;
    let app = gateway_for(&fake).await;
    let mut pending = Scripted::new(200, nutrition_record("meal-2", "pending", ""));
    pending.webhook_first = Some(completed_meal_webhook(&app, "meal-2", "early-webhook"));
    fake.script("POST /nutrition_records/image", vec![pending]);
    let result = records(&app)
        .await
        .upload_nutrition_image(UploadNutritionImageRequest {
            await_result: true,
            ..image(b"jpeg")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(result.dish_name, "early-webhook");
}

#[tokio::test]
async fn await_result_falls_back_to_one_look_up_near_the_deadline() {
    let fake = FakeSpike::start().await;
    fake.script(
        "POST /lab_reports",
        vec![Scripted::new(
            200,
            json!({"lab_report": lab_report("lab-9", "processing")}),
        )],
    );
    let app = gateway_for(&fake).await;
    let started = Instant::now();
    let result = records(&app)
        .await
        .upload_lab_report(with_deadline(
            UploadLabReportRequest {
                application_user_id: "u".into(),
                document: b"%PDF".to_vec(),
                mime_type: "application/pdf".into(),
                await_result: true,
                ..Default::default()
            },
            Duration::from_millis(1500),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(
        (result.record_id.as_str(), result.status()),
        ("lab-9", RecordStatus::Completed)
    );
    let paths: Vec<_> = fake
        .data_requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, ["/lab_reports", "/lab_reports/lab-9"]);
}
