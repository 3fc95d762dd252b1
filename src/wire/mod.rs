//! Spike's wire model: the payload shapes Spike sends, how an item is classified, how it
//! maps to the protobuf event model, its identity, and the ids of the users it names.
//!
//! This is the bottom layer: it depends only on [`crate::proto`]. The webhook front, the
//! Spike REST client and the admin RPCs (redrive, erasure) all read Spike's JSON through it,
//! so below it nothing parses JSON.
//!
//! - [`payload`]: request bodies split into items, the permissive [`payload::WireItem`],
//!   classification by content, nesting limits.
//! - [`json`]: the lenient JSON reader every item goes through once; [`fields`]: typed,
//!   lenient reading of its tree, with the paths of the fields that do not fit.
//! - [`normalize`](mod@normalize): a classified item → [`crate::proto::Event`].
//! - [`identity`]: the `event_id` from the whole content; [`legacy`]: the 0.1 rule, kept
//!   to recognise redeliveries of events stored before the upgrade.
//! - [`answer_record`], [`answer_records`]: Spike's REST answers, read the same way.
//! - [`users`]: the user ids a stored payload names, for erasure.

mod answer;
pub mod fields;
pub mod identity;
pub mod json;
mod legacy;
pub mod normalize;
pub mod payload;
pub mod users;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use bytes::Bytes;
use prost_types::Timestamp;

use crate::proto::WebhookCategory;
pub use answer::{answer_record, answer_records};
pub use normalize::{LegacyIds, Normalized, lab_report_result, normalize, nutrition_result};
pub use payload::{MAX_NESTING, NotJson, Reason, Unusable, WireItem, split};
pub use users::users_named_in;

/// Beyond this many unusable items in one request, the whole body becomes one dead letter.
pub const MAX_DEAD_LETTERS_PER_REQUEST: usize = 100;

/// A signed body read item by item: what became events and what did not.
#[derive(Debug, Default)]
pub struct ParsedBody {
    pub events: Vec<Normalized>,
    pub rejected: Vec<Rejected>,
}

/// JSON that could not become an event, to be kept as a dead letter.
#[derive(Debug)]
pub struct Rejected {
    pub unusable: Unusable,
    /// The item (or, for a [`Reason::Merged`] letter, the whole body) exactly as received.
    pub raw_json: Bytes,
    /// Every user id the JSON names ([`users_named_in`]), found now so that erasure never
    /// parses JSON.
    pub application_user_ids: Vec<String>,
}

impl Rejected {
    fn new(unusable: Unusable, raw_json: Bytes) -> Self {
        let application_user_ids = users_named_in(&raw_json);
        Self {
            unusable,
            raw_json,
            application_user_ids,
        }
    }
}

/// Splits `body` into items and normalizes each one that arrived on the path of `path`.
/// The one reading of a body, shared by the webhook front and dead-letter redrive.
pub fn parse_body(
    body: &[u8],
    path: WebhookCategory,
    received_at: Timestamp,
    legacy: LegacyIds,
) -> Result<ParsedBody, NotJson> {
    let mut parsed = ParsedBody::default();
    for raw in split(body)? {
        match normalize(raw, path, received_at, legacy) {
            Ok(normalized) => parsed.events.push(normalized),
            Err(unusable) => parsed.rejected.push(Rejected::new(
                unusable,
                Bytes::copy_from_slice(raw.get().as_bytes()),
            )),
        }
    }
    if parsed.rejected.len() > MAX_DEAD_LETTERS_PER_REQUEST {
        // Keep everything, but as one record: a body of many tiny unusable items must not
        // turn into hundreds of thousands of writes.
        let detail = format!(
            "{} items could not be used; the whole body is kept. First reason: {}",
            parsed.rejected.len(),
            parsed.rejected[0].unusable
        );
        parsed.rejected = vec![Rejected::new(
            Unusable::new(Reason::Merged, detail),
            Bytes::copy_from_slice(body),
        )];
    }
    Ok(parsed)
}

/// Lower-case hex HMAC-SHA256 of `body` under `key`, as Spike computes it: the webhook
/// `X-Body-Signature` and the `signature` of Spike's `POST /auth/hmac`.
pub fn sign(key: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> ParsedBody {
        parse_body(
            body.as_bytes(),
            WebhookCategory::Main,
            Timestamp::default(),
            LegacyIds::Compute,
        )
        .unwrap()
    }

    #[test]
    fn a_dead_letter_records_every_user_it_names() {
        let parsed = parse(
            r#"[{"event_type":"sleep_changed","user_id":4242,"data":{"application_user_id":"in-data"}}]"#,
        );
        assert_eq!(parsed.rejected[0].application_user_ids, ["4242", "in-data"]);
    }

    #[test]
    fn a_merged_letter_records_the_users_of_all_its_items() {
        let items: Vec<String> = (0..MAX_DEAD_LETTERS_PER_REQUEST + 50)
            .map(|i| format!(r#"{{"event_type":"sleep_changed","user_id":{i}}}"#))
            .collect();
        let parsed = parse(&format!("[{}]", items.join(",")));
        assert_eq!(parsed.rejected.len(), 1);
        assert_eq!(parsed.rejected[0].unusable.reason, Reason::Merged);
        let users = &parsed.rejected[0].application_user_ids;
        assert_eq!(users.len(), MAX_DEAD_LETTERS_PER_REQUEST + 50);
        assert!(users.contains(&"149".to_owned()));
    }

    #[test]
    fn an_item_nested_too_deep_still_names_its_user() {
        let deep = format!(
            r#"{}{{"application_user_id":"deep"}}{}"#,
            r#"{"event_type":"lab_report_completed","data":"#.repeat(MAX_NESTING + 8),
            "}".repeat(MAX_NESTING + 8)
        );
        let parsed = parse(&deep);
        assert_eq!(parsed.rejected[0].unusable.reason, Reason::TooDeep);
        assert_eq!(parsed.rejected[0].application_user_ids, ["deep"]);
    }

    #[test]
    fn events_carry_their_legacy_id_and_their_unparsed_fields() {
        let parsed = parse(r#"{"event_type":"record_change","user_id":"u","metrics":"steps"}"#);
        let normalized = &parsed.events[0];
        let legacy = normalized.legacy_event_id.as_deref().expect("asked for");
        assert!(legacy.starts_with("main-"));
        assert_ne!(legacy, normalized.event.event_id);
        assert_eq!(normalized.event.unparsed_fields, ["metrics"]);
    }

    #[test]
    fn the_legacy_id_is_only_derived_when_asked_for() {
        let body = br#"[{"event_type":"record_change","user_id":"u"},
            {"event_type":"lab_report_completed","data":{"record_id":"r","status":"completed","application_user_id":"u"}}]"#;
        let at = Timestamp::default();
        let skipped = parse_body(body, WebhookCategory::Main, at, LegacyIds::Skip).unwrap();
        let computed = parse_body(body, WebhookCategory::Main, at, LegacyIds::Compute).unwrap();
        assert_eq!(skipped.events.len(), 2);
        for (skip, compute) in skipped.events.iter().zip(&computed.events) {
            assert_eq!(skip.legacy_event_id, None);
            assert_eq!(
                skip.event, compute.event,
                "the event itself does not depend on it"
            );
        }
        let prefixes: Vec<&str> = computed
            .events
            .iter()
            .map(|n| {
                n.legacy_event_id
                    .as_deref()
                    .unwrap()
                    .split('-')
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(prefixes, ["main", "lab"]);
    }
}
