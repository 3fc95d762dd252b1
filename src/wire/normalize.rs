//! Classified wire items → the protobuf event model (SPEC §3), with their identity
//! ([`super::identity`]) and the paths of the fields that did not fit.

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use prost_types::Timestamp;
use serde_json::value::RawValue;

use super::{
    fields::{NumberOrText, Reader, Stamp},
    identity,
    json::Json,
    legacy,
    payload::{
        Kind, Reason, Unusable, WireIngredient, WireItem, WireSection, WireTestResult, classify,
        read_item,
    },
};
use crate::proto::{
    Event, EventType, Ingredient, IntegrationAction, LabReportResult, LabReportSection,
    LabTestResult, NutritionResult, ProviderIntegration, RecordChange, RecordStatus,
    WebhookCategory, event::Payload,
};

/// One item of a webhook request, made into an event (sequence not yet assigned).
#[derive(Debug)]
pub struct Normalized {
    pub event: Event,
    /// Whether the content named another category than the path it arrived on.
    pub reclassified: bool,
    /// The id the previous release's identity rule gave this item, so a redelivery of an
    /// event stored before the upgrade is still recognised as a duplicate (SPEC §2.4).
    /// `None` unless asked for with [`LegacyIds::Compute`].
    pub legacy_event_id: Option<String>,
}

/// Whether [`normalize`] also derives the 0.1 release's id of each item. Only a log that
/// may still index ids of that rule looks them up (`EventLog::wants_legacy_ids`), so every
/// other webhook skips the second hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyIds {
    Compute,
    Skip,
}

/// Normalizes one raw item that arrived on the path of `path_category`. The item is read
/// once; its fields, its `event_id` (the whole content) and its 0.1 id come from that tree.
pub fn normalize(
    raw: &RawValue,
    path_category: WebhookCategory,
    received_at: Timestamp,
    legacy: LegacyIds,
) -> Result<Normalized, Unusable> {
    let tree = read_item(raw)?;
    let Json::Object(object) = &tree else {
        return Err(Unusable::new(
            Reason::NotAnObject,
            "item is not a JSON object",
        ));
    };
    let mut reader = Reader::default();
    let item = WireItem::read(&mut reader, object);
    let kind = classify(&item, path_category)?;
    let mut event = match kind {
        Kind::Main => main_event(&item)?,
        Kind::LabReport => lab_report(&item)?,
        Kind::NutritionRecord => nutrition_record(&item)?,
    };
    let legacy_event_id = (legacy == LegacyIds::Compute).then(|| legacy_id(&item, &tree, &event));
    event.event_id = identity::event_id(kind.prefix(), &tree);
    event.unparsed_fields = reader.into_unparsed();
    event.category = kind.category() as i32;
    if event.occurred_at.is_none() {
        event.occurred_at = Some(received_at);
    }
    event.received_at = Some(received_at);
    event.raw_json = Bytes::copy_from_slice(raw.get().as_bytes());
    Ok(Normalized {
        legacy_event_id,
        event,
        reclassified: path_category != WebhookCategory::Main && kind.category() != path_category,
    })
}

/// The 0.1 id of an item mapped to `event` (its payload says which rule applies).
fn legacy_id(item: &WireItem, tree: &Json<'_>, event: &Event) -> String {
    match &event.payload {
        Some(Payload::LabReportResult(result)) => {
            LAB_REPORT.legacy_id(item, tree, &result.record_id, result.status())
        }
        Some(Payload::NutritionResult(result)) => {
            NUTRITION_RECORD.legacy_id(item, tree, &result.record_id, result.status())
        }
        _ => legacy::main_id(item, &event.application_user_id),
    }
}

fn main_event(item: &WireItem) -> Result<Event, Unusable> {
    let event_type = item.event_type.as_deref().unwrap_or_default();
    let user = user_of(item, None).ok_or_else(|| {
        Unusable::new(
            Reason::MissingUserId,
            "main event has no usable application_user_id or user_id",
        )
    })?;
    let (r#type, payload) = match event_type {
        "record_change" => (EventType::RecordChange, record_change(item)),
        "provider_integration_created" => (
            EventType::ProviderIntegrationCreated,
            provider_integration(item, IntegrationAction::Created),
        ),
        "provider_integration_deleted" => (
            EventType::ProviderIntegrationDeleted,
            provider_integration(item, IntegrationAction::Deleted),
        ),
        other => {
            return Err(Unusable::new(
                Reason::UnknownEventType,
                format!("unknown main event_type {other:?}"),
            ));
        }
    };
    Ok(Event {
        r#type: r#type as i32,
        application_user_id: user,
        occurred_at: at(item.timestamp.as_ref()),
        payload: Some(payload),
        ..Event::default()
    })
}

/// The instant of a timestamp field that parsed.
fn at(stamp: Option<&Stamp>) -> Option<Timestamp> {
    stamp.and_then(|s| s.at)
}

fn record_change(item: &WireItem) -> Payload {
    Payload::RecordChange(RecordChange {
        provider_slug: item.provider_slug.clone().unwrap_or_default(),
        metrics: item.metrics.clone().unwrap_or_default(),
        activity_types: item.activity_types.clone().unwrap_or_default(),
        data_types: item.data_types.clone().unwrap_or_default(),
        earliest_record_start_at: at(item
            .earliest_record_start_at
            .as_ref()
            .or(item.start_date.as_ref())),
        latest_record_end_at: at(item
            .latest_record_end_at
            .as_ref()
            .or(item.end_date.as_ref())),
        customer_id: item.customer_id.clone().unwrap_or_default(),
    })
}

fn provider_integration(item: &WireItem, action: IntegrationAction) -> Payload {
    Payload::ProviderIntegration(ProviderIntegration {
        provider_slug: item.provider_slug.clone().unwrap_or_default(),
        action: action as i32,
        customer_id: item.customer_id.clone().unwrap_or_default(),
    })
}

/// Fields of an enveloped result live under `data`; the envelope itself carries the ids.
/// Looks a field up on the item first, then in its `data`.
fn pick<'a, T>(item: &'a WireItem, field: impl Fn(&'a WireItem) -> Option<&'a T>) -> Option<&'a T> {
    field(item).or_else(|| item.data.as_deref().and_then(field))
}

fn user_of(item: &WireItem, data: Option<&WireItem>) -> Option<String> {
    [Some(item), data]
        .into_iter()
        .flatten()
        .find_map(|i| i.application_user_id.clone().or_else(|| i.user_id.clone()))
}

/// The result status: the envelope's event_type suffix, else `status`, else inferred.
fn result_status(item: &WireItem, prefix: &str, has_error: bool) -> Result<RecordStatus, Unusable> {
    let text = match item.event_type.as_deref() {
        Some(event_type) => event_type.strip_prefix(prefix),
        None => pick(item, |i| i.status.as_ref()).map(String::as_str),
    };
    match text.map(str::to_ascii_lowercase).as_deref() {
        Some("completed") => Ok(RecordStatus::Completed),
        Some("failed") => Ok(RecordStatus::Failed),
        Some("pending") => Ok(RecordStatus::Pending),
        Some("processing") => Ok(RecordStatus::Processing),
        // Spike omits status on some deliveries; an error text means it failed.
        None if has_error => Ok(RecordStatus::Failed),
        None => Ok(RecordStatus::Completed),
        Some(_) => Err(Unusable::new(
            Reason::UnknownStatus,
            "unknown result status",
        )),
    }
}

/// A lab report as Spike describes it, in a webhook or a REST answer.
pub fn lab_report_result(item: &WireItem) -> Result<LabReportResult, Unusable> {
    let record_id = pick(item, |i| i.record_id.as_ref().or(i.report_id.as_ref()))
        .cloned()
        .ok_or_else(|| {
            Unusable::new(
                Reason::MissingRecordId,
                "lab report has no usable record_id or report_id",
            )
        })?;
    let parsing_error = pick(item, |i| i.parsing_error.as_ref().or(i.error.as_ref())).cloned();
    let status = result_status(item, "lab_report_", parsing_error.is_some())?;
    Ok(LabReportResult {
        record_id,
        status: status as i32,
        collection_date: pick(item, |i| i.collection_date.as_ref())
            .cloned()
            .unwrap_or_default(),
        result_date: pick(item, |i| i.result_date.as_ref())
            .cloned()
            .unwrap_or_default(),
        sections: pick(item, |i| i.sections.as_ref())
            .map(|s| s.iter().map(section).collect())
            .unwrap_or_default(),
        parsing_error: parsing_error.unwrap_or_default(),
        uploaded_at: stamp(pick(item, |i| i.uploaded_at.as_ref())),
        modified_at: stamp(pick(item, |i| i.modified_at.as_ref())),
        lab_information: pick(item, |i| i.lab_information.as_ref()).cloned(),
        patient_information: pick(item, |i| i.patient_information.as_ref()).cloned(),
        notes: pick(item, |i| i.notes.as_ref())
            .cloned()
            .unwrap_or_default(),
    })
}

fn lab_report(item: &WireItem) -> Result<Event, Unusable> {
    let result = lab_report_result(item)?;
    let mut event = LAB_REPORT.event(
        item,
        result.status(),
        result.modified_at.or(result.uploaded_at),
    )?;
    event.payload = Some(Payload::LabReportResult(result));
    Ok(event)
}

/// What lab reports and nutrition records map alike: written once so the two categories
/// cannot drift apart in which statuses become events, whose event it is, or its 0.1 id.
struct ResultRule {
    /// Names the category in the reason of a result Spike does not notify.
    name: &'static str,
    /// The category prefix of the 0.1 release's `event_id`.
    legacy_prefix: &'static str,
    completed: EventType,
    failed: EventType,
}

const LAB_REPORT: ResultRule = ResultRule {
    name: "lab report",
    legacy_prefix: "lab",
    completed: EventType::LabReportCompleted,
    failed: EventType::LabReportFailed,
};

const NUTRITION_RECORD: ResultRule = ResultRule {
    name: "nutrition record",
    legacy_prefix: "nutrition",
    completed: EventType::NutritionRecordCompleted,
    failed: EventType::NutritionRecordFailed,
};

impl ResultRule {
    /// The event of a result, without its payload. Only a completed or failed result is
    /// an event.
    fn event(
        &self,
        item: &WireItem,
        status: RecordStatus,
        occurred_at: Option<Timestamp>,
    ) -> Result<Event, Unusable> {
        let r#type = match status {
            RecordStatus::Completed => self.completed,
            RecordStatus::Failed => self.failed,
            _ => return Err(self.not_notified(status)),
        };
        Ok(Event {
            r#type: r#type as i32,
            application_user_id: user_of(item, item.data.as_deref()).unwrap_or_default(),
            occurred_at,
            ..Event::default()
        })
    }

    /// A result's 0.1 id.
    fn legacy_id(
        &self,
        item: &WireItem,
        tree: &Json<'_>,
        record_id: &str,
        status: RecordStatus,
    ) -> String {
        legacy::result_id(
            self.legacy_prefix,
            record_id,
            status,
            pick(item, |i| i.modified_at.as_ref()),
            tree,
        )
    }

    fn not_notified(&self, status: RecordStatus) -> Unusable {
        Unusable::new(
            Reason::NotNotified,
            format!(
                "{} status {} has no event type; Spike only notifies completed or failed",
                self.name,
                status.as_str_name()
            ),
        )
    }
}

fn section(wire: &WireSection) -> LabReportSection {
    LabReportSection {
        loinc_code: wire.loinc_code.clone().unwrap_or_default(),
        loinc_common_name: wire.loinc_common_name.clone().unwrap_or_default(),
        original_section_name: wire.original_section_name.clone().unwrap_or_default(),
        standard_section_name: wire.standard_section_name.clone().unwrap_or_default(),
        results: wire
            .results
            .as_ref()
            .map(|r| r.iter().map(test_result).collect())
            .unwrap_or_default(),
    }
}

fn test_result(wire: &WireTestResult) -> LabTestResult {
    let (value, text_value) = match &wire.value {
        Some(NumberOrText::Number(n)) => (Some(*n), None),
        // Text values are kept as sent; a numeric text also fills `value`.
        Some(NumberOrText::Text(t)) => (
            t.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
            Some(t.clone()),
        ),
        None => (None, None),
    };
    LabTestResult {
        loinc_code: wire.loinc_code.clone().unwrap_or_default(),
        loinc_common_name: wire.loinc_common_name.clone().unwrap_or_default(),
        original_test_name: wire.original_test_name.clone().unwrap_or_default(),
        standard_test_name: wire.standard_test_name.clone().unwrap_or_default(),
        original_unit_name: wire.original_unit_name.clone().unwrap_or_default(),
        standard_unit_name: wire.standard_unit_name.clone().unwrap_or_default(),
        value,
        value_text: wire.value_text.clone().or(text_value).unwrap_or_default(),
        within_normal_range: wire.within_normal_range,
        normal_min: wire.normal_min,
        normal_max: wire.normal_max,
    }
}

/// A nutrition record as Spike describes it, in a webhook or a REST answer.
pub fn nutrition_result(item: &WireItem) -> Result<NutritionResult, Unusable> {
    let record_id = pick(item, |i| i.record_id.as_ref())
        .cloned()
        .ok_or_else(|| {
            Unusable::new(
                Reason::MissingRecordId,
                "nutrition record has no usable record_id",
            )
        })?;
    let failure_reason = pick(item, |i| i.failure_reason.as_ref().or(i.error.as_ref())).cloned();
    let status = result_status(item, "nutrition_record_", failure_reason.is_some())?;
    Ok(NutritionResult {
        record_id,
        status: status as i32,
        dish_name: pick(item, |i| i.dish_name.as_ref())
            .cloned()
            .unwrap_or_default(),
        dish_description: pick(item, |i| i.dish_description.as_ref())
            .cloned()
            .unwrap_or_default(),
        nutri_score: pick(item, |i| i.nutri_score.as_ref())
            .cloned()
            .unwrap_or_default(),
        serving_size: pick(item, |i| i.serving_size.as_ref()).copied(),
        unit: pick(item, |i| i.unit.as_ref()).cloned().unwrap_or_default(),
        nutritional_fields: pick(item, |i| {
            i.nutritional_fields.as_ref().or(i.totals.as_ref())
        })
        .cloned()
        .unwrap_or_default(),
        ingredients: pick(item, |i| i.ingredients.as_ref())
            .map(|list| list.iter().map(ingredient).collect())
            .unwrap_or_default(),
        failure_reason: failure_reason.unwrap_or_default(),
        uploaded_at: stamp(pick(item, |i| i.uploaded_at.as_ref())),
        modified_at: stamp(pick(item, |i| i.modified_at.as_ref())),
        consumed_at: stamp(pick(item, |i| i.consumed_at.as_ref())),
    })
}

fn nutrition_record(item: &WireItem) -> Result<Event, Unusable> {
    let result = nutrition_result(item)?;
    let mut event = NUTRITION_RECORD.event(
        item,
        result.status(),
        result.modified_at.or(result.uploaded_at),
    )?;
    event.payload = Some(Payload::NutritionResult(result));
    Ok(event)
}

fn ingredient(wire: &WireIngredient) -> Ingredient {
    Ingredient {
        name: wire.name.clone().unwrap_or_default(),
        serving_size: wire.serving_size,
        unit: wire.unit.clone().unwrap_or_default(),
        nutritional_fields: wire.nutritional_fields.clone().unwrap_or_default(),
    }
}

/// RFC 3339 (any precision), or a naive date-time or date taken as UTC. None if unreadable:
/// the field is left unset and the text stays available in `raw_json`.
pub fn timestamp(text: &str) -> Option<Timestamp> {
    let text = text.trim();
    let utc = DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .or_else(|_| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
        })
        .or_else(|_| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(|d| d.and_time(Default::default()).and_utc())
        })
        .ok()?;
    Some(Timestamp {
        seconds: utc.timestamp(),
        nanos: utc.timestamp_subsec_nanos() as i32,
    })
}

fn stamp(stamp: Option<&Stamp>) -> Option<Timestamp> {
    stamp.and_then(|s| s.at)
}
