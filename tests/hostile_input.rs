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
    wire::{normalize, payload::user_named_in, split},
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
        let _ = user_named_in(&body);
    }

    #[test]
    fn any_json_normalizes_or_is_refused_on_every_path(value in json_value(), path in prop::sample::select(&CATEGORIES[..])) {
        let text = serde_json::to_string(&value).unwrap();
        let items = split(text.as_bytes()).expect("valid JSON splits");
        for item in items {
            if let Ok(normalized) = normalize(item, path, Timestamp::default()) {
                // Whatever is accepted keeps the item's own bytes.
                prop_assert_eq!(&normalized.event.raw_json[..], item.get().as_bytes());
            }
        }
    }
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
                            normalize(item, path, Timestamp::default()).is_err(),
                            "depth {depth}"
                        );
                    }
                }
            }
            assert_eq!(user_named_in(body.as_bytes()), None);
        }
    }
}

#[test]
fn huge_numbers_invalid_utf8_and_wrong_types_are_refused() {
    let cases: [&[u8]; 6] = [
        br#"{"record_id":"r","serving_size":1e400,"dish_name":"x"}"#,
        br#"{"application_user_id":123456789012345678901234567890,"event_type":"record_change"}"#,
        b"{\"record_id\":\"r\",\"dish_name\":\"\xff\xfe\"}",
        br#"{"event_type":{"nested":true}}"#,
        br#"{"record_id":"r","nutritional_fields":{"kcal":"lots"}}"#,
        br#"{"record_id":"r","sections":[{"results":[{"value":[1,2]}]}]}"#,
    ];
    for body in cases {
        match split(body) {
            Err(_) => {}
            Ok(items) => {
                for item in items {
                    let result = normalize(
                        item,
                        WebhookCategory::NutritionRecords,
                        Timestamp::default(),
                    );
                    assert!(result.is_err(), "{}", String::from_utf8_lossy(body));
                }
            }
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
    assert_eq!(app.log.dead_letter_count().await.unwrap(), 1);
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
