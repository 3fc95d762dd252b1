//! Spike's payloads as they arrive on the wire, and how they are told apart.
//!
//! One permissive [`WireItem`] covers every shape of SPEC §2.3 (all fields optional, unknown
//! fields ignored); [`classify`] decides what an item is from its content. Below this module
//! nothing handles raw JSON: [`super::normalize`] maps a classified item to the event model.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, de};
use serde_json::value::RawValue;

use crate::proto::WebhookCategory;

/// A request body split into its items: a top-level array gives one item per element.
pub fn split(body: &[u8]) -> Result<Vec<&RawValue>, NotJson> {
    let whole: &RawValue = serde_json::from_slice(body).map_err(NotJson::from)?;
    if whole.get().starts_with('[') {
        Ok(serde_json::from_str(whole.get()).map_err(NotJson::from)?)
    } else {
        Ok(vec![whole])
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
    WrongType,
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
            Reason::WrongType => "wrong_type",
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

/// Parses one item. Wrong types become an [`Unusable`] naming the position only.
pub fn parse_item(raw: &RawValue) -> Result<WireItem, Unusable> {
    if !raw.get().starts_with('{') {
        return Err(Unusable::new(
            Reason::NotAnObject,
            "item is not a JSON object",
        ));
    }
    if nested_deeper_than(raw.get().as_bytes(), MAX_NESTING) {
        return Err(Unusable::new(
            Reason::TooDeep,
            format!("item is nested deeper than {MAX_NESTING} levels"),
        ));
    }
    serde_json::from_str(raw.get()).map_err(|e| {
        Unusable::new(
            Reason::WrongType,
            format!(
                "item has a field of an unexpected type (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Union of the fields of every payload shape Spike sends.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireItem {
    pub event_type: Option<String>,
    #[serde(deserialize_with = "id")]
    pub application_user_id: Option<String>,
    #[serde(deserialize_with = "id")]
    pub user_id: Option<String>,
    #[serde(deserialize_with = "id")]
    pub customer_id: Option<String>,
    pub provider_slug: Option<String>,
    pub timestamp: Option<String>,
    pub metrics: Option<Vec<String>>,
    pub activity_types: Option<Vec<String>>,
    pub data_types: Option<Vec<String>>,
    pub earliest_record_start_at: Option<String>,
    pub latest_record_end_at: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,

    #[serde(deserialize_with = "id")]
    pub record_id: Option<String>,
    #[serde(deserialize_with = "id")]
    pub report_id: Option<String>,
    pub status: Option<String>,
    pub uploaded_at: Option<String>,
    pub modified_at: Option<String>,

    pub collection_date: Option<String>,
    pub result_date: Option<String>,
    pub sections: Option<Vec<WireSection>>,
    #[serde(deserialize_with = "text")]
    pub parsing_error: Option<String>,
    pub lab_information: Option<serde_json::Value>,
    pub patient_information: Option<serde_json::Value>,
    #[serde(deserialize_with = "text")]
    pub notes: Option<String>,

    pub dish_name: Option<String>,
    pub dish_description: Option<String>,
    pub nutri_score: Option<String>,
    pub serving_size: Option<f64>,
    pub unit: Option<String>,
    #[serde(deserialize_with = "numbers")]
    pub nutritional_fields: Option<BTreeMap<String, f64>>,
    #[serde(deserialize_with = "numbers")]
    pub totals: Option<BTreeMap<String, f64>>,
    pub ingredients: Option<Vec<WireIngredient>>,
    #[serde(deserialize_with = "text")]
    pub failure_reason: Option<String>,
    pub consumed_at: Option<String>,

    /// The envelope's payload (enveloped lab and nutrition shapes).
    pub data: Option<Box<WireItem>>,
    /// The envelope's failure text.
    #[serde(deserialize_with = "text")]
    pub error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireSection {
    pub loinc_code: Option<String>,
    pub loinc_common_name: Option<String>,
    pub original_section_name: Option<String>,
    pub standard_section_name: Option<String>,
    pub results: Option<Vec<WireTestResult>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
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

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireIngredient {
    pub name: Option<String>,
    pub serving_size: Option<f64>,
    pub unit: Option<String>,
    #[serde(deserialize_with = "numbers")]
    pub nutritional_fields: Option<BTreeMap<String, f64>>,
}

/// A lab value: usually a number, sometimes text ("positive", "<0.5").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum NumberOrText {
    Number(f64),
    Text(String),
}

/// Ids: strings, but a numeric id is taken as its decimal text rather than refused.
fn id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Unsigned(u64),
        Signed(i64),
    }
    Ok(Option::<Id>::deserialize(d)?.map(|id| match id {
        Id::Text(s) => s,
        Id::Unsigned(n) => n.to_string(),
        Id::Signed(n) => n.to_string(),
    }))
}

/// Error and note texts: a string, or any other JSON rendered compactly (Spike has sent
/// objects here), so the information is kept rather than the event refused.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    })
}

/// A map of nutrient → amount. Null amounts are dropped (Spike sends them for unknowns).
fn numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, f64>>, D::Error> {
    let Some(map) = Option::<BTreeMap<String, Option<f64>>>::deserialize(d)? else {
        return Ok(None);
    };
    let kept: BTreeMap<_, _> = map
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    if kept.values().any(|v| !v.is_finite()) {
        return Err(de::Error::custom("non-finite amount"));
    }
    Ok(Some(kept))
}

/// The user a stored payload names (`application_user_id`, else `user_id`, also inside an
/// envelope's `data`), read leniently so that items refused for other reasons still count.
pub fn user_named_in(raw_json: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Names {
        #[serde(default, deserialize_with = "id_or_nothing")]
        application_user_id: Option<String>,
        #[serde(default, deserialize_with = "id_or_nothing")]
        user_id: Option<String>,
        #[serde(default)]
        data: Option<Lenient<Box<Names>>>,
    }
    /// Whatever does not fit is skipped rather than failing the whole lookup.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient<T> {
        Fits(T),
        Other(de::IgnoredAny),
    }
    fn id_or_nothing<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Option::<Lenient<String>>::deserialize(d)? {
            Some(Lenient::Fits(id)) => Some(id),
            _ => None,
        })
    }
    fn user(names: Names) -> Option<String> {
        names
            .application_user_id
            .or(names.user_id)
            .or(match names.data {
                Some(Lenient::Fits(data)) => user(*data),
                _ => None,
            })
    }
    if nested_deeper_than(raw_json, MAX_NESTING) {
        return None;
    }
    user(serde_json::from_slice(raw_json).ok()?)
}

/// What an item is, decided by its content (and, failing that, by the path it came on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Main,
    LabReport,
    NutritionRecord,
}

impl Kind {
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
        parse_item(serde_json::from_str(json).unwrap()).unwrap()
    }

    #[test]
    fn arrays_split_into_items_and_objects_stay_whole() {
        assert_eq!(split(br#"[{"a":1}, {"b":2}]"#).unwrap().len(), 2);
        let one = split(br#" {"a": [1, 2]} "#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].get(), r#"{"a": [1, 2]}"#);
        assert!(split(b"not json").is_err());
        assert!(split(b"{\"a\":\xff}").is_err(), "invalid UTF-8 is not JSON");
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
    fn the_user_of_a_stored_payload_is_found_even_in_odd_shapes() {
        let cases: [(&str, Option<&str>); 6] = [
            (r#"{"application_user_id":"a","user_id":"b"}"#, Some("a")),
            (r#"{"user_id":"b","metrics":"wrong type"}"#, Some("b")),
            (
                r#"{"event_type":"x","data":{"application_user_id":"c"}}"#,
                Some("c"),
            ),
            (r#"{"application_user_id":["odd"],"data":"text"}"#, None),
            (r#"{"hello":"world"}"#, None),
            (r#""not an object""#, None),
        ];
        for (json, expected) in cases {
            assert_eq!(
                user_named_in(json.as_bytes()).as_deref(),
                expected,
                "{json}"
            );
        }
    }

    #[test]
    fn wrong_types_are_unusable_without_quoting_values() {
        let raw: &RawValue = serde_json::from_str(r#"{"metrics": "secret-value"}"#).unwrap();
        let err = parse_item(raw).unwrap_err();
        assert!(!err.detail.contains("secret-value"), "{err}");
        let raw: &RawValue = serde_json::from_str("42").unwrap();
        assert!(parse_item(raw).is_err());
    }
}
