//! A committed event as subscribers receive it: decoded once for filters and cursors, and
//! encoded once for the wire.
//!
//! Every subscriber of an event is sent the same bytes. The `Subscribe` stream copies them
//! into its HTTP/2 frame as they are, so fanning an event out to N subscribers costs N
//! memcpys rather than N deep clones and N protobuf encodings. The encoding puts `raw_json`
//! (field 20) last, so the bytes for a subscriber that did not ask for it are a prefix of
//! the same buffer. Protobuf lets fields come in any order, so this is still a valid
//! `Event` for every decoder.

use std::ops::Deref;

use bytes::{Bytes, BytesMut};
use prost::{
    Message,
    encoding::{self, WireType},
};

use crate::proto::Event;

/// `Event.raw_json`'s field number in `events.proto`.
const RAW_JSON_FIELD: u32 = 20;
/// `Event.sequence`'s field number in `events.proto`.
const SEQUENCE_FIELD: u32 = 1;

#[derive(Debug, Clone, PartialEq)]
pub struct CommittedEvent {
    event: Event,
    /// The `Event` encoded with `raw_json` last.
    wire: Bytes,
    /// Length of the prefix of `wire` that leaves `raw_json` out.
    without_raw_json: usize,
}

impl CommittedEvent {
    /// Encodes an event the log has just committed (its sequence already assigned).
    pub fn new(mut event: Event) -> Self {
        let raw_json = std::mem::take(&mut event.raw_json);
        let head = event.encoded_len();
        let mut wire =
            BytesMut::with_capacity(head + encoding::bytes::encoded_len(RAW_JSON_FIELD, &raw_json));
        event
            .encode(&mut wire)
            .expect("the buffer was sized by encoded_len");
        if !raw_json.is_empty() {
            encoding::bytes::encode(RAW_JSON_FIELD, &raw_json, &mut wire);
        }
        event.raw_json = raw_json;
        Self {
            event,
            wire: wire.freeze(),
            without_raw_json: head,
        }
    }

    /// Rebuilds an event from the bytes a backend stored, under the sequence it was stored
    /// at. Bytes in this type's own layout are kept as they are, with nothing re-encoded.
    /// Bytes stored without the sequence (NATS assigns it on publish) get it prepended, and
    /// bytes in another field order (valid protobuf, but `raw_json` not last) are encoded
    /// again.
    pub fn decode(sequence: u64, stored: Bytes) -> Result<Self, prost::DecodeError> {
        // Decoding from `Bytes` makes `raw_json` a view into `stored`: no copy.
        let mut event = Event::decode(stored.clone())?;
        let wire = match event.sequence {
            stored_sequence if stored_sequence == sequence => stored,
            0 => {
                let mut wire = BytesMut::with_capacity(11 + stored.len());
                encoding::uint64::encode(SEQUENCE_FIELD, &sequence, &mut wire);
                wire.extend_from_slice(&stored);
                event.sequence = sequence;
                wire.freeze()
            }
            _ => {
                event.sequence = sequence;
                return Ok(Self::new(event));
            }
        };
        match raw_json_tail(&wire, &event.raw_json) {
            Some(tail) => Ok(Self {
                without_raw_json: wire.len() - tail,
                wire,
                event,
            }),
            None => Ok(Self::new(event)),
        }
    }

    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The encoded `Event`, with or without `raw_json`. A view of shared bytes: cheap to
    /// take once per subscriber.
    pub fn encoded(&self, with_raw_json: bool) -> Bytes {
        if with_raw_json {
            self.wire.clone()
        } else {
            self.wire.slice(..self.without_raw_json)
        }
    }
}

/// Read access to the decoded event's fields (`sequence`, `application_user_id`, ...).
impl Deref for CommittedEvent {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

/// The length of the encoded `raw_json` field if `wire` ends with it, as [`CommittedEvent::new`]
/// writes it; `Some(0)` when there is no `raw_json` to leave out.
fn raw_json_tail(wire: &[u8], raw_json: &[u8]) -> Option<usize> {
    if raw_json.is_empty() {
        return Some(0);
    }
    let mut header = BytesMut::with_capacity(12);
    encoding::encode_key(RAW_JSON_FIELD, WireType::LengthDelimited, &mut header);
    encoding::encode_varint(raw_json.len() as u64, &mut header);
    let tail = header.len() + raw_json.len();
    let start = wire.len().checked_sub(tail)?;
    let (field_header, field_value) = wire[start..].split_at(header.len());
    (field_header == &header[..] && field_value == raw_json).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        EventType, RecordChange, WebhookCategory,
        event::Payload::{self},
    };

    fn sample() -> Event {
        Event {
            sequence: 42,
            event_id: "evt-1".into(),
            r#type: EventType::RecordChange as i32,
            category: WebhookCategory::Main as i32,
            application_user_id: "user-1".into(),
            payload: Some(Payload::RecordChange(RecordChange {
                provider_slug: "garmin".into(),
                metrics: vec!["steps".into()],
                ..Default::default()
            })),
            raw_json: Bytes::from_static(br#"{"type":"record_change"}"#),
            ..Default::default()
        }
    }

    #[test]
    fn both_encodings_decode_to_the_event() {
        let committed = CommittedEvent::new(sample());
        let full = Event::decode(committed.encoded(true)).unwrap();
        assert_eq!(full, sample());
        let lean = Event::decode(committed.encoded(false)).unwrap();
        assert_eq!(
            lean,
            Event {
                raw_json: Bytes::new(),
                ..sample()
            }
        );
        assert!(committed.encoded(false).len() < committed.encoded(true).len());
    }

    #[test]
    fn stored_bytes_in_this_layout_are_kept_as_they_are() {
        let committed = CommittedEvent::new(sample());
        let stored = committed.encoded(true);
        let back = CommittedEvent::decode(42, stored.clone()).unwrap();
        assert_eq!(back, committed);
        assert_eq!(back.encoded(true).as_ptr(), stored.as_ptr(), "no copy");
    }

    #[test]
    fn bytes_with_raw_json_elsewhere_are_laid_out_again() {
        // Valid protobuf in another field order, as another writer may have produced it.
        let mut stored = BytesMut::new();
        encoding::bytes::encode(RAW_JSON_FIELD, &sample().raw_json, &mut stored);
        Event {
            raw_json: Bytes::new(),
            ..sample()
        }
        .encode(&mut stored)
        .unwrap();
        let stored = stored.freeze();
        assert!(raw_json_tail(&stored, &sample().raw_json).is_none());
        let back = CommittedEvent::decode(42, stored).unwrap();
        assert_eq!(back, CommittedEvent::new(sample()));
        assert_eq!(
            Event::decode(back.encoded(false)).unwrap().raw_json,
            Bytes::new()
        );
    }

    #[test]
    fn a_missing_sequence_is_prepended() {
        let stored = CommittedEvent::new(Event {
            sequence: 0,
            ..sample()
        })
        .encoded(true);
        let back = CommittedEvent::decode(42, stored).unwrap();
        assert_eq!(back.sequence, 42);
        assert_eq!(Event::decode(back.encoded(true)).unwrap(), sample());
        assert_eq!(
            Event::decode(back.encoded(false)).unwrap().raw_json,
            Bytes::new()
        );
    }

    #[test]
    fn an_event_without_raw_json_is_the_same_either_way() {
        let committed = CommittedEvent::new(Event {
            raw_json: Bytes::new(),
            ..sample()
        });
        assert_eq!(committed.encoded(true), committed.encoded(false));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(CommittedEvent::decode(1, Bytes::from_static(&[0xff, 0xff, 0xff])).is_err());
    }
}
