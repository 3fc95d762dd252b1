//! Typed, lenient reading of a [`Json`] tree (SPEC §2.3): a field of the wrong type never
//! fails the item. A numeric string reads as a number; anything else that does not fit
//! leaves the field unset and its path (`sections[0].results[2].value`, `data.serving_size`,
//! `nutritional_fields.energy_kcal`) is recorded. A JSON `null` is an absent field, not an
//! unparsed one.

use std::{collections::BTreeMap, fmt::Write};

use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};

use super::{
    identity,
    json::{Json, Object},
    normalize::timestamp,
};

/// The path of the field being read, and the paths of those that did not fit.
#[derive(Debug, Default)]
pub struct Reader {
    path: String,
    unparsed: Vec<String>,
}

/// A time as sent, and what it reads as (None: not a time we can read; listed as unparsed).
#[derive(Debug, Clone, PartialEq)]
pub struct Stamp {
    pub text: String,
    pub at: Option<Timestamp>,
}

/// A lab value: usually a number, sometimes text ("positive", "<0.5").
#[derive(Debug, Clone, PartialEq)]
pub enum NumberOrText {
    Number(f64),
    Text(String),
}

impl Reader {
    /// The paths of the fields that did not fit, sorted (so the order does not depend on
    /// the order this code reads fields in).
    pub fn into_unparsed(mut self) -> Vec<String> {
        self.unparsed.sort_unstable();
        self.unparsed
    }

    fn unparsed_here(&mut self) {
        self.unparsed.push(self.path.clone());
    }

    /// Runs `read` with the path extended by `segment`.
    fn at<T>(&mut self, segment: Segment<'_>, read: impl FnOnce(&mut Self) -> T) -> T {
        let len = self.path.len();
        match segment {
            Segment::Key(key) if is_plain(key) => {
                if len > 0 {
                    self.path.push('.');
                }
                self.path.push_str(key);
            }
            Segment::Key(key) => {
                self.path.push('[');
                self.path.push_str(&identity::canonical(&Json::String(
                    super::json::Text::plain(key),
                )));
                self.path.push(']');
            }
            Segment::Index(i) => {
                // Writing to a String cannot fail.
                let _ = write!(self.path, "[{i}]");
            }
        }
        let result = read(self);
        self.path.truncate(len);
        result
    }

    /// The field `key` of `object` read by `read`; absent and `null` are None, and a value
    /// `read` refuses is None with its path recorded.
    pub fn field<T>(
        &mut self,
        object: &Object<'_>,
        key: &str,
        read: impl FnOnce(&mut Self, &Json<'_>) -> Option<T>,
    ) -> Option<T> {
        match object.get(key)? {
            Json::Null => None,
            value => self.at(Segment::Key(key), |r| {
                let read = read(r, value);
                if read.is_none() {
                    r.unparsed_here();
                }
                read
            }),
        }
    }

    pub fn text(&mut self, object: &Object<'_>, key: &str) -> Option<String> {
        self.field(object, key, |_, v| text(v))
    }

    /// An id: a string, or a number taken as its literal text.
    pub fn id(&mut self, object: &Object<'_>, key: &str) -> Option<String> {
        self.field(object, key, |_, v| id(v))
    }

    pub fn number(&mut self, object: &Object<'_>, key: &str) -> Option<f64> {
        self.field(object, key, |_, v| number(v))
    }

    pub fn boolean(&mut self, object: &Object<'_>, key: &str) -> Option<bool> {
        self.field(object, key, |_, v| match v {
            Json::Bool(b) => Some(*b),
            _ => None,
        })
    }

    /// Free text (error messages, notes): a string, or any other JSON rendered compactly,
    /// so the information is kept (Spike has sent objects here).
    pub fn prose(&mut self, object: &Object<'_>, key: &str) -> Option<String> {
        self.field(object, key, |_, v| match v {
            Json::String(t) => Some(t.value.to_string()),
            other => Some(identity::compact(other)),
        })
    }

    /// A time; unreadable text is kept (for identity) but listed as unparsed.
    pub fn stamp(&mut self, object: &Object<'_>, key: &str) -> Option<Stamp> {
        self.field(object, key, |r, v| {
            let text = text(v)?;
            let at = timestamp(&text);
            if at.is_none() {
                r.unparsed_here();
            }
            Some(Stamp { text, at })
        })
    }

    pub fn lab_value(&mut self, object: &Object<'_>, key: &str) -> Option<NumberOrText> {
        self.field(object, key, |_, v| match v {
            Json::String(t) => Some(NumberOrText::Text(t.value.to_string())),
            other => number(other).map(NumberOrText::Number),
        })
    }

    /// A list of strings; an item that is not a string is left out and listed.
    pub fn strings(&mut self, object: &Object<'_>, key: &str) -> Option<Vec<String>> {
        self.list(object, key, |_, v| text(v))
    }

    /// A list of `read`'s values; an item `read` refuses is left out and listed.
    pub fn list<T>(
        &mut self,
        object: &Object<'_>,
        key: &str,
        mut read: impl FnMut(&mut Self, &Json<'_>) -> Option<T>,
    ) -> Option<Vec<T>> {
        self.field(object, key, |r, v| {
            let Json::Array(items) = v else { return None };
            let mut kept = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let read = r.at(Segment::Index(i), |r| {
                    let read = read(r, item);
                    if read.is_none() {
                        r.unparsed_here();
                    }
                    read
                });
                kept.extend(read);
            }
            Some(kept)
        })
    }

    /// A map of name → amount. Null amounts are dropped (Spike sends them for unknowns);
    /// other amounts that are not numbers are dropped and listed.
    pub fn amounts(&mut self, object: &Object<'_>, key: &str) -> Option<BTreeMap<String, f64>> {
        self.field(object, key, |r, v| {
            let Json::Object(map) = v else { return None };
            let mut kept = BTreeMap::new();
            for (name, amount) in map.iter() {
                if *amount == Json::Null {
                    continue;
                }
                match number(amount) {
                    Some(n) => {
                        kept.insert(name.value.to_string(), n);
                    }
                    None => r.at(Segment::Key(&name.value), Self::unparsed_here),
                }
            }
            Some(kept)
        })
    }

    /// A free-form object as a protobuf `Struct` (a non-object is kept under "value"). A
    /// number `Struct` cannot hold (beyond f64) becomes null and is listed.
    pub fn free_form(&mut self, object: &Object<'_>, key: &str) -> Option<Struct> {
        self.field(object, key, |r, v| {
            Some(match r.protobuf_value(v).kind {
                Some(Kind::StructValue(s)) => s,
                other => Struct {
                    fields: [("value".to_owned(), Value { kind: other })].into(),
                },
            })
        })
    }

    fn protobuf_value(&mut self, json: &Json<'_>) -> Value {
        let kind = match json {
            Json::Null => Kind::NullValue(0),
            Json::Bool(b) => Kind::BoolValue(*b),
            Json::Number(_) => match number(json) {
                Some(n) => Kind::NumberValue(n),
                None => {
                    self.unparsed_here();
                    Kind::NullValue(0)
                }
            },
            Json::String(t) => Kind::StringValue(t.value.to_string()),
            Json::Array(items) => Kind::ListValue(ListValue {
                values: items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.at(Segment::Index(i), |r| r.protobuf_value(item)))
                    .collect(),
            }),
            Json::Object(map) => Kind::StructValue(Struct {
                fields: map
                    .iter()
                    .map(|(k, v)| {
                        let value = self.at(Segment::Key(&k.value), |r| r.protobuf_value(v));
                        (k.value.to_string(), value)
                    })
                    .collect(),
            }),
        };
        Value { kind: Some(kind) }
    }

    /// A nested object read by `read` (its path extends this one).
    pub fn object<T>(
        &mut self,
        object: &Object<'_>,
        key: &str,
        read: impl FnOnce(&mut Self, &Object<'_>) -> T,
    ) -> Option<T> {
        self.field(object, key, |r, v| match v {
            Json::Object(inner) => Some(read(r, inner)),
            _ => None,
        })
    }
}

enum Segment<'k> {
    Key(&'k str),
    Index(usize),
}

/// Keys shown as `.key` in a path; any other is shown as `["key"]`, JSON-escaped.
fn is_plain(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn text(value: &Json<'_>) -> Option<String> {
    match value {
        Json::String(t) => Some(t.value.to_string()),
        _ => None,
    }
}

/// An id: a string, or a number as its literal text (`4242` → "4242").
pub fn id(value: &Json<'_>) -> Option<String> {
    match value {
        Json::String(t) => Some(t.value.to_string()),
        Json::Number(literal) => Some((*literal).to_owned()),
        _ => None,
    }
}

/// A finite number, from a JSON number or a numeric string (`"275"`, `" 2.5 "`).
fn number(value: &Json<'_>) -> Option<f64> {
    let parsed = match value {
        Json::Number(literal) => literal.parse::<f64>().ok(),
        Json::String(t) => t.value.trim().parse::<f64>().ok(),
        _ => None,
    };
    parsed.filter(|n| n.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::json::parse;

    fn read<T>(json: &str, f: impl FnOnce(&mut Reader, &Object<'_>) -> T) -> (T, Vec<String>) {
        let Json::Object(object) = parse(json, 8).unwrap() else {
            panic!()
        };
        let mut reader = Reader::default();
        let value = f(&mut reader, &object);
        (value, reader.into_unparsed())
    }

    #[test]
    fn numeric_strings_read_as_numbers() {
        let (n, unparsed) = read(r#"{"a":"275","b":" 2.5 ","c":3}"#, |r, o| {
            (r.number(o, "a"), r.number(o, "b"), r.number(o, "c"))
        });
        assert_eq!(n, (Some(275.0), Some(2.5), Some(3.0)));
        assert!(unparsed.is_empty());
    }

    #[test]
    fn values_that_do_not_fit_are_unset_and_listed() {
        let (n, unparsed) = read(
            r#"{"huge":1e400,"nan":"NaN","list":[1],"word":"lots","flag":"yes","id":{"x":1}}"#,
            |r, o| {
                (
                    r.number(o, "huge"),
                    r.number(o, "nan"),
                    r.number(o, "list"),
                    r.number(o, "word"),
                    r.boolean(o, "flag"),
                    r.id(o, "id"),
                )
            },
        );
        assert_eq!(n, (None, None, None, None, None, None));
        assert_eq!(unparsed, ["flag", "huge", "id", "list", "nan", "word"]);
    }

    #[test]
    fn null_is_absent_not_unparsed() {
        let (n, unparsed) = read(r#"{"a":null}"#, |r, o| (r.number(o, "a"), r.text(o, "a")));
        assert_eq!(n, (None, None));
        assert!(unparsed.is_empty());
    }

    #[test]
    fn paths_name_the_item_and_the_key() {
        let (kept, unparsed) = read(
            r#"{"m":["a",2,"c"],"n":{"kcal":"lots","ok":1,"odd.key":{},"z":null}}"#,
            |r, o| (r.strings(o, "m"), r.amounts(o, "n")),
        );
        assert_eq!(kept.0.unwrap(), ["a", "c"]);
        assert_eq!(kept.1.unwrap(), BTreeMap::from([("ok".to_owned(), 1.0)]));
        assert_eq!(unparsed, ["m[1]", "n.kcal", r#"n["odd.key"]"#]);
    }

    #[test]
    fn a_list_or_object_of_the_wrong_shape_is_unset() {
        let (kept, unparsed) = read(r#"{"m":"steps","n":[1]}"#, |r, o| {
            (r.strings(o, "m"), r.amounts(o, "n"))
        });
        assert_eq!(kept, (None, None));
        assert_eq!(unparsed, ["m", "n"]);
    }

    #[test]
    fn ids_take_numbers_as_their_text_and_prose_keeps_any_json() {
        let (kept, unparsed) = read(r#"{"u":4242,"e":{"code":7,"at":[1.50]}}"#, |r, o| {
            (r.id(o, "u"), r.prose(o, "e"))
        });
        assert_eq!(kept.0.as_deref(), Some("4242"));
        assert_eq!(kept.1.as_deref(), Some(r#"{"at":[1.50],"code":7}"#));
        assert!(unparsed.is_empty());
    }

    #[test]
    fn unreadable_times_keep_their_text_and_are_listed() {
        let (stamp, unparsed) = read(r#"{"t":"yesterday"}"#, |r, o| r.stamp(o, "t"));
        assert_eq!(
            stamp.unwrap(),
            Stamp {
                text: "yesterday".into(),
                at: None
            }
        );
        assert_eq!(unparsed, ["t"]);
    }

    #[test]
    fn free_form_numbers_beyond_f64_become_null() {
        let (info, unparsed) = read(r#"{"i":{"a":[1e400],"b":1}}"#, |r, o| r.free_form(o, "i"));
        assert_eq!(info.unwrap().fields.len(), 2);
        assert_eq!(unparsed, ["i.a[0]"]);
    }
}
