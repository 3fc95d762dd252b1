//! The users a stored payload names, for erasure (SPEC §4.4): found by a linear scan that
//! needs no stack, so it works on anything a dead letter may hold (items nested past
//! [`super::MAX_NESTING`], a merged letter's whole batch, broken JSON).

use std::collections::BTreeSet;

use super::json::unescape;

/// Keys whose values are user ids, in every shape Spike sends.
const USER_KEYS: [&str; 2] = ["application_user_id", "user_id"];

/// Every value of an `application_user_id` or `user_id` key at any depth of `raw_json`: a
/// string as its decoded value, a number as its literal text (`4242` → "4242"), the same
/// rules as the event's `application_user_id`. Sorted and deduplicated; at most as many as
/// the input has bytes. Never fails: what is not a user id is skipped.
pub fn users_named_in(raw_json: &[u8]) -> Vec<String> {
    let mut users = BTreeSet::new();
    let mut at = 0;
    // Set after a user key and its colon: the next token is a user id, if it is a scalar.
    let mut expecting_user = false;
    while let Some(&byte) = raw_json.get(at) {
        match byte {
            b'"' => {
                let end = string_end(raw_json, at + 1);
                let (body, after) = (&raw_json[at + 1..end], (end + 1).min(raw_json.len()));
                if expecting_user {
                    users.insert(unescape(body, false).0);
                    expecting_user = false;
                } else if let Some(colon) = colon_after(raw_json, after) {
                    expecting_user = USER_KEYS.contains(&unescape(body, false).0.as_str());
                    at = colon + 1;
                    continue;
                }
                at = after;
            }
            b'-' | b'0'..=b'9' if expecting_user => {
                let len = raw_json[at..]
                    .iter()
                    .take_while(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .count();
                users.insert(String::from_utf8_lossy(&raw_json[at..at + len]).into_owned());
                expecting_user = false;
                at += len;
            }
            b' ' | b'\t' | b'\n' | b'\r' => at += 1,
            _ => {
                expecting_user = false;
                at += 1;
            }
        }
    }
    users.into_iter().collect()
}

/// Index of the quote closing a string whose body starts at `from` (or the input's end).
fn string_end(bytes: &[u8], from: usize) -> usize {
    let mut at = from;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b'"' => return at,
            b'\\' => at += 2,
            _ => at += 1,
        }
    }
    bytes.len()
}

/// Index of the `:` that follows `from` after whitespace only: the string before was a key.
fn colon_after(bytes: &[u8], from: usize) -> Option<usize> {
    let skipped = bytes
        .get(from..)?
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    (bytes[from + skipped] == b':').then_some(from + skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(json: &str) -> Vec<String> {
        users_named_in(json.as_bytes())
    }

    #[test]
    fn both_keys_at_any_depth_are_found() {
        assert_eq!(
            users(r#"{"application_user_id":"a","user_id":"b","x":{"y":[{"user_id":"c"}]}}"#),
            ["a", "b", "c"]
        );
        assert_eq!(
            users(r#"{"event_type":"x","data":{"application_user_id":"d"}}"#),
            ["d"]
        );
    }

    #[test]
    fn numeric_ids_are_their_literal_text() {
        assert_eq!(
            users(
                r#"{"user_id":4242,"application_user_id":-7,"x":{"user_id":12345678901234567890123}}"#
            ),
            ["-7", "12345678901234567890123", "4242"]
        );
    }

    #[test]
    fn escaped_keys_and_values_are_decoded() {
        assert_eq!(users(r#"{"user\u005fid" : "\u0041\ud800"}"#), ["A\u{fffd}"]);
    }

    #[test]
    fn values_that_are_not_ids_and_keys_in_strings_are_skipped() {
        assert!(users(r#"{"user_id":["odd"],"application_user_id":{"user":"x"},"note":"\"user_id\":\"no\""}"#).is_empty());
        assert!(users(r#"{"user_id":null,"user_id":true}"#).is_empty());
        assert!(
            users(r#"["user_id","x"]"#).is_empty(),
            "a string, not a key"
        );
    }

    #[test]
    fn a_merged_batch_and_deep_nesting_need_no_stack() {
        let batch: String = (0..500)
            .map(|i| format!(r#"{{"user_id":"u{}"}}"#, i % 250))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(users(&format!("[{batch}]")).len(), 250, "deduplicated");
        let deep = format!(
            r#"{}{{"application_user_id":"deep"}}{}"#,
            "{\"data\":".repeat(100_000),
            "}".repeat(100_000)
        );
        assert_eq!(users(&deep), ["deep"]);
    }

    #[test]
    fn broken_input_ends_cleanly() {
        for broken in [
            r#"{"user_id":"#,
            r#"{"user_id":"unterminated"#,
            r#""\"#,
            "\"",
            "user_id\":1",
        ] {
            let _ = users(broken);
        }
        assert_eq!(users(r#"{"user_id":"cut"#), ["cut"]);
    }
}
