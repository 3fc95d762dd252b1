//! Spike's payloads as they arrive on the wire, and how they are told apart.
//!
//! A body is split into items; each is read once by the lenient reader ([`super::json`])
//! into a tree, from which one permissive [`WireItem`] covers every shape of SPEC §2.3 (all
//! fields optional, unknown fields ignored, values that do not fit left unset and listed);
//! [`classify`] decides what an item is from its content. [`normalize`](mod@super::normalize) maps a
//! classified item to the event model.

use std::collections::BTreeMap;

use prost_types::Struct;
use serde_json::value::RawValue;

use super::{
    fields::{NumberOrText, Reader, Stamp},
    json::{self, Json, Object, ReadError},
};
use crate::proto::WebhookCategory;

/// A request body split into its items: a top-level array gives one item per element.
pub fn split(body: &[u8]) -> Result<Vec<&RawValue>, NotJson> {
    // One pass either way: an array is read straight into its elements. Every valid JSON
    // array reads as `Vec<&RawValue>`, so looking at the first byte decides nothing the
    // parser would not (a stray leading byte that is not JSON whitespace fails both ways).
    if body.trim_ascii_start().starts_with(b"[") {
        serde_json::from_slice(body).map_err(NotJson::from)
    } else {
        Ok(vec![serde_json::from_slice(body).map_err(NotJson::from)?])
    }
}

/// The body is not JSON at all (or not UTF-8, or nested beyond the parser's limit).
/// Carries only the position: serde's message may quote the body.
#[derive(Debug, thiserror::Error)]
#[error("body is not valid JSON (line {line}, column {column})")]
pub struct NotJson {
    line: usize,
    column: usize,
}

impl From<serde_json::Error> for NotJson {
    fn from(e: serde_json::Error) -> Self {
        Self {
            line: e.line(),
            column: e.column(),
        }
    }
}

/// Why an item could not become an event: a closed [`Reason`] (a metrics label) and a
/// sentence for operators. Safe to log: never contains payload values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Unusable {
    pub reason: Reason,
    pub detail: String,
}

impl Unusable {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The closed set of reasons an item becomes a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    NotAnObject,
    TooDeep,
    /// Not JSON the lenient reader accepts (the body's split already checked the syntax,
    /// so in practice unreachable; kept rather than trusting that).
    Malformed,
    UnknownEventType,
    Unclassifiable,
    MissingUserId,
    MissingRecordId,
    UnknownStatus,
    NotNotified,
    /// Many unusable items of one request, kept as one letter.
    Merged,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotAnObject => "not_an_object",
            Reason::TooDeep => "too_deep",
            Reason::Malformed => "malformed",
            Reason::UnknownEventType => "unknown_event_type",
            Reason::Unclassifiable => "unclassifiable",
            Reason::MissingUserId => "missing_user_id",
            Reason::MissingRecordId => "missing_record_id",
            Reason::UnknownStatus => "unknown_status",
            Reason::NotNotified => "not_notified",
            Reason::Merged => "merged",
        }
    }
}

/// Deepest nesting an item may have. Spike's shapes are about 6 deep; typed parsing
/// recurses once per level, and a few hundred levels of it overflow a thread's stack.
pub const MAX_NESTING: usize = 32;

/// Whether `json` nests arrays/objects deeper than `max`, by a linear scan that needs no
/// stack (brackets inside strings do not count).
pub fn nested_deeper_than(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Reads one item into a tree (once; both its fields and its identity come from it).
pub fn read_item(raw: &RawValue) -> Result<Json<'_>, Unusable> {
    if !raw.get().starts_with('{') {
        return Err(Unusable::new(
            Reason::NotAnObject,
            "item is not a JSON object",
        ));
    }
    json::parse(raw.get(), MAX_NESTING).map_err(unreadable)
}

/// An item (or REST answer) the lenient reader refused, saying where, never what.
pub(super) fn unreadable(error: ReadError) -> Unusable {
    match error {
        ReadError::TooDeep(max) => Unusable::new(
            Reason::TooDeep,
            format!("item is nested deeper than {max} levels"),
        ),
        ReadError::Malformed(_) => Unusable::new(Reason::Malformed, format!("item is {error}")),
    }
}

/// Union of the fields of every payload shape Spike sends, read leniently (SPEC §2.3):
/// all optional, unknown fields ignored, a value that does not fit left unset and its path
/// recorded by the [`Reader`].
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WireItem {
    pub event_type: Option<String>,
    pub application_user_id: Option<String>,
    pub user_id: Option<String>,
    pub customer_id: Option<String>,
    pub provider_slug: Option<String>,
    pub timestamp: Option<Stamp>,
    pub metrics: Option<Vec<String>>,
    pub activity_types: Option<Vec<String>>,
    pub data_types: Option<Vec<String>>,
    pub earliest_record_start_at: Option<Stamp>,
    pub latest_record_end_at: Option<Stamp>,
    pub start_date: Option<Stamp>,
    pub end_date: Option<Stamp>,

    pub record_id: Option<String>,
    pub report_id: Option<String>,
    pub status: Option<String>,
    pub uploaded_at: Option<Stamp>,
    pub modified_at: Option<Stamp>,

    pub collection_date: Option<String>,
    pub result_date: Option<String>,
    pub sections: Option<Vec<WireSection>>,
    pub parsing_error: Option<String>,
    pub lab_information: Option<Struct>,
    pub patient_information: Option<Struct>,
    pub notes: Option<String>,

    pub dish_name: Option<String>,
    pub dish_description: Option<String>,
    pub nutri_score: Option<String>,
    pub serving_size: Option<f64>,
    pub unit: Option<String>,
    pub nutritional_fields: Option<BTreeMap<String, f64>>,
    pub totals: Option<BTreeMap<String, f64>>,
    pub ingredients: Option<Vec<WireIngredient>>,
    pub failure_reason: Option<String>,
    pub consumed_at: Option<Stamp>,

    /// The envelope's payload (enveloped lab and nutrition shapes).
    pub data: Option<Box<WireItem>>,
    /// The envelope's failure text.
    pub error: Option<String>,
}

impl WireItem {
    /// Reads every field Spike's shapes use from `o`.
    pub fn read(r: &mut Reader, o: &Object<'_>) -> Self {
        Self {
            event_type: r.text(o, "event_type"),
            application_user_id: r.id(o, "application_user_id"),
            user_id: r.id(o, "user_id"),
            customer_id: r.id(o, "customer_id"),
            provider_slug: r.text(o, "provider_slug"),
            timestamp: r.stamp(o, "timestamp"),
            metrics: r.strings(o, "metrics"),
            activity_types: r.strings(o, "activity_types"),
            data_types: r.strings(o, "data_types"),
            earliest_record_start_at: r.stamp(o, "earliest_record_start_at"),
            latest_record_end_at: r.stamp(o, "latest_record_end_at"),
            start_date: r.stamp(o, "start_date"),
            end_date: r.stamp(o, "end_date"),
            record_id: r.id(o, "record_id"),
            report_id: r.id(o, "report_id"),
            status: r.text(o, "status"),
            uploaded_at: r.stamp(o, "uploaded_at"),
            modified_at: r.stamp(o, "modified_at"),
            collection_date: r.text(o, "collection_date"),
            result_date: r.text(o, "result_date"),
            sections: r.list(o, "sections", |r, v| {
                as_object(v).map(|o| WireSection::read(r, o))
            }),
            parsing_error: r.prose(o, "parsing_error"),
            lab_information: r.free_form(o, "lab_information"),
            patient_information: r.free_form(o, "patient_information"),
            notes: r.prose(o, "notes"),
            dish_name: r.text(o, "dish_name"),
            dish_description: r.text(o, "dish_description"),
            nutri_score: r.text(o, "nutri_score"),
            serving_size: r.number(o, "serving_size"),
            unit: r.text(o, "unit"),
            nutritional_fields: r.amounts(o, "nutritional_fields"),
            totals: r.amounts(o, "totals"),
            ingredients: r.list(o, "ingredients", |r, v| {
                as_object(v).map(|o| WireIngredient::read(r, o))
            }),
            failure_reason: r.prose(o, "failure_reason"),
            consumed_at: r.stamp(o, "consumed_at"),
            data: r.object(o, "data", |r, o| Box::new(Self::read(r, o))),
            error: r.prose(o, "error"),
        }
    }
}

fn as_object<'j, 'a>(value: &'j Json<'a>) -> Option<&'j Object<'a>> {
    match value {
        Json::Object(object) => Some(object),
        _ => None,
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct WireSection {
    pub loinc_code: Option<String>,
    pub loinc_common_name: Option<String>,
    pub original_section_name: Option<String>,
    pub standard_section_name: Option<String>,
    pub results: Option<Vec<WireTestResult>>,
}

impl WireSection {
    fn read(r: &mut Reader, o: &Object<'_>) -> Self {
        Self {
            loinc_code: r.text(o, "loinc_code"),
            loinc_common_name: r.text(o, "loinc_common_name"),
            original_section_name: r.text(o, "original_section_name"),
            standard_section_name: r.text(o, "standard_section_name"),
            results: r.list(o, "results", |r, v| {
                as_object(v).map(|o| WireTestResult::read(r, o))
            }),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct WireTestResult {
    pub loinc_code: Option<String>,
    pub loinc_common_name: Option<String>,
    pub original_test_name: Option<String>,
    pub standard_test_name: Option<String>,
    pub original_unit_name: Option<String>,
    pub standard_unit_name: Option<String>,
    pub value: Option<NumberOrText>,
    pub value_text: Option<String>,
    pub within_normal_range: Option<bool>,
    pub normal_min: Option<f64>,
    pub normal_max: Option<f64>,
}

impl WireTestResult {
    fn read(r: &mut Reader, o: &Object<'_>) -> Self {
        Self {
            loinc_code: r.text(o, "loinc_code"),
            loinc_common_name: r.text(o, "loinc_common_name"),
            original_test_name: r.text(o, "original_test_name"),
            standard_test_name: r.text(o, "standard_test_name"),
            original_unit_name: r.text(o, "original_unit_name"),
            standard_unit_name: r.text(o, "standard_unit_name"),
            value: r.lab_value(o, "value"),
            value_text: r.text(o, "value_text"),
            within_normal_range: r.boolean(o, "within_normal_range"),
            normal_min: r.number(o, "normal_min"),
            normal_max: r.number(o, "normal_max"),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct WireIngredient {
    pub name: Option<String>,
    pub serving_size: Option<f64>,
    pub unit: Option<String>,
    pub nutritional_fields: Option<BTreeMap<String, f64>>,
}

impl WireIngredient {
    fn read(r: &mut Reader, o: &Object<'_>) -> Self {
        Self {
            name: r.text(o, "name"),
            serving_size: r.number(o, "serving_size"),
            unit: r.text(o, "unit"),
            nutritional_fields: r.amounts(o, "nutritional_fields"),
        }
    }
}

/// What an item is, decided by its content (and, failing that, by the path it came on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Main,
    LabReport,
    NutritionRecord,
}

impl Kind {
    /// The first part of the event id (SPEC §2.4).
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::LabReport => "lab",
            Kind::NutritionRecord => "nutrition",
        }
    }

    pub fn category(self) -> WebhookCategory {
        match self {
            Kind::Main => WebhookCategory::Main,
            Kind::LabReport => WebhookCategory::LabReports,
            Kind::NutritionRecord => WebhookCategory::NutritionRecords,
        }
    }
}

pub const MAIN_EVENT_TYPES: [&str; 3] = [
    "record_change",
    "provider_integration_created",
    "provider_integration_deleted",
];

pub fn classify(item: &WireItem, path: WebhookCategory) -> Result<Kind, Unusable> {
    if let Some(event_type) = &item.event_type {
        return if MAIN_EVENT_TYPES.contains(&event_type.as_str()) {
            Ok(Kind::Main)
        } else if event_type.starts_with("lab_report_") {
            Ok(Kind::LabReport)
        } else if event_type.starts_with("nutrition_record_") {
            Ok(Kind::NutritionRecord)
        } else {
            Err(Unusable::new(
                Reason::UnknownEventType,
                format!("unknown event_type {:?}", truncate(event_type, 64)),
            ))
        };
    }
    let looks_like_lab = item.sections.is_some()
        || item.collection_date.is_some()
        || item.parsing_error.is_some()
        || item.result_date.is_some();
    let looks_like_nutrition = item.dish_name.is_some()
        || item.nutritional_fields.is_some()
        || item.nutri_score.is_some()
        || item.failure_reason.is_some();
    match (looks_like_lab, looks_like_nutrition, path) {
        (true, false, _) => Ok(Kind::LabReport),
        (false, true, _) => Ok(Kind::NutritionRecord),
        (true, true, WebhookCategory::LabReports) => Ok(Kind::LabReport),
        (true, true, WebhookCategory::NutritionRecords) => Ok(Kind::NutritionRecord),
        (true, true, _) => Err(Unusable::new(
            Reason::Unclassifiable,
            "item has both lab-report and nutrition fields",
        )),
        (false, false, WebhookCategory::LabReports) => Ok(Kind::LabReport),
        (false, false, WebhookCategory::NutritionRecords) => Ok(Kind::NutritionRecord),
        (false, false, _) => Err(Unusable::new(
            Reason::Unclassifiable,
            "cannot tell which kind of event this is: no event_type and no lab-report or nutrition fields",
        )),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(json: &str) -> WireItem {
        let raw: &RawValue = serde_json::from_str(json).unwrap();
        let Json::Object(object) = read_item(raw).unwrap() else {
            panic!()
        };
        WireItem::read(&mut Reader::default(), &object)
    }

    #[test]
    fn arrays_split_into_items_and_objects_stay_whole() {
        assert_eq!(split(br#"[{"a":1}, {"b":2}]"#).unwrap().len(), 2);
        let one = split(br#" {"a": [1, 2]} "#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].get(), r#"{"a": [1, 2]}"#);
        assert!(split(b"not json").is_err());
        assert!(split(b"{\"a\":\xff}").is_err(), "invalid UTF-8 is not JSON");
        let items = split(b" \r\n\t[ {\"a\":1} ,[2] ] \n").unwrap();
        let items: Vec<&str> = items.iter().map(|item| item.get()).collect();
        assert_eq!(
            items,
            [r#"{"a":1}"#, "[2]"],
            "leading JSON whitespace before an array"
        );
        assert!(
            split(b"[{\"a\":1}] x").is_err(),
            "trailing bytes after an array"
        );
        assert!(split(b"[{\"a\":1}").is_err(), "an array left open");
        assert!(
            split(b"\x0c[1]").is_err(),
            "form feed is not JSON whitespace"
        );
        assert!(split(b"").is_err(), "an empty body");
    }

    #[test]
    fn classification_follows_content_then_path() {
        use WebhookCategory::*;
        let cases = [
            (r#"{"event_type":"record_change"}"#, Main, Ok(Kind::Main)),
            (
                r#"{"event_type":"provider_integration_deleted"}"#,
                LabReports,
                Ok(Kind::Main),
            ),
            (
                r#"{"event_type":"lab_report_failed"}"#,
                Main,
                Ok(Kind::LabReport),
            ),
            (
                r#"{"event_type":"nutrition_record_completed"}"#,
                Main,
                Ok(Kind::NutritionRecord),
            ),
            (r#"{"sections":[]}"#, NutritionRecords, Ok(Kind::LabReport)),
            (r#"{"parsing_error":"x"}"#, Main, Ok(Kind::LabReport)),
            (
                r#"{"failure_reason":"x"}"#,
                LabReports,
                Ok(Kind::NutritionRecord),
            ),
            (r#"{"nutri_score":"A"}"#, Main, Ok(Kind::NutritionRecord)),
            (r#"{"record_id":"r"}"#, LabReports, Ok(Kind::LabReport)),
            (
                r#"{"record_id":"r"}"#,
                NutritionRecords,
                Ok(Kind::NutritionRecord),
            ),
        ];
        for (json, path, expected) in cases {
            assert_eq!(classify(&item(json), path), expected, "{json} on {path:?}");
        }
        assert!(classify(&item(r#"{"record_id":"r"}"#), Main).is_err());
        assert!(classify(&item(r#"{"event_type":"sleep_changed"}"#), Main).is_err());
    }

    #[test]
    fn lenient_fields_keep_information() {
        let parsed = item(
            r#"{"user_id": 42, "error": {"code": 7}, "nutritional_fields": {"a": 1, "b": null, "c": 2.5},
                "sections":[{"results":[{"value":"positive"},{"value":3}]}], "unknown": true}"#,
        );
        assert_eq!(parsed.user_id.as_deref(), Some("42"));
        assert_eq!(parsed.error.as_deref(), Some(r#"{"code":7}"#));
        let fields = parsed.nutritional_fields.unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields["c"], 2.5);
        let sections = parsed.sections.unwrap();
        let results = sections[0].results.as_ref().unwrap();
        assert_eq!(
            results[0].value,
            Some(NumberOrText::Text("positive".into()))
        );
        assert_eq!(results[1].value, Some(NumberOrText::Number(3.0)));
    }

    #[test]
    fn nesting_is_measured_outside_strings() {
        assert!(!nested_deeper_than(br#"{"a":[{"b":[]}]}"#, 4));
        assert!(nested_deeper_than(br#"{"a":[{"b":[]}]}"#, 3));
        assert!(!nested_deeper_than(br#"{"a":"[[[[[[\"{{{{"}"#, 1));
        assert!(nested_deeper_than(&b"[".repeat(100_000), MAX_NESTING));
    }

    #[test]
    fn unreadable_items_are_unusable_without_quoting_values() {
        let raw: &RawValue = serde_json::from_str("42").unwrap();
        assert_eq!(read_item(raw).unwrap_err().reason, Reason::NotAnObject);
        let deep = format!("{}1{}", "{\"secret-value\":".repeat(40), "}".repeat(40));
        let raw: &RawValue = serde_json::from_str(&deep).unwrap();
        let err = read_item(raw).unwrap_err();
        assert_eq!(err.reason, Reason::TooDeep);
        assert!(!err.detail.contains("secret-value"), "{err}");
    }
}
