//! Normalization shape by shape (SPEC §2.3 → §3), on the bundled samples.

use std::path::PathBuf;

use prost_types::Timestamp;
use serde_json::value::RawValue;
use spike_gateway::{
    proto::{Event, EventType, IntegrationAction, RecordStatus, WebhookCategory, event::Payload},
    wire::{LegacyIds, normalize, split},
};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

const RECEIVED: Timestamp = Timestamp {
    seconds: 1_800_000_000,
    nanos: 7,
};

fn ts(text: &str) -> Option<Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(text).unwrap();
    Some(Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

/// All events of a body posted on `path`.
fn events_of(body: &str, path: WebhookCategory) -> Vec<Event> {
    split(body.as_bytes())
        .unwrap()
        .into_iter()
        .map(|raw| {
            normalize(raw, path, RECEIVED, LegacyIds::Compute)
                .expect("usable")
                .event
        })
        .collect()
}

fn one(name: &str, path: WebhookCategory) -> Event {
    let mut events = events_of(&fixture(name), path);
    assert_eq!(events.len(), 1);
    events.remove(0)
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap()
}

#[test]
fn main_batch_becomes_one_record_change_per_item() {
    let events = events_of(&fixture("main-batch.json"), WebhookCategory::Main);
    assert_eq!(events.len(), 2);
    let first = &events[0];
    assert_eq!(first.r#type(), EventType::RecordChange);
    assert_eq!(first.category(), WebhookCategory::Main);
    assert_eq!(first.application_user_id, "User1");
    assert_eq!(first.received_at, Some(RECEIVED));
    assert_eq!(
        first.occurred_at,
        Some(Timestamp {
            seconds: 1_744_724_035,
            nanos: 271_331_177
        })
    );
    let Some(Payload::RecordChange(change)) = &first.payload else {
        panic!()
    };
    assert_eq!(change.provider_slug, "garmin");
    assert_eq!(
        change.metrics,
        ["calories_burned_active", "distance", "steps"]
    );
    assert_eq!(change.activity_types, ["sedentary", "walking"]);
    assert!(change.data_types.is_empty());
    assert_eq!(change.earliest_record_start_at, ts("2025-04-15T09:30:00Z"));
    assert_eq!(change.latest_record_end_at, ts("2025-04-15T13:33:00Z"));
    assert_eq!(events[1].application_user_id, "User2");
    assert_ne!(events[0].event_id, events[1].event_id);
    // raw_json is the item's own bytes, not the batch's.
    let item: serde_json::Value = serde_json::from_slice(&events[1].raw_json).unwrap();
    assert_eq!(item["application_user_id"], "User2");
}

#[test]
fn single_record_change_maps_start_and_end_dates() {
    let event = one("main-record-change.json", WebhookCategory::Main);
    assert_eq!(event.application_user_id, "user_xyz789", "from user_id");
    assert_eq!(event.occurred_at, ts("2026-02-27T08:30:00Z"));
    let Some(Payload::RecordChange(change)) = &event.payload else {
        panic!()
    };
    assert_eq!(change.provider_slug, "whoop");
    assert_eq!(change.customer_id, "cust_abc123");
    assert_eq!(change.data_types, ["sleep", "recovery", "heart_rate"]);
    assert_eq!(change.earliest_record_start_at, ts("2026-02-26T22:00:00Z"));
    assert_eq!(change.latest_record_end_at, ts("2026-02-27T06:30:00Z"));
}

#[test]
fn provider_integrations_carry_their_action() {
    for (name, r#type, action, at) in [
        (
            "main-provider-integration-created.json",
            EventType::ProviderIntegrationCreated,
            IntegrationAction::Created,
            "2026-02-27T10:15:00Z",
        ),
        (
            "main-provider-integration-deleted.json",
            EventType::ProviderIntegrationDeleted,
            IntegrationAction::Deleted,
            "2026-02-27T14:00:00Z",
        ),
    ] {
        let event = one(name, WebhookCategory::Main);
        assert_eq!(event.r#type(), r#type);
        assert_eq!(event.application_user_id, "user_xyz789");
        assert_eq!(event.occurred_at, ts(at));
        let Some(Payload::ProviderIntegration(integration)) = &event.payload else {
            panic!()
        };
        assert_eq!(integration.action(), action);
        assert_eq!(integration.provider_slug, "oura");
        assert_eq!(integration.customer_id, "cust_abc123");
    }
}

#[test]
fn flat_completed_lab_report_keeps_every_field() {
    let event = one("lab-report-completed.json", WebhookCategory::LabReports);
    assert_eq!(event.r#type(), EventType::LabReportCompleted);
    assert_eq!(event.category(), WebhookCategory::LabReports);
    assert_eq!(event.application_user_id, "end_user_id1");
    assert_eq!(
        event.occurred_at,
        ts("2024-01-15T10:30:12.132Z"),
        "modified_at"
    );
    let Some(Payload::LabReportResult(lab)) = &event.payload else {
        panic!()
    };
    assert_eq!(lab.record_id, "6ba7b810-9dad-11d1-80b4-00c04fd430c8");
    assert_eq!(lab.status(), RecordStatus::Completed);
    assert_eq!(
        (lab.collection_date.as_str(), lab.result_date.as_str()),
        ("2024-01-15", "2024-01-16")
    );
    assert_eq!(lab.uploaded_at, ts("2024-01-15T10:30:04.521Z"));
    assert_eq!(lab.modified_at, ts("2024-01-15T10:30:12.132Z"));
    let section = &lab.sections[0];
    assert_eq!(section.loinc_code, "58410-2");
    assert_eq!(
        section.loinc_common_name,
        "CBC panel - Blood by Automated count"
    );
    assert_eq!(section.original_section_name, "HEMATOLOGY");
    let result = &section.results[0];
    assert_eq!(result.loinc_code, "6690-2");
    assert_eq!(result.loinc_common_name, "Leukocytes [#/volume] in Blood");
    assert_eq!(result.original_test_name, "White Blood Count");
    assert_eq!(
        (
            result.original_unit_name.as_str(),
            result.standard_unit_name.as_str()
        ),
        ("K/uL", "K/uL")
    );
    assert_eq!(result.value, Some(7.2));
    assert_eq!(result.within_normal_range, Some(true));
    assert_eq!((result.normal_min, result.normal_max), (None, None));
}

#[test]
fn flat_failed_lab_report_keeps_the_parsing_error() {
    let event = one("lab-report-failed.json", WebhookCategory::LabReports);
    assert_eq!(event.r#type(), EventType::LabReportFailed);
    let Some(Payload::LabReportResult(lab)) = &event.payload else {
        panic!()
    };
    assert_eq!(lab.status(), RecordStatus::Failed);
    assert_eq!(lab.parsing_error, "document is not a lab report");
    assert!(lab.sections.is_empty());
}

#[test]
fn enveloped_lab_report_reads_report_id_and_data() {
    let event = one("lab-report-enveloped.json", WebhookCategory::LabReports);
    assert_eq!(event.r#type(), EventType::LabReportCompleted);
    assert_eq!(event.application_user_id, "end_user_id2");
    assert_eq!(
        event.occurred_at,
        Some(RECEIVED),
        "no modified_at or uploaded_at"
    );
    let Some(Payload::LabReportResult(lab)) = &event.payload else {
        panic!()
    };
    assert_eq!(lab.record_id, "5f0c2a8e-3b1d-4e7a-9f61-0c2d8e4b7a93");
    assert_eq!(lab.collection_date, "2024-02-01");
    assert_eq!(lab.sections[0].original_section_name, "CHEMISTRY");
    assert_eq!(
        lab.sections[0].results[0].value,
        Some(92.0),
        "an integer value"
    );

    let failed = events_of(
        r#"{"event_type":"lab_report_failed","report_id":"r1","error":"bad scan"}"#,
        WebhookCategory::LabReports,
    );
    let Some(Payload::LabReportResult(lab)) = &failed[0].payload else {
        panic!()
    };
    assert_eq!(
        (lab.status(), lab.parsing_error.as_str()),
        (RecordStatus::Failed, "bad scan")
    );
}

#[test]
fn flat_completed_nutrition_record_keeps_every_field() {
    let event = one(
        "nutrition-completed.json",
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(event.r#type(), EventType::NutritionRecordCompleted);
    assert_eq!(event.category(), WebhookCategory::NutritionRecords);
    let Some(Payload::NutritionResult(meal)) = &event.payload else {
        panic!()
    };
    assert_eq!(meal.record_id, "6ba7b810-9dad-11d1-80b4-00c04fd430c8");
    assert_eq!(meal.status(), RecordStatus::Completed);
    assert_eq!(meal.dish_name, "grilled chicken caesar salad");
    assert!(meal.dish_description.starts_with("chicken breast, grilled"));
    assert_eq!(meal.nutri_score, "B");
    assert_eq!((meal.serving_size, meal.unit.as_str()), (Some(275.0), "g"));
    let fields: Vec<(&str, f64)> = meal
        .nutritional_fields
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        fields,
        [
            ("carbohydrate_g", 4.3),
            ("energy_kcal", 292.0),
            ("fat_total_g", 10.9),
            ("fiber_total_dietary_g", 2.1),
            ("protein_g", 42.2)
        ]
    );
    let ingredient = &meal.ingredients[0];
    assert_eq!(ingredient.name, "chicken breast, grilled");
    assert_eq!(
        (ingredient.serving_size, ingredient.unit.as_str()),
        (Some(150.0), "g")
    );
    assert_eq!(ingredient.nutritional_fields["protein_g"], 31.0);
    assert_eq!(ingredient.nutritional_fields.len(), 5);
    assert_eq!(meal.uploaded_at, ts("2025-09-15T10:30:04.521Z"));
    assert_eq!(meal.modified_at, ts("2025-09-15T10:30:12.132Z"));
    assert_eq!(meal.consumed_at, ts("2025-09-15T10:30:04Z"));
    assert_eq!(event.occurred_at, meal.modified_at);
}

#[test]
fn failed_and_enveloped_nutrition_records() {
    let failed = one("nutrition-failed.json", WebhookCategory::NutritionRecords);
    assert_eq!(failed.r#type(), EventType::NutritionRecordFailed);
    let Some(Payload::NutritionResult(meal)) = &failed.payload else {
        panic!()
    };
    assert_eq!(meal.failure_reason, "Unable to identify food items");

    let enveloped = one(
        "nutrition-enveloped.json",
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(enveloped.application_user_id, "end_user_id3");
    let Some(Payload::NutritionResult(meal)) = &enveloped.payload else {
        panic!()
    };
    assert_eq!(meal.record_id, "0e7a4c8b-61f2-4d3a-8b95-7c1e2f3a4b5c");
    assert_eq!(
        (meal.dish_name.as_str(), meal.nutri_score.as_str()),
        ("oatmeal with blueberries", "A")
    );
    assert_eq!(
        meal.nutritional_fields["carbohydrate_g"], 54.0,
        "from totals"
    );
    assert_eq!(meal.nutritional_fields.len(), 4);
}

#[test]
fn event_ids_are_stable_and_follow_the_content() {
    let body = fixture("lab-report-completed.json");
    let id = |json: &str| {
        normalize(
            &raw(json),
            WebhookCategory::LabReports,
            RECEIVED,
            LegacyIds::Compute,
        )
        .unwrap()
        .event
        .event_id
    };
    assert_eq!(id(&body), id(&body));
    let reformatted =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&body).unwrap())
            .unwrap();
    assert_eq!(id(&body), id(&reformatted));
    assert_ne!(
        id(&body),
        id(&body.replace("10:30:12.132Z", "11:00:00.000Z")),
        "an update is a new event"
    );

    let batch = events_of(&fixture("main-batch.json"), WebhookCategory::Main);
    let item = serde_json::from_str::<Vec<serde_json::Value>>(&fixture("main-batch.json")).unwrap()
        [1]
    .to_string();
    let alone = events_of(&item, WebhookCategory::Main);
    assert_eq!(
        batch[1].event_id, alone[0].event_id,
        "same item alone or in a batch"
    );
}

#[test]
fn content_beats_the_path() {
    let normalized = normalize(
        &raw(&fixture("lab-report-completed.json")),
        WebhookCategory::NutritionRecords,
        RECEIVED,
        LegacyIds::Compute,
    )
    .unwrap();
    assert!(normalized.reclassified);
    assert_eq!(normalized.event.category(), WebhookCategory::LabReports);
    let on_main = normalize(
        &raw(&fixture("nutrition-completed.json")),
        WebhookCategory::Main,
        RECEIVED,
        LegacyIds::Compute,
    )
    .unwrap();
    assert!(
        !on_main.reclassified,
        "the main path accepts every category"
    );
}

#[test]
fn lenient_fields_and_free_form_objects_are_kept() {
    let lab = r#"{"record_id":"r","status":"completed","lab_information":{"name":"Lab A","accredited":true},
        "notes":"fasting","sections":[{"results":[{"value":"positive","normal_min":1,"normal_max":2.5},{"value":"5.5"}]}],
        "surprise":{"ignored":[1,2]}}"#;
    let event = events_of(lab, WebhookCategory::LabReports).remove(0);
    let Some(Payload::LabReportResult(report)) = &event.payload else {
        panic!()
    };
    let info = report.lab_information.as_ref().unwrap();
    assert_eq!(info.fields.len(), 2);
    assert_eq!(report.notes, "fasting");
    let results = &report.sections[0].results;
    assert_eq!(
        (results[0].value, results[0].value_text.as_str()),
        (None, "positive")
    );
    assert_eq!(
        (results[0].normal_min, results[0].normal_max),
        (Some(1.0), Some(2.5))
    );
    assert_eq!(
        (results[1].value, results[1].value_text.as_str()),
        (Some(5.5), "5.5")
    );
}

#[test]
fn unusable_items_say_why() {
    for (json, path) in [
        (
            r#"{"status":"completed","sections":[]}"#,
            WebhookCategory::LabReports,
        ),
        (
            r#"{"event_type":"record_change","timestamp":"2025-01-01T00:00:00Z"}"#,
            WebhookCategory::Main,
        ),
        (
            r#"{"event_type":"sleep_changed","user_id":"u"}"#,
            WebhookCategory::Main,
        ),
        (
            r#"{"record_id":"r","status":"bogus","dish_name":"x"}"#,
            WebhookCategory::NutritionRecords,
        ),
        (
            r#"{"record_id":"r","status":"processing","sections":[]}"#,
            WebhookCategory::LabReports,
        ),
        (r#"{"record_id":"r"}"#, WebhookCategory::Main),
        (
            r#"{"record_id":{"not":"an id"},"dish_name":"x"}"#,
            WebhookCategory::NutritionRecords,
        ),
        (
            r#"{"event_type":"record_change","user_id":[1]}"#,
            WebhookCategory::Main,
        ),
    ] {
        let err = normalize(&raw(json), path, RECEIVED, LegacyIds::Compute).unwrap_err();
        assert!(!err.detail.is_empty(), "{json}");
    }
}

/// The one event of `json` on `path`, which must not be a dead letter.
fn lenient(json: &str, path: WebhookCategory) -> Event {
    let event = normalize(&raw(json), path, RECEIVED, LegacyIds::Compute)
        .unwrap_or_else(|e| panic!("a dead letter: {e}: {json}"))
        .event;
    assert_eq!(event.raw_json, json.as_bytes(), "raw_json stays as sent");
    event
}

fn meal(event: &Event) -> &spike_gateway::proto::NutritionResult {
    let Some(Payload::NutritionResult(meal)) = &event.payload else {
        panic!("{event:?}")
    };
    meal
}

fn lab(event: &Event) -> &spike_gateway::proto::LabReportResult {
    let Some(Payload::LabReportResult(lab)) = &event.payload else {
        panic!("{event:?}")
    };
    lab
}

#[test]
fn a_numeric_string_reads_as_the_number() {
    let event = lenient(
        r#"{"record_id":"r","dish_name":"soup","serving_size":"275","nutritional_fields":{"energy_kcal":"292.5"}}"#,
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(meal(&event).serving_size, Some(275.0));
    assert_eq!(meal(&event).nutritional_fields["energy_kcal"], 292.5);
    assert!(
        event.unparsed_fields.is_empty(),
        "{:?}",
        event.unparsed_fields
    );
}

#[test]
fn a_number_beyond_f64_is_unset_and_listed_by_its_path() {
    let event = lenient(
        r#"{"record_id":"r","status":"completed","sections":[{"results":[{"value":1},{"value":2},{"value":1e400,"loinc_code":"x"}]}]}"#,
        WebhookCategory::LabReports,
    );
    let results = &lab(&event).sections[0].results;
    assert_eq!(results.len(), 3);
    assert_eq!(
        (results[2].value, results[2].loinc_code.as_str()),
        (None, "x")
    );
    assert_eq!(event.unparsed_fields, ["sections[0].results[2].value"]);
}

#[test]
fn metrics_sent_as_a_string_are_unset_and_listed() {
    let event = lenient(
        r#"{"event_type":"record_change","user_id":"u","provider_slug":"oura","metrics":"steps"}"#,
        WebhookCategory::Main,
    );
    let Some(Payload::RecordChange(change)) = &event.payload else {
        panic!()
    };
    assert!(change.metrics.is_empty());
    assert_eq!(change.provider_slug, "oura");
    assert_eq!(event.unparsed_fields, ["metrics"]);
}

#[test]
fn an_object_where_a_list_belongs_is_unset_and_listed() {
    let event = lenient(
        r#"{"record_id":"r","dish_name":"soup","ingredients":{"name":"leek"},"nutritional_fields":[1]}"#,
        WebhookCategory::NutritionRecords,
    );
    assert!(meal(&event).ingredients.is_empty());
    assert!(meal(&event).nutritional_fields.is_empty());
    assert_eq!(event.unparsed_fields, ["ingredients", "nutritional_fields"]);
}

#[test]
fn an_amount_that_is_not_a_finite_number_is_dropped_and_listed() {
    let event = lenient(
        r#"{"record_id":"r","dish_name":"soup","nutritional_fields":{"energy_kcal":1e999,"protein_g":3,"fat_total_g":"lots","fiber_g":null}}"#,
        WebhookCategory::NutritionRecords,
    );
    let fields = &meal(&event).nutritional_fields;
    assert_eq!(fields.len(), 1);
    assert_eq!(fields["protein_g"], 3.0);
    assert_eq!(
        event.unparsed_fields,
        [
            "nutritional_fields.energy_kcal",
            "nutritional_fields.fat_total_g"
        ],
        "null is an unknown amount, not an unparsed one"
    );
}

#[test]
fn an_enveloped_field_is_listed_under_data() {
    let event = lenient(
        r#"{"event_type":"nutrition_record_completed","record_id":"r","data":{"dish_name":"soup","serving_size":{"g":3},"totals":{"energy_kcal":5}}}"#,
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(meal(&event).serving_size, None);
    assert_eq!(meal(&event).nutritional_fields["energy_kcal"], 5.0);
    assert_eq!(event.unparsed_fields, ["data.serving_size"]);
}

#[test]
fn a_lone_surrogate_reads_as_a_replacement_character() {
    let event = lenient(
        r#"{"record_id":"r","dish_name":"caf\ud800 au lait","nutri_score":"\u0042"}"#,
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(meal(&event).dish_name, "caf\u{fffd} au lait");
    assert_eq!(meal(&event).nutri_score, "B");
    assert!(event.unparsed_fields.is_empty());
}

#[test]
fn the_last_duplicated_key_wins() {
    let event = lenient(
        r#"{"record_id":"r","dish_name":"first","serving_size":1,"dish_name":"last","serving_size":2}"#,
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(meal(&event).dish_name, "last");
    assert_eq!(meal(&event).serving_size, Some(2.0));
}

#[test]
fn an_unreadable_time_is_unset_and_listed() {
    let event = lenient(
        r#"{"record_id":"r","dish_name":"soup","uploaded_at":"2025-09-15T10:30:04Z","modified_at":"last tuesday"}"#,
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(meal(&event).modified_at, None);
    assert_eq!(
        event.occurred_at,
        ts("2025-09-15T10:30:04Z"),
        "uploaded_at instead"
    );
    assert_eq!(event.unparsed_fields, ["modified_at"]);
}

#[test]
fn numeric_ids_are_read_as_their_text() {
    let event = lenient(
        r#"{"event_type":"record_change","user_id":4242,"customer_id":17}"#,
        WebhookCategory::Main,
    );
    assert_eq!(event.application_user_id, "4242");
    let event = lenient(
        r#"{"record_id":12,"application_user_id":"u","dish_name":"soup"}"#,
        WebhookCategory::NutritionRecords,
    );
    assert_eq!(meal(&event).record_id, "12");
}

#[test]
fn only_a_missing_or_unusable_required_field_makes_a_dead_letter() {
    use spike_gateway::wire::Reason;
    for (json, path, reason) in [
        (
            r#"{"event_type":"record_change","user_id":{"id":"u"},"metrics":"x"}"#,
            WebhookCategory::Main,
            Reason::MissingUserId,
        ),
        (
            r#"{"record_id":["r"],"dish_name":"soup"}"#,
            WebhookCategory::NutritionRecords,
            Reason::MissingRecordId,
        ),
        (
            r#"{"report_id":null,"sections":[]}"#,
            WebhookCategory::LabReports,
            Reason::MissingRecordId,
        ),
        (
            r#"{"event_type":7,"user_id":"u"}"#,
            WebhookCategory::Main,
            Reason::Unclassifiable,
        ),
    ] {
        assert_eq!(
            normalize(&raw(json), path, RECEIVED, LegacyIds::Compute)
                .unwrap_err()
                .reason,
            reason,
            "{json}"
        );
    }
}
