//! The identity rule of the 0.1 release, kept byte for byte so that a redelivery of an event
//! stored before the upgrade is still recognised as a duplicate (SPEC §2.4). Only fills
//! [`super::Normalized::legacy_event_id`]; nothing new is identified by it.
//!
//! 0.1 derived the id from selected fields: main events from type, user, provider and times;
//! results from record id, status and `modified_at`, or, without `modified_at`, from the
//! item's JSON as `serde_json::Value` printed it (keys sorted, serde_json's number and
//! string formatting, `null` for an item serde_json could not read). Items 0.1 refused have
//! no stored id, so what this gives for them does not matter.

use sha2::{Digest, Sha256};

use super::{
    fields::Stamp,
    json::{Json, Text},
    payload::WireItem,
};
use crate::proto::RecordStatus;

/// A main event's 0.1 id.
pub(super) fn main_id(item: &WireItem, user: &str) -> String {
    fn text(stamp: Option<&Stamp>) -> &str {
        stamp.map_or("", |s| s.text.as_str())
    }
    content_id(
        "main",
        &[
            item.event_type.as_deref().unwrap_or_default(),
            user,
            item.provider_slug.as_deref().unwrap_or_default(),
            text(item.timestamp.as_ref()),
            text(
                item.earliest_record_start_at
                    .as_ref()
                    .or(item.start_date.as_ref()),
            ),
            text(
                item.latest_record_end_at
                    .as_ref()
                    .or(item.end_date.as_ref()),
            ),
        ],
    )
}

/// A result's 0.1 id (`tag` is `lab` or `nutrition`).
pub(super) fn result_id(
    tag: &str,
    record_id: &str,
    status: RecordStatus,
    modified_at: Option<&Stamp>,
    item: &Json<'_>,
) -> String {
    match modified_at {
        Some(modified_at) => content_id(tag, &[record_id, status.as_str_name(), &modified_at.text]),
        None => content_id(&format!("{tag}-json"), &[&serde_json_canonical(item)]),
    }
}

/// `tag-` + the first 128 bits of SHA-256 over the parts, each length-prefixed.
fn content_id(tag: &str, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    super::identity::prefixed_hex(tag, &hash.finalize()[..16])
}

/// The item as 0.1 printed it through `serde_json::Value`: sorted keys (Value's map is a
/// BTreeMap, so the last duplicate won), no whitespace, each scalar formatted by serde_json
/// itself. serde_json refused lone surrogates and numbers beyond f64, and 0.1 then printed
/// `null`.
fn serde_json_canonical(item: &Json<'_>) -> String {
    let mut out = Vec::new();
    match write(item, &mut out) {
        // serde_json writes UTF-8, and so do the brackets and commas in between.
        Some(()) => String::from_utf8(out).unwrap_or_else(|_| "null".to_owned()),
        None => "null".to_owned(),
    }
}

fn write(value: &Json<'_>, out: &mut Vec<u8>) -> Option<()> {
    match value {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Json::Number(literal) => {
            let number: serde_json::Number = literal.parse().ok()?;
            serde_json::to_writer(&mut *out, &number).ok()?;
        }
        Json::String(text) => string(text, out)?,
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out)?;
            }
            out.push(b']');
        }
        Json::Object(object) => {
            out.push(b'{');
            for (i, (key, value)) in object.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(key, out)?;
                out.push(b':');
                write(value, out)?;
            }
            out.push(b'}');
        }
    }
    Some(())
}

fn string(text: &Text<'_>, out: &mut Vec<u8>) -> Option<()> {
    if text.has_lone_surrogates() {
        return None;
    }
    serde_json::to_writer(&mut *out, &*text.value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::json::parse;

    /// 0.1's own code for the JSON form, to compare against.
    fn old(raw: &str) -> String {
        fn write(value: &serde_json::Value, out: &mut String) {
            match value {
                serde_json::Value::Object(map) => {
                    let mut keys: Vec<_> = map.keys().collect();
                    keys.sort();
                    out.push('{');
                    for (i, key) in keys.into_iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&serde_json::Value::String(key.clone()).to_string());
                        out.push(':');
                        write(&map[key], out);
                    }
                    out.push('}');
                }
                serde_json::Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        write(item, out);
                    }
                    out.push(']');
                }
                scalar => out.push_str(&scalar.to_string()),
            }
        }
        let value: serde_json::Value = serde_json::from_str(raw).unwrap_or_default();
        let mut out = String::new();
        write(&value, &mut out);
        out
    }

    #[test]
    fn the_json_form_is_the_one_0_1_printed() {
        for raw in [
            r#"{"b":1,"a":[1.0,2.50,-0,1e2,123456789012345678901234567890,-9223372036854775808]}"#,
            r#"{"s":"\u0041\n\u001f\u007f é \" \\ \/","a":{"z":null,"y":true,"x":false}}"#,
            r#"{"a":1,"a":2,"b":{"c":[],"c":{}}}"#,
            r#"{"bad":"\ud800"}"#,
            r#"{"big":1e400}"#,
            r#"{"😀":1,"｡":2,"z":3}"#,
            "[0.1, 5e-324, 1.7976931348623157e308, 18446744073709551615, 18446744073709551616]",
        ] {
            assert_eq!(
                serde_json_canonical(&parse(raw, 8).unwrap()),
                old(raw),
                "{raw}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
        ))]

        #[test]
        fn any_number_or_string_prints_as_0_1_printed_it(
            number in "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?",
            text in "\\PC{0,12}|[\\x00-\\x1f\"\\\\]{0,4}",
        ) {
            let raw = format!(r#"{{"n":[{number}],{}:{}}}"#,
                serde_json::to_string(&text).unwrap(), serde_json::to_string(&text).unwrap());
            proptest::prop_assert_eq!(serde_json_canonical(&parse(&raw, 8).unwrap()), old(&raw));
        }
    }
}
