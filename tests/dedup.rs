//! Spike's redeliveries produce no duplicate events (SPEC §2.4), also across a restart.

mod support;

use std::sync::Arc;

use support::*;

async fn counts(response: reqwest::Response) -> (u64, u64) {
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    (
        body["appended"].as_u64().unwrap(),
        body["duplicates"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn the_same_bytes_again_are_acknowledged_and_not_appended() {
    let app = spawn_app().await;
    for (name, path) in SAMPLES {
        let body = fixture(name);
        let (appended, _) = counts(app.post(path, &body).await).await;
        assert!(appended >= 1, "{name}");
        let (appended, duplicates) = counts(app.post(path, &body).await).await;
        assert_eq!((appended, duplicates > 0), (0, true), "{name} redelivered");
    }
    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    take(&mut stream, 11).await;
    assert_quiet(&mut stream).await;
}

#[tokio::test]
async fn an_item_inside_another_batch_is_recognised() {
    let app = spawn_app().await;
    let batch: Vec<serde_json::Value> =
        serde_json::from_slice(&fixture("main-batch.json")).unwrap();
    assert_eq!(
        counts(app.post(MAIN, &fixture("main-batch.json")).await).await,
        (2, 0)
    );

    // Re-batched with a new item, re-serialized differently (other key order, spacing).
    let rebatched = serde_json::json!([record_change("new-user", 7), batch[1]]);
    let pretty = serde_json::to_vec_pretty(&rebatched).unwrap();
    assert_eq!(counts(app.post(MAIN, &pretty).await).await, (1, 1));

    // The first item alone, as a single object.
    assert_eq!(counts(app.post_json(MAIN, &batch[0]).await).await, (0, 1));

    // Twice within one request: one event.
    let twice = serde_json::json!([record_change("x", 1), record_change("x", 1)]);
    assert_eq!(counts(app.post_json(MAIN, &twice).await).await, (1, 1));
}

#[tokio::test]
async fn a_result_update_is_a_new_event() {
    let app = spawn_app().await;
    let mut report: serde_json::Value =
        serde_json::from_slice(&fixture("lab-report-completed.json")).unwrap();
    assert_eq!(counts(app.post_json(LAB, &report).await).await, (1, 0));
    report["modified_at"] = "2024-01-16T08:00:00.000Z".into();
    assert_eq!(counts(app.post_json(LAB, &report).await).await, (1, 0));
}

#[tokio::test]
async fn dedup_survives_a_restart() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut first = spawn_app_in(dir.clone(), &[]).await;
    assert_eq!(
        counts(first.post(MAIN, &fixture("main-batch.json")).await).await,
        (2, 0)
    );
    first.stop().await;
    drop(first);

    let second = spawn_app_in(dir, &[]).await;
    assert_eq!(
        counts(second.post(MAIN, &fixture("main-batch.json")).await).await,
        (0, 2)
    );
    assert_eq!(
        counts(second.post(LAB, &fixture("lab-report-failed.json")).await).await,
        (1, 0)
    );
    // Sequences continue where the first process stopped.
    let mut stream = second.subscribe(from_beginning()).await.unwrap();
    let sequences: Vec<u64> = take(&mut stream, 3)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, [1, 2, 3]);
}

/// Distinct deliveries that an id from selected fields merged (issue 10): each is its own
/// event, and each redelivered is a duplicate.
#[tokio::test]
async fn deliveries_that_differ_in_any_field_are_distinct_events() {
    let app = spawn_app().await;
    let same_timestamp = serde_json::json!([
        {"application_user_id": "u", "event_type": "record_change", "provider_slug": "garmin",
         "timestamp": "2025-04-15T13:33:55.271331177Z", "metrics": ["steps"]},
        {"application_user_id": "u", "event_type": "record_change", "provider_slug": "garmin",
         "timestamp": "2025-04-15T13:33:55.271331177Z", "metrics": ["distance"]},
    ]);
    let no_timestamp = serde_json::json!([
        {"user_id": "u", "event_type": "record_change", "provider_slug": "oura", "data_types": ["sleep"]},
        {"user_id": "u", "event_type": "record_change", "provider_slug": "oura", "data_types": ["hrv"]},
    ]);
    let mut report: serde_json::Value =
        serde_json::from_slice(&fixture("lab-report-completed.json")).unwrap();
    let mut corrected = report.clone();
    corrected["sections"][0]["results"][0]["value"] = 7.3.into();
    let mut meal: serde_json::Value =
        serde_json::from_slice(&fixture("nutrition-completed.json")).unwrap();
    let mut renamed = meal.clone();
    renamed["dish_name"] = "grilled chicken salad".into();
    let deliveries = [
        (MAIN, same_timestamp, 2),
        (MAIN, no_timestamp, 2),
        (LAB, report.take(), 1),
        (LAB, corrected, 1),
        (NUTRITION, meal.take(), 1),
        (NUTRITION, renamed, 1),
    ];
    for (path, body, events) in &deliveries {
        assert_eq!(
            counts(app.post_json(path, body).await).await,
            (*events, 0),
            "{body}"
        );
    }
    for (path, body, events) in &deliveries {
        let pretty = serde_json::to_vec_pretty(body).unwrap();
        assert_eq!(
            counts(app.post(path, &pretty).await).await,
            (0, *events),
            "again: {body}"
        );
    }
    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    take(&mut stream, 8).await;
    assert_quiet(&mut stream).await;
}
