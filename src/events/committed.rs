//! A committed event as subscribers receive it: encoded once for the wire, decoded at most
//! once, and only when something reads its fields.
//!
//! Every subscriber of an event is sent the same bytes. The `Subscribe` stream copies them
//! into its HTTP/2 frame as they are, so fanning an event out to N subscribers costs N
//! memcpys rather than N deep clones and N protobuf encodings. The encoding puts `raw_json`
//! (field 20) last, so the bytes for a subscriber that did not ask for it are a prefix of
//! the same buffer. Protobuf lets fields come in any order, so this is still a valid
//! `Event` for every decoder.
//!
//! Events read back from the embedded store are not decoded up front: a subscriber without
//! filters (replay, most consumers) needs only the sequence, the receive time and the
//! bytes, all known without decoding.

use std::sync::OnceLock;

use bytes::{Buf, Bytes, BytesMut};
use prost::{
    Message,
    encoding::{self, WireType},
};

use super::time::{Micros, to_micros};
use crate::proto::Event;

/// `Event.raw_json`'s field number in `events.proto`.
const RAW_JSON_FIELD: u32 = 20;
/// `Event.sequence`'s field number in `events.proto`.
const SEQUENCE_FIELD: u32 = 1;
/// `Event.application_user_id`'s field number in `events.proto`.
const USER_FIELD: u32 = 5;

#[derive(Debug, Clone)]
pub struct CommittedEvent {
    sequence: u64,
    received_at: Micros,
    /// The `Event` encoded with `raw_json` last.
    wire: Bytes,
    /// Length of the prefix of `wire` that leaves `raw_json` out.
    without_raw_json: usize,
    /// Where `application_user_id`'s bytes are in `wire`, when the walk of
    /// [`CommittedEvent::stored`] found them (a consumer group reads it of every event).
    user_at: Option<(u32, u32)>,
    /// `wire` decoded, on first use of [`CommittedEvent::event`].
    decoded: OnceLock<Event>,
}

impl CommittedEvent {
    /// Encodes an event the log has just committed (sequence and `received_at` assigned).
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
            sequence: event.sequence,
            received_at: event.received_at.as_ref().map_or(0, to_micros),
            wire: wire.freeze(),
            without_raw_json: head,
            user_at: None,
            decoded: OnceLock::from(event),
        }
    }

    /// Rebuilds an event from the bytes a backend stored, under the sequence it was stored
    /// at, decoding it now. Bytes in this type's own layout are kept as they are. Bytes
    /// stored without the sequence (NATS assigns it on publish) get it prepended, and bytes
    /// in another field order (valid protobuf, but `raw_json` not last) are encoded again.
    pub fn decode(sequence: u64, stored: Bytes) -> Result<Self, prost::DecodeError> {
        // Decoding from `Bytes` makes `raw_json` a view into `stored`: no copy.
        let mut event = Event::decode(stored.clone())?;
        let wire = match event.sequence {
            stored_sequence if stored_sequence == sequence => stored,
            0 => {
                event.sequence = sequence;
                with_sequence(sequence, &stored)
            }
            _ => {
                event.sequence = sequence;
                return Ok(Self::new(event));
            }
        };
        match scan(&wire)?.raw_json_at {
            Some(at) => Ok(Self {
                sequence,
                received_at: event.received_at.as_ref().map_or(0, to_micros),
                without_raw_json: at,
                wire,
                user_at: None,
                decoded: OnceLock::from(event),
            }),
            None => Ok(Self::new(event)),
        }
    }

    /// Like [`CommittedEvent::decode`] for a backend that stored the receive time beside
    /// the bytes, but decodes only when the fields are first read. The field framing is
    /// checked now, so bytes that are not an `Event` are refused here, not later.
    pub fn stored(
        sequence: u64,
        received_at: Micros,
        stored: Bytes,
    ) -> Result<Self, prost::DecodeError> {
        let layout = scan(&stored)?;
        match layout {
            Layout {
                sequence: Some(stored_sequence),
                raw_json_at: Some(at),
                user,
            } if stored_sequence == sequence => Ok(Self {
                sequence,
                received_at,
                without_raw_json: at,
                user_at: u32::try_from(user.start)
                    .ok()
                    .zip(u32::try_from(user.end).ok()),
                wire: stored,
                decoded: OnceLock::new(),
            }),
            _ => Self::decode(sequence, stored),
        }
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// When the gateway received it (µs since the epoch).
    pub fn received_at(&self) -> Micros {
        self.received_at
    }

    /// The decoded event. Decodes on first use.
    pub fn event(&self) -> &Event {
        self.decoded.get_or_init(|| {
            Event::decode(self.wire.clone()).unwrap_or_else(|e| {
                // `stored` checked the framing; only a corrupted string or nested message
                // gets here. Filters then see an empty event; the bytes are unchanged.
                tracing::error!(sequence = self.sequence, error = %e, "undecodable stored event");
                Event {
                    sequence: self.sequence,
                    ..Event::default()
                }
            })
        })
    }

    /// The event's `application_user_id`, without decoding the rest when it was not
    /// decoded yet: a consumer group needs it of every event it reads, and a stored event
    /// would otherwise be decoded whole for it. The field's bytes are read in place
    /// (the last occurrence wins, as in a decode); anything unexpected falls back to the
    /// decoded event.
    pub fn application_user_id(&self) -> &str {
        if let Some(event) = self.decoded.get() {
            return &event.application_user_id;
        }
        let found = match self.user_at {
            Some((start, end)) => self
                .wire
                .get(start as usize..end as usize)
                .and_then(|b| std::str::from_utf8(b).ok()),
            None => find_string(&self.wire, USER_FIELD),
        };
        match found {
            Some(found) => found,
            None => &self.event().application_user_id,
        }
    }

    /// Bytes of the encoding with `raw_json`: what the live ring and pages are bounded by.
    pub fn encoded_len(&self) -> usize {
        self.wire.len()
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

/// Same sequence, same bytes: the decoded form follows from them.
impl PartialEq for CommittedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.sequence == other.sequence
            && self.received_at == other.received_at
            && self.wire == other.wire
            && self.without_raw_json == other.without_raw_json
    }
}

/// `stored` prefixed with the sequence field.
fn with_sequence(sequence: u64, stored: &[u8]) -> Bytes {
    let mut wire = BytesMut::with_capacity(11 + stored.len());
    encoding::uint64::encode(SEQUENCE_FIELD, &sequence, &mut wire);
    wire.extend_from_slice(stored);
    wire.freeze()
}

/// `Event.event_id`'s field number in `events.proto`.
const EVENT_ID_FIELD: u32 = 2;

/// The `event_id` of an encoded `Event`, read without decoding the rest: the dedup index
/// is rebuilt from the stored events at start-up, and this layout puts the id second.
pub fn stored_event_id(wire: &[u8]) -> Option<&str> {
    let mut rest = wire;
    while rest.has_remaining() {
        let (field, wire_type) = encoding::decode_key(&mut rest).ok()?;
        if (field, wire_type) == (EVENT_ID_FIELD, WireType::LengthDelimited) {
            let len = usize::try_from(encoding::decode_varint(&mut rest).ok()?).ok()?;
            return std::str::from_utf8(rest.get(..len)?).ok();
        }
        encoding::skip_field(wire_type, field, &mut rest, Default::default()).ok()?;
    }
    None
}

/// What a walk over an encoded `Event`'s top-level fields found.
struct Layout {
    /// The value of field 1, if present.
    sequence: Option<u64>,
    /// Where `raw_json` starts, if it is the last field (the end of the bytes if absent).
    raw_json_at: Option<usize>,
    /// The bytes of the last `application_user_id` (empty if absent, as a decode has it).
    user: std::ops::Range<usize>,
}

/// Walks the top-level fields without decoding them: checks the framing, reads the
/// sequence and finds where `raw_json` starts.
fn scan(wire: &[u8]) -> Result<Layout, prost::DecodeError> {
    let mut rest = wire;
    let mut sequence = None;
    let mut raw_json_at = None;
    let mut user = 0..0;
    while rest.has_remaining() {
        let at = wire.len() - rest.len();
        let (field, wire_type) = encoding::decode_key(&mut rest)?;
        if raw_json_at.is_some() {
            // A field after raw_json: not this type's layout.
            return Ok(Layout {
                sequence,
                raw_json_at: None,
                user,
            });
        }
        match (field, wire_type) {
            (SEQUENCE_FIELD, WireType::Varint) => {
                sequence = Some(encoding::decode_varint(&mut rest)?);
            }
            (RAW_JSON_FIELD, WireType::LengthDelimited) => {
                raw_json_at = Some(at);
                encoding::skip_field(wire_type, field, &mut rest, Default::default())?;
            }
            (USER_FIELD, WireType::LengthDelimited) => {
                // The skip checks the length against the bytes left; the string ends there.
                let mut length = rest;
                let len = encoding::decode_varint(&mut length)?;
                encoding::skip_field(wire_type, field, &mut rest, Default::default())?;
                let end = wire.len() - rest.len();
                user = end - usize::try_from(len).unwrap_or(end)..end;
            }
            _ => encoding::skip_field(wire_type, field, &mut rest, Default::default())?,
        }
    }
    Ok(Layout {
        sequence,
        raw_json_at: raw_json_at.or(Some(wire.len())),
        user,
    })
}

/// The last top-level string field `wanted` of an encoded message ("" when absent, as
/// protobuf decodes it), read in place; `None` if the bytes do not frame or the string is
/// not UTF-8.
fn find_string(wire: &[u8], wanted: u32) -> Option<&str> {
    let mut rest = wire;
    let mut found: &[u8] = &[];
    while rest.has_remaining() {
        let (field, wire_type) = encoding::decode_key(&mut rest).ok()?;
        if field == wanted && wire_type == WireType::LengthDelimited {
            let len = usize::try_from(encoding::decode_varint(&mut rest).ok()?).ok()?;
            if len > rest.len() {
                return None;
            }
            (found, rest) = rest.split_at(len);
        } else {
            encoding::skip_field(wire_type, field, &mut rest, Default::default()).ok()?;
        }
    }
    std::str::from_utf8(found).ok()
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
    fn the_event_id_reads_without_decoding() {
        let committed = CommittedEvent::new(sample());
        assert_eq!(stored_event_id(&committed.encoded(true)), Some("evt-1"));
        assert_eq!(stored_event_id(&[]), None);
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
    fn the_user_of_a_stored_event_is_read_without_decoding_it() {
        let wire = CommittedEvent::new(sample()).encoded(true);
        let stored = CommittedEvent::stored(42, 0, wire).unwrap();
        assert_eq!(stored.application_user_id(), "user-1");
        assert!(stored.decoded.get().is_none(), "not decoded for it");
        assert!(
            stored.user_at.is_some(),
            "found by the walk, not searched for"
        );
        assert_eq!(
            stored.application_user_id(),
            stored.event().application_user_id
        );
        let anonymous = CommittedEvent::new(Event {
            application_user_id: String::new(),
            ..sample()
        })
        .encoded(true);
        let anonymous = CommittedEvent::stored(42, 0, anonymous).unwrap();
        assert_eq!(anonymous.application_user_id(), "");
        // A repeated field: the last occurrence wins, as in a decode.
        let mut twice = BytesMut::new();
        encoding::string::encode(USER_FIELD, &"earlier".to_owned(), &mut twice);
        twice.extend_from_slice(&CommittedEvent::new(sample()).encoded(true));
        let twice = CommittedEvent::stored(42, 0, twice.freeze()).unwrap();
        assert_eq!(twice.application_user_id(), "user-1");
        assert_eq!(twice.event().application_user_id, "user-1");
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
        assert!(scan(&stored).unwrap().raw_json_at.is_none());
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
        let garbage = Bytes::from_static(&[0xff, 0xff, 0xff]);
        assert!(CommittedEvent::decode(1, garbage.clone()).is_err());
        assert!(CommittedEvent::stored(1, 0, garbage).is_err());
        // A length running past the end.
        let truncated = CommittedEvent::new(sample()).encoded(true).slice(..30);
        assert!(CommittedEvent::stored(42, 0, truncated).is_err());
    }

    #[test]
    fn stored_bytes_are_decoded_only_when_read() {
        let committed = CommittedEvent::new(sample());
        let stored = CommittedEvent::stored(42, 7, committed.encoded(true)).unwrap();
        assert!(stored.decoded.get().is_none(), "not decoded up front");
        assert_eq!(stored.sequence(), 42);
        assert_eq!(stored.received_at(), 7);
        assert_eq!(stored.encoded(false), committed.encoded(false));
        assert_eq!(stored.event(), &sample());
    }

    #[test]
    fn stored_bytes_in_another_layout_are_decoded_and_laid_out_again() {
        // Sequence missing, then another sequence: both go through a full decode.
        let without = CommittedEvent::new(Event {
            sequence: 0,
            ..sample()
        })
        .encoded(true);
        let stored = CommittedEvent::stored(42, 0, without).unwrap();
        assert_eq!(Event::decode(stored.encoded(true)).unwrap(), sample());
        let other = CommittedEvent::new(Event {
            sequence: 7,
            ..sample()
        })
        .encoded(true);
        let stored = CommittedEvent::stored(42, 0, other).unwrap();
        assert_eq!(stored.event(), &sample());
        assert_eq!(Event::decode(stored.encoded(true)).unwrap(), sample());
    }
}
