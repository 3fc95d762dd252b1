//! Spike's REST answers about lab reports and nutrition records, read with the same
//! lenient reader as webhook items, so a field the webhook front accepts is accepted here.

use super::{
    MAX_NESTING,
    fields::Reader,
    json::{self, Json, ReadError},
    payload::{Reason, Unusable, WireItem, unreadable},
};

/// A list holds records, and an upload answer wraps one; each record up to MAX_NESTING.
const MAX_ANSWER_NESTING: usize = MAX_NESTING + 2;

/// One record: the whole answer, or with `under` the object under that key
/// (`{"lab_report": {...}}`).
pub fn answer_record(body: &[u8], under: Option<&str>) -> Result<WireItem, Unusable> {
    let tree = read(body)?;
    let record = match (under, &tree) {
        (None, record) => record,
        (Some(key), Json::Object(answer)) => answer
            .get(key)
            .ok_or_else(|| Unusable::new(Reason::NotAnObject, format!("answer has no {key}")))?,
        (Some(_), _) => &tree,
    };
    record_of(record)
}

/// A list of records.
pub fn answer_records(body: &[u8]) -> Result<Vec<WireItem>, Unusable> {
    match read(body)? {
        Json::Array(records) => records.iter().map(record_of).collect(),
        _ => Err(Unusable::new(Reason::NotAnObject, "answer is not a list")),
    }
}

fn read(body: &[u8]) -> Result<Json<'_>, Unusable> {
    let text =
        std::str::from_utf8(body).map_err(|e| unreadable(ReadError::Malformed(e.valid_up_to())))?;
    json::parse(text, MAX_ANSWER_NESTING).map_err(unreadable)
}

/// The fields that do not fit are dropped: a REST answer has no `unparsed_fields`.
fn record_of(value: &Json<'_>) -> Result<WireItem, Unusable> {
    match value {
        Json::Object(record) => Ok(WireItem::read(&mut Reader::default(), record)),
        _ => Err(Unusable::new(
            Reason::NotAnObject,
            "record is not a JSON object",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_leniently() {
        let record =
            answer_record(br#"{"record_id":7,"serving_size":"275","unit":[]}"#, None).unwrap();
        assert_eq!(
            (
                record.record_id.as_deref(),
                record.serving_size,
                record.unit
            ),
            (Some("7"), Some(275.0), None)
        );
        let wrapped = answer_record(br#"{"lab_report":{"record_id":"r"}}"#, Some("lab_report"));
        assert_eq!(wrapped.unwrap().record_id.as_deref(), Some("r"));
        assert_eq!(answer_records(br#"[{},{"a":1}]"#).unwrap().len(), 2);
    }

    #[test]
    fn answers_of_another_shape_are_refused() {
        assert!(answer_records(b"{}").is_err());
        assert!(answer_records(b"[1]").is_err());
        assert!(answer_record(br#"{"x":{}}"#, Some("lab_report")).is_err());
        assert!(answer_record(b"\xff", None).is_err());
        assert!(answer_record(b"[1", None).is_err());
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(
            answer_records(deep.as_bytes()).unwrap_err().reason,
            Reason::TooDeep
        );
    }
}
