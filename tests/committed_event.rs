//! Properties of `CommittedEvent`, the encoded-once form every subscriber is sent: the bytes
//! read back from a store decode to the event that was committed, with and without
//! `raw_json`, and bytes that are not an event are refused without a panic.
//! Property cases are capped (PROPTEST_CASES, default 256) so CI time stays bounded.

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use spike_gateway::{
    events::CommittedEvent,
    proto::{Event, RecordChange, event::Payload},
};

fn event_strategy() -> impl Strategy<Value = Event> {
    (
        1..u64::MAX,
        ".{0,40}",
        ".{0,40}",
        0..8i32,
        ".{0,20}",
        prop::collection::vec(".{0,12}", 0..4),
        prop::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(
            |(sequence, event_id, user, event_type, provider, metrics, raw_json)| Event {
                sequence,
                event_id,
                r#type: event_type,
                category: 1,
                application_user_id: user,
                payload: Some(Payload::RecordChange(RecordChange {
                    provider_slug: provider,
                    metrics,
                    ..Default::default()
                })),
                raw_json: Bytes::from(raw_json),
                ..Default::default()
            },
        )
}

fn without_raw_json(event: &Event) -> Event {
    Event {
        raw_json: Bytes::new(),
        ..event.clone()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn what_a_store_reads_back_is_what_was_committed(event in event_strategy(), received in any::<i64>()) {
        let committed = CommittedEvent::new(event.clone());
        let wire = committed.encoded(true);
        let lazily = CommittedEvent::stored(event.sequence, received, wire.clone()).unwrap();
        let eagerly = CommittedEvent::decode(event.sequence, wire).unwrap();
        for read in [&lazily, &eagerly] {
            prop_assert_eq!(read.sequence(), event.sequence);
            prop_assert_eq!(read.event(), &event);
            prop_assert_eq!(Event::decode(read.encoded(true)).unwrap(), event.clone());
            prop_assert_eq!(Event::decode(read.encoded(false)).unwrap(), without_raw_json(&event));
        }
        prop_assert_eq!(lazily.received_at(), received);
    }

    #[test]
    fn an_event_stored_without_its_sequence_gets_it_back(event in event_strategy()) {
        let stored = CommittedEvent::new(Event { sequence: 0, ..event.clone() }).encoded(true);
        for read in [
            CommittedEvent::stored(event.sequence, 0, stored.clone()).unwrap(),
            CommittedEvent::decode(event.sequence, stored).unwrap(),
        ] {
            prop_assert_eq!(Event::decode(read.encoded(true)).unwrap(), event.clone());
            prop_assert_eq!(Event::decode(read.encoded(false)).unwrap(), without_raw_json(&event));
        }
    }

    #[test]
    fn arbitrary_bytes_are_refused_or_read_but_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), sequence in any::<u64>()) {
        let bytes = Bytes::from(bytes);
        if let Ok(read) = CommittedEvent::stored(sequence, 0, bytes.clone()) {
            let _ = read.event();
            let _ = read.encoded(false);
        }
        if let Ok(read) = CommittedEvent::decode(sequence, bytes) {
            prop_assert_eq!(read.event().sequence, sequence);
            let _ = read.encoded(false);
        }
    }

    #[test]
    fn a_damaged_event_is_refused_or_read_but_never_panics(event in event_strategy(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = CommittedEvent::new(event.clone()).encoded(true).to_vec();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        let bytes = Bytes::from(bytes);
        if let Ok(read) = CommittedEvent::stored(event.sequence, 0, bytes.clone()) {
            let _ = read.event();
            let _ = read.encoded(false);
        }
        let _ = CommittedEvent::decode(event.sequence, bytes);
    }
}
