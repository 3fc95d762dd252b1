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
//! - [`normalize`]: a classified item → [`crate::proto::Event`].
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
pub use normalize::{Normalized, lab_report_result, normalize, nutrition_result};
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
) -> Result<ParsedBody, NotJson> {
    let mut parsed = ParsedBody::default();
    for raw in split(body)? {
        match normalize(raw, path, received_at) {
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
