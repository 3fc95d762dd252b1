//! Hostile input at the edge: arbitrary bytes, deep nesting, huge numbers, invalid UTF-8,
//! wrong types and enormous arrays never panic and never allocate without bound.
//! Property cases are capped (PROPTEST_CASES, default 256) so CI time stays bounded.

mod support;

use proptest::prelude::*;
use prost_types::Timestamp;
use serde_json::{Value, json, value::RawValue};
use spike_gateway::{
    config::Secret,
    proto::WebhookCategory,
    webhook::signature::{Signature, Verifier},
    wire::{LegacyIds, normalize, split, users_named_in},
};

const CATEGORIES: [WebhookCategory; 3] = [
    WebhookCategory::Main,
    WebhookCategory::LabReports,
    WebhookCategory::NutritionRecords,
];

/// Field names Spike uses, so generated objects hit the real parsing paths.
const KEYS: [&str; 24] = [
    "event_type",
    "application_user_id",
    "user_id",
    "record_id",
    "report_id",
    "status",
    "timestamp",
    "metrics",
    "data",
    "sections",
    "results",
    "value",
    "dish_name",
    "nutritional_fields",
    "totals",
    "ingredients",
    "serving_size",
    "error",
    "modified_at",
    "uploaded_at",
    "lab_information",
    "collection_date",
    "failure_reason",
    "provider_slug",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop_oneof![
            Just("record_change".to_owned()),
            Just("lab_report_completed".to_owned()),
            Just("nutrition_record_failed".to_owned()),
            Just("completed".to_owned()),
            Just("2025-04-15T13:33:55.271331177Z".to_owned()),
            ".{0,20}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(&KEYS[..]), inner), 0..8).prop_map(
                |fields| {
                    Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }
            ),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn signature_headers_of_any_bytes_never_panic(header in prop::collection::vec(any::<u8>(), 0..200),
                                                  body in prop::collection::vec(any::<u8>(), 0..200)) {
        let verifier = Verifier::new(&[Secret::new("k")]);
        if let Ok(signature) = Signature::parse(&header) {
            prop_assert!(header.trim_ascii().len() == 64);
            let _ = verifier.verify(&body, &signature);
        }
    }

    #[test]
    fn any_bytes_split_or_fail_cleanly(body in prop::collection::vec(any::<u8>(), 0..2000)) {
        let _ = split(&body);
    }

    #[test]
    fn users_named_in_any_bytes_never_panics_and_is_bounded(
        body in prop::collection::vec(prop_oneof![
            any::<u8>(),
            prop::sample::select(&b"\"{}[]:,\\u0123456789-e "[..]),
        ], 0..2000),
        key in prop::sample::select(&["user_id", "application_user_id"][..]),
        junk in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let users = users_named_in(&body);
        prop_assert!(users.iter().map(String::len).sum::<usize>() <= 3 * body.len());
        prop_assert!(users.len() <= body.len());
        // Arbitrary bytes after a well-formed id never hide it.
        let mut named = format!(r#"{{"{key}":"needle"}}"#).into_bytes();
        named.extend_from_slice(&junk);
        prop_assert!(users_named_in(&named).contains(&"needle".to_owned()));
    }

    #[test]
    fn a_user_id_is_found_at_any_depth_inside_any_json(value in json_value(), depth in 0usize..80, numeric in any::<bool>()) {
        let id = if numeric { "4242" } else { r#""needle""# };
        let inner = format!(r#"{{"x":{value},"application_user_id":{id},"y":{value}}}"#);
        let body = format!("{}{inner}{}", r#"[{"data":"#.repeat(depth), "}]".repeat(depth));
        let expected = if numeric { "4242" } else { "needle" };
        prop_assert!(users_named_in(body.as_bytes()).contains(&expected.to_owned()));
    }

    #[test]
    fn junk_in_any_optional_field_of_a_valid_record_never_makes_a_dead_letter(
        sample in prop::sample::select(&SAMPLES[..]),
        at in any::<prop::sample::Index>(),
        junk in json_value(),
    ) {
        let (name, path) = sample;
        let mut record: Value = serde_json::from_str(&fixture(name)).unwrap();
        if let Value::Array(items) = &record {
            record = items[0].clone();
        }
        let places = optional_places(&record);
        let place = &places[at.index(places.len())];
        *record.pointer_mut(place).unwrap() = junk;
        let text = serde_json::to_string(&record).unwrap();
        let item = &split(text.as_bytes()).unwrap()[0];
        match normalize(item, path, Timestamp::default(), LegacyIds::Compute) {
            Ok(normalized) => prop_assert_eq!(&normalized.event.raw_json[..], text.as_bytes()),
            Err(e) => prop_assert!(false, "{name}: junk at {place} made a dead letter: {e}"),
        }
    }

    #[test]
    fn any_json_normalizes_or_is_refused_on_every_path(value in json_value(), path in prop::sample::select(&CATEGORIES[..])) {
        let text = serde_json::to_string(&value).unwrap();
        let items = split(text.as_bytes()).expect("valid JSON splits");
        for item in items {
            if let Ok(normalized) = normalize(item, path, Timestamp::default(), LegacyIds::Compute) {
                // Whatever is accepted keeps the item's own bytes.
                prop_assert_eq!(&normalized.event.raw_json[..], item.get().as_bytes());
            }
        }
    }
}

/// The samples and the path each is posted on.
const SAMPLES: [(&str, WebhookCategory); 10] = [
    ("main-batch.json", WebhookCategory::Main),
    ("main-record-change.json", WebhookCategory::Main),
    (
        "main-provider-integration-created.json",
        WebhookCategory::Main,
    ),
    (
        "main-provider-integration-deleted.json",
        WebhookCategory::Main,
    ),
    ("lab-report-completed.json", WebhookCategory::LabReports),
    ("lab-report-failed.json", WebhookCategory::LabReports),
    ("lab-report-enveloped.json", WebhookCategory::LabReports),
    (
        "nutrition-completed.json",
        WebhookCategory::NutritionRecords,
    ),
    ("nutrition-failed.json", WebhookCategory::NutritionRecords),
    (
        "nutrition-enveloped.json",
        WebhookCategory::NutritionRecords,
    ),
];

fn fixture(name: &str) -> String {
    String::from_utf8(support::fixture(name)).unwrap()
}

/// Fields an event needs (SPEC §2.3), and `status`, whose unknown values stay refused.
const REQUIRED: [&str; 6] = [
    "event_type",
    "application_user_id",
    "user_id",
    "record_id",
    "report_id",
    "status",
];

/// JSON pointers to every value of `record` at any depth but the required fields.
fn optional_places(record: &Value) -> Vec<String> {
    let mut places = Vec::new();
    let mut pending = vec![(String::new(), record)];
    while let Some((pointer, value)) = pending.pop() {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    if !REQUIRED.contains(&key.as_str()) {
                        let place = format!("{pointer}/{key}");
                        places.push(place.clone());
                        pending.push((place, child));
                    }
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    let place = format!("{pointer}/{i}");
                    places.push(place.clone());
                    pending.push((place, child));
                }
            }
            _ => {}
        }
    }
    places
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for depth in [200, 100_000] {
        // Splitting only skips over nested values; what matters is that nothing below
        // overflows the stack and such an item is refused.
        for body in [
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
            format!("{}1{}", "{\"data\":".repeat(depth), "}".repeat(depth)),
            format!("[{}1{}]", "{\"data\":".repeat(depth), "}".repeat(depth)),
        ] {
            if let Ok(items) = split(body.as_bytes()) {
                for item in items {
                    for path in CATEGORIES {
                        assert!(
                            normalize(item, path, Timestamp::default(), LegacyIds::Compute)
                                .is_err(),
                            "depth {depth}"
                        );
                    }
                }
            }
            assert!(users_named_in(body.as_bytes()).is_empty());
        }
    }
}

#[test]
fn huge_numbers_and_wrong_types_in_optional_fields_keep_the_event() {
    let cases: [(&str, &[&str]); 5] = [
        (
            r#"{"record_id":"r","serving_size":1e400,"dish_name":"x"}"#,
            &["serving_size"],
        ),
        (
            r#"{"record_id":"r","nutritional_fields":{"kcal":"lots"}}"#,
            &["nutritional_fields.kcal"],
        ),
        (
            r#"{"record_id":"r","sections":[{"results":[{"value":[1,2]}]}]}"#,
            &["sections[0].results[0].value"],
        ),
        (
            r#"{"record_id":"r","dish_name":"\udfff","ingredients":[7,{"serving_size":-1e999}]}"#,
            &["ingredients[0]", "ingredients[1].serving_size"],
        ),
        (r#"{"record_id":123456789012345678901234567890}"#, &[]),
    ];
    for (body, unparsed) in cases {
        let item = &split(body.as_bytes()).unwrap()[0];
        let event = normalize(
            item,
            WebhookCategory::NutritionRecords,
            Timestamp::default(),
            LegacyIds::Compute,
        )
        .unwrap_or_else(|e| panic!("{body}: {e}"))
        .event;
        assert_eq!(event.unparsed_fields, unparsed, "{body}");
    }
}

#[test]
fn unusable_required_fields_and_invalid_utf8_are_still_refused() {
    assert!(split(b"{\"record_id\":\"r\",\"dish_name\":\"\xff\xfe\"}").is_err());
    for body in [
        r#"{"event_type":{"nested":true}}"#,
        r#"{"application_user_id":[1],"event_type":"record_change"}"#,
        r#"{"record_id":{"id":1},"dish_name":"x"}"#,
    ] {
        let item = &split(body.as_bytes()).unwrap()[0];
        for path in CATEGORIES {
            assert!(
                normalize(item, path, Timestamp::default(), LegacyIds::Compute).is_err(),
                "{body} on {path:?}"
            );
        }
    }
}

#[test]
fn raw_value_items_of_an_enormous_array_stay_borrowed() {
    // 200 000 items in ~1.2 MB: splitting borrows slices of the body, no copies.
    let body = format!("[{}0]", "0,".repeat(199_999));
    let items: Vec<&RawValue> = split(body.as_bytes()).unwrap();
    assert_eq!(items.len(), 200_000);
    let start = body.as_ptr() as usize;
    assert!(items.iter().all(|i| (i.get().as_ptr() as usize) >= start
        && (i.get().as_ptr() as usize) < start + body.len()));
}

#[tokio::test]
async fn an_enormous_batch_of_unusable_items_is_one_dead_letter() {
    let app = support::spawn_app().await;
    let body = format!("[{}0]", "0,".repeat(199_999));
    let response = app.post(support::MAIN, body.as_bytes()).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["dead_lettered"], 1, "{answer}");
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        1
    );
}

#[tokio::test]
async fn a_deeply_nested_webhook_is_a_dead_letter_and_the_gateway_lives_on() {
    let app = support::spawn_app().await;
    let depth = 100_000;
    let body = format!("{}1{}", "{\"data\":".repeat(depth), "}".repeat(depth));
    let response = app.post(support::LAB, body.as_bytes()).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["dead_lettered"], 1, "{answer}");
    let alive = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(alive.status().as_u16(), 200);
}

#[tokio::test]
async fn a_record_with_unfit_optional_fields_reaches_subscribers_with_their_paths() {
    let app = support::spawn_app().await;
    let body = br#"{"record_id":"r","status":"completed","dish_name":"soup \ud800","dish_name":"soup \ud83c\udf72","serving_size":"275","unit":["g"],"nutritional_fields":{"energy_kcal":1e400,"protein_g":"9.5"}}"#;
    let response = app.post(support::NUTRITION, body).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        (
            answer["appended"].as_u64(),
            answer["dead_lettered"].as_u64()
        ),
        (Some(1), Some(0))
    );
    let mut stream = app.subscribe(support::from_beginning()).await.unwrap();
    let event = support::take(&mut stream, 1).await.remove(0);
    assert_eq!(
        event.unparsed_fields,
        ["nutritional_fields.energy_kcal", "unit"]
    );
    let Some(spike_gateway::proto::event::Payload::NutritionResult(meal)) = event.payload else {
        panic!("{event:?}")
    };
    assert_eq!(meal.dish_name, "soup 🍲", "the last duplicate");
    assert_eq!(meal.serving_size, Some(275.0));
    assert_eq!(meal.nutritional_fields.len(), 1);
}
