//! Spike's wire model: the payload shapes Spike sends, how an item is classified, how it
//! maps to the protobuf event model, its identity, and the ids of the users it names.
//!
//! This is the bottom layer: it depends only on [`crate::proto`]. The webhook front, the
//! Spike REST client and the admin RPCs (redrive, erasure) all read Spike's JSON through it,
//! so below it nothing parses JSON.
//!
//! - [`payload`]: request bodies split into items, the permissive [`payload::WireItem`],
//!   classification by content, nesting limits, user ids named in a payload.
//! - [`normalize`]: a classified item → [`crate::proto::Event`], with its `event_id`.

pub mod normalize;
pub mod payload;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use normalize::{Normalized, lab_report_result, normalize, nutrition_result};
pub use payload::{MAX_NESTING, NotJson, Unusable, WireItem, split};

/// Lower-case hex HMAC-SHA256 of `body` under `key`, as Spike computes it: the webhook
/// `X-Body-Signature` and the `signature` of Spike's `POST /auth/hmac`.
pub fn sign(key: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}
