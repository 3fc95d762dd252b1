//! Event identity (SPEC §2.4), pinned: the literal ids of every sample, so that a refactor
//! cannot silently turn Spike's redeliveries into new events.

use prost_types::Timestamp;
use spike_gateway::{
    proto::WebhookCategory,
    wire::{LegacyIds, Normalized, normalize, split},
};

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// Every event of a sample, posted on the path its file name says.
fn normalized(name: &str) -> Vec<Normalized> {
    let path = if name.starts_with("main-") {
        WebhookCategory::Main
    } else if name.starts_with("lab-report-") {
        WebhookCategory::LabReports
    } else {
        WebhookCategory::NutritionRecords
    };
    let body = fixture(name);
    split(&body)
        .unwrap()
        .into_iter()
        .map(|raw| normalize(raw, path, Timestamp::default(), LegacyIds::Compute).expect("usable"))
        .collect()
}

/// The ids the 0.1 release stored for the samples (all found in
/// tests/fixtures/legacy-0.1-data/events.redb). Never change these: they are what
/// a data directory written by 0.1 holds.
const LEGACY_IDS: [(&str, &[&str]); 10] = [
    (
        "lab-report-completed.json",
        &["lab-989b62d1b48340ab560aff1ce5cb5509"],
    ),
    (
        "lab-report-enveloped.json",
        &["lab-json-5da12f80bd40f2576de28fc16528cd86"],
    ),
    (
        "lab-report-failed.json",
        &["lab-010634a0395fa75916091258842740c3"],
    ),
    (
        "main-batch.json",
        &[
            "main-a4fc18ddb2c964c793b72cb06807b0e1",
            "main-c82a69bba0572973fe2ba8faf0fb4595",
        ],
    ),
    (
        "main-provider-integration-created.json",
        &["main-5b367f17e8bb5c99897d885d30fd0a88"],
    ),
    (
        "main-provider-integration-deleted.json",
        &["main-bfb4561e808104df65a4a065a3156b8a"],
    ),
    (
        "main-record-change.json",
        &["main-1edf44f8f120615c7a4ea5b6559b4144"],
    ),
    (
        "nutrition-completed.json",
        &["nutrition-31ed7624a31ae0ba10a66b2f66bfd477"],
    ),
    (
        "nutrition-enveloped.json",
        &["nutrition-json-aff34d42f0ef28860be27163aba19a9e"],
    ),
    (
        "nutrition-failed.json",
        &["nutrition-5aa37365a25461ff314b9c7beffffada"],
    ),
];

#[test]
fn the_legacy_id_of_every_sample_is_the_one_0_1_stored() {
    for (name, expected) in LEGACY_IDS {
        let ids: Vec<String> = normalized(name)
            .into_iter()
            .map(|n| n.legacy_event_id.expect("asked for"))
            .collect();
        assert_eq!(ids, expected, "{name}");
    }
}

/// The ids of today's rule: the category and the whole canonical content. Cross-checked
/// against an independent implementation of the canonical form when they were pinned.
const IDS: [(&str, &[&str]); 10] = [
    (
        "lab-report-completed.json",
        &["lab-16554a007ad6dacef7e08f53c0990e7e"],
    ),
    (
        "lab-report-enveloped.json",
        &["lab-34257a0f25f6f9b3a61621d51e80db16"],
    ),
    (
        "lab-report-failed.json",
        &["lab-001c4269011170edf3508d9334c8fb56"],
    ),
    (
        "main-batch.json",
        &[
            "main-3c246ca2a20033529791e03a81a0418b",
            "main-7341e60056770e2682a008b40adc5545",
        ],
    ),
    (
        "main-provider-integration-created.json",
        &["main-af1af71d76fa60bc578864b5376fbe89"],
    ),
    (
        "main-provider-integration-deleted.json",
        &["main-f5942de82bc002b9110e34d0edab7d91"],
    ),
    (
        "main-record-change.json",
        &["main-1a76bf71e24a0081ba5f954d862b6c67"],
    ),
    (
        "nutrition-completed.json",
        &["nutrition-deb760cbd3ba53551f48fb0fc4db0923"],
    ),
    (
        "nutrition-enveloped.json",
        &["nutrition-001d01eab2ca60bdc234fde9f231ef60"],
    ),
    (
        "nutrition-failed.json",
        &["nutrition-fee960108efdddae0c1abe97680f95c7"],
    ),
];

#[test]
fn the_event_id_of_every_sample_is_pinned() {
    for (name, expected) in IDS {
        let ids: Vec<String> = normalized(name)
            .into_iter()
            .map(|n| n.event.event_id)
            .collect();
        assert_eq!(ids, expected, "{name}");
    }
}

/// The event id of each item of `body` posted on `path`.
fn ids(body: &str, path: WebhookCategory) -> Vec<String> {
    split(body.as_bytes())
        .unwrap()
        .into_iter()
        .map(|raw| {
            normalize(raw, path, Timestamp::default(), LegacyIds::Compute)
                .expect("usable")
                .event
                .event_id
        })
        .collect()
}

fn id(body: &str, path: WebhookCategory) -> String {
    let mut ids = ids(body, path);
    assert_eq!(ids.len(), 1);
    ids.remove(0)
}

fn assert_all_distinct(ids: &[String]) {
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{ids:#?}");
}

#[test]
fn record_changes_of_one_batch_with_one_timestamp_and_different_metrics_are_two_events() {
    let batch = r#"[
        {"application_user_id":"u","event_type":"record_change","provider_slug":"garmin",
         "timestamp":"2025-04-15T13:33:55.271331177Z","metrics":["steps"]},
        {"application_user_id":"u","event_type":"record_change","provider_slug":"garmin",
         "timestamp":"2025-04-15T13:33:55.271331177Z","metrics":["distance"]}
    ]"#;
    assert_all_distinct(&ids(batch, WebhookCategory::Main));
}

#[test]
fn items_without_a_timestamp_differ_by_their_content() {
    let batch = r#"[
        {"user_id":"u","event_type":"record_change","provider_slug":"oura","data_types":["sleep"]},
        {"user_id":"u","event_type":"record_change","provider_slug":"oura","data_types":["hrv"]},
        {"user_id":"u","event_type":"provider_integration_created","provider_slug":"oura"},
        {"user_id":"u","event_type":"provider_integration_created","provider_slug":"oura","customer_id":"c"}
    ]"#;
    assert_all_distinct(&ids(batch, WebhookCategory::Main));
}

#[test]
fn a_corrected_result_that_kept_its_modified_at_is_a_new_event() {
    let report = String::from_utf8(fixture("lab-report-completed.json")).unwrap();
    let corrected = report.replace("7.2", "7.3");
    assert_ne!(report, corrected);
    let meal = String::from_utf8(fixture("nutrition-completed.json")).unwrap();
    let renamed = meal.replace("grilled chicken caesar salad", "grilled chicken salad");
    assert_ne!(meal, renamed);
    assert_all_distinct(&[
        id(&report, WebhookCategory::LabReports),
        id(&corrected, WebhookCategory::LabReports),
        id(&meal, WebhookCategory::NutritionRecords),
        id(&renamed, WebhookCategory::NutritionRecords),
    ]);
}

#[test]
fn the_same_item_reformatted_or_in_another_batch_has_the_same_id() {
    let batch = String::from_utf8(fixture("main-batch.json")).unwrap();
    let items: Vec<serde_json::Value> = serde_json::from_str(&batch).unwrap();
    let pinned = ids(&batch, WebhookCategory::Main);
    // Alone, pretty-printed, with keys in another order (serde_json sorts them).
    let alone = serde_json::to_string_pretty(&items[1]).unwrap();
    assert_eq!(id(&alone, WebhookCategory::Main), pinned[1]);
    // In another batch, after a new item.
    let rebatched = format!(
        r#"[{{"user_id":"new","event_type":"record_change"}}, {}]"#,
        items[0]
    );
    assert_eq!(ids(&rebatched, WebhookCategory::Main)[1], pinned[0]);
    // On another path: the category comes from the content, so does the id.
    let report = String::from_utf8(fixture("lab-report-completed.json")).unwrap();
    assert_eq!(
        id(&report, WebhookCategory::Main),
        id(&report, WebhookCategory::LabReports)
    );
}

#[test]
fn numbers_compare_by_value_strings_by_decoded_value_and_the_last_duplicate_wins() {
    let same = [
        r#"{"record_id":"r","status":"completed","dish_name":"A","serving_size":150}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"A","serving_size":150.0}"#,
        r#"{ "serving_size" : 1.5e2 , "dish_name" : "\u0041", "status":"completed", "record_id":"r" }"#,
        r#"{"record_id":"r","status":"completed","dish_name":"B","dish_name":"A","serving_size":15E1}"#,
    ];
    let first = id(same[0], WebhookCategory::NutritionRecords);
    for json in same {
        assert_eq!(id(json, WebhookCategory::NutritionRecords), first, "{json}");
    }
    let different = [
        r#"{"record_id":"r","status":"completed","dish_name":"A","serving_size":151}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"a","serving_size":150}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"A","serving_size":"150"}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"A","serving_size":150,"x":null}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"\ud800","serving_size":150}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"\ufffd","serving_size":150}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"A","serving_size":1e400}"#,
        r#"{"record_id":"r","status":"completed","dish_name":"A","serving_size":1e401}"#,
    ];
    let mut all: Vec<String> = different
        .iter()
        .map(|json| id(json, WebhookCategory::NutritionRecords))
        .collect();
    all.push(first);
    assert_all_distinct(&all);
}

#[test]
fn ids_carry_the_category_prefix() {
    for (name, expected) in IDS {
        let prefix = expected[0].split('-').next().unwrap();
        for n in normalized(name) {
            assert!(
                n.event.event_id.starts_with(&format!("{prefix}-")),
                "{name}"
            );
            assert_eq!(n.event.event_id.len(), prefix.len() + 1 + 32);
        }
    }
}
