//! The durable part of a group as bytes, for a backend to keep in its own store.
//!
//! Layout (version 1): the magic `SGCG`, a version byte, then LEB128 varints (zigzag for
//! signed values) and length-prefixed UTF-8 strings:
//!
//! ```text
//! name, created_at, ordering (0 | 1), ack_wait,
//! event_types (count, values), application_user_ids (count, strings),
//! provider_slugs (count, strings),
//! read_position, unsettled (count, then per event: sequence delta from the previous
//! one, attempts), acks, naks, redeliveries, terminated, expired
//! ```
//!
//! and a CRC-32 (IEEE) of everything before it, little-endian. The unsettled list is what
//! keeps the snapshot small: it holds the events read but not settled (bounded, see the
//! module docs of [`super`]), not the acked ones, which grow with the traffic behind a
//! stuck event. Decoding checks every length against the bytes left, so damaged input is
//! an error, never a panic or a huge allocation, and it validates the name and filter as
//! an open would.

use std::collections::BTreeMap;

use super::{
    config::{GroupConfig, GroupFilter, GroupName, Limits, Ordering},
    state::{Counters, Durable, Group},
};

const MAGIC: &[u8; 4] = b"SGCG";
const VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a consumer-group snapshot")]
    NotASnapshot,
    #[error("consumer-group snapshot version {0} is newer than this gateway reads")]
    UnknownVersion(u8),
    #[error("consumer-group snapshot is damaged: {0}")]
    Damaged(String),
}

fn damaged(what: impl Into<String>) -> SnapshotError {
    SnapshotError::Damaged(what.into())
}

impl Group {
    /// The durable part: position, unsettled events with their attempts, definition and
    /// counters. In-flight state is not kept: after a restore every unsettled event is
    /// delivered again (counting the attempts made before), none is skipped.
    pub fn snapshot(&self) -> Vec<u8> {
        encode(&self.durable())
    }

    /// A group from [`Group::snapshot`]'s bytes, with no members and nothing in flight.
    /// The backend then calls [`Group::expire_before`] with the log's oldest sequence.
    pub fn restore(bytes: &[u8], limits: Limits) -> Result<Self, SnapshotError> {
        Ok(Self::from_durable(decode(bytes)?, limits))
    }
}

fn encode(durable: &Durable) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 4 * durable.unsettled.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    put_bytes(&mut out, durable.name.as_str().as_bytes());
    put_signed(&mut out, durable.created_at);
    put(&mut out, ordering_code(durable.config.ordering));
    put_signed(&mut out, durable.config.ack_wait);
    let filter = &durable.config.filter;
    put(&mut out, filter.event_types().count() as u64);
    for event_type in filter.event_types() {
        put_signed(&mut out, i64::from(event_type));
    }
    for strings in [
        filter.application_user_ids().collect::<Vec<_>>(),
        filter.provider_slugs().collect(),
    ] {
        put(&mut out, strings.len() as u64);
        for string in strings {
            put_bytes(&mut out, string.as_bytes());
        }
    }
    put(&mut out, durable.read_position);
    put(&mut out, durable.unsettled.len() as u64);
    let mut previous = 0;
    for (&sequence, &attempts) in &durable.unsettled {
        put(&mut out, sequence - previous);
        put(&mut out, u64::from(attempts));
        previous = sequence;
    }
    let c = &durable.counters;
    for counter in [c.acks, c.naks, c.redeliveries, c.terminated, c.expired] {
        put(&mut out, counter);
    }
    let checksum = crc32(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

fn ordering_code(ordering: Ordering) -> u64 {
    match ordering {
        Ordering::Unordered => 0,
        Ordering::PerUser => 1,
    }
}

fn decode(bytes: &[u8]) -> Result<Durable, SnapshotError> {
    if bytes.len() < MAGIC.len() + 1 + CHECKSUM_LEN || !bytes.starts_with(MAGIC) {
        return Err(SnapshotError::NotASnapshot);
    }
    let version = bytes[MAGIC.len()];
    if version != VERSION {
        return Err(SnapshotError::UnknownVersion(version));
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if crc32(body).to_le_bytes() != checksum {
        return Err(damaged("checksum mismatch"));
    }
    let mut reader = Reader(&body[MAGIC.len() + 1..]);
    let durable = read_durable(&mut reader)?;
    if !reader.0.is_empty() {
        return Err(damaged("trailing bytes"));
    }
    Ok(durable)
}

fn read_durable(reader: &mut Reader<'_>) -> Result<Durable, SnapshotError> {
    let name = GroupName::parse(&reader.string()?).map_err(|e| damaged(e.to_string()))?;
    let created_at = reader.signed()?;
    let ordering = match reader.varint()? {
        0 => Ordering::Unordered,
        1 => Ordering::PerUser,
        _ => return Err(damaged("unknown ordering")),
    };
    let ack_wait = reader.signed()?;
    if ack_wait <= 0 {
        return Err(damaged("ack_wait is not positive"));
    }
    let filter = read_filter(reader)?;
    let config = GroupConfig {
        filter,
        ordering,
        ack_wait,
    };
    let read_position = reader.varint()?;
    let unsettled = read_unsettled(reader, read_position)?;
    let mut counter = || reader.varint();
    let counters = Counters {
        acks: counter()?,
        naks: counter()?,
        redeliveries: counter()?,
        terminated: counter()?,
        expired: counter()?,
    };
    Ok(Durable {
        name,
        config,
        created_at,
        read_position,
        unsettled,
        counters,
    })
}

fn read_filter(reader: &mut Reader<'_>) -> Result<GroupFilter, SnapshotError> {
    let types = reader.count(1)?;
    let event_types = (0..types)
        .map(|_| {
            let value = reader.signed()?;
            i32::try_from(value).map_err(|_| damaged("event type out of range"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut strings = || -> Result<Vec<String>, SnapshotError> {
        let count = reader.count(1)?;
        (0..count).map(|_| reader.string()).collect()
    };
    let users = strings()?;
    let providers = strings()?;
    GroupFilter::new(&event_types, users, providers).map_err(|e| damaged(e.to_string()))
}

fn read_unsettled(
    reader: &mut Reader<'_>,
    read_position: u64,
) -> Result<BTreeMap<u64, u32>, SnapshotError> {
    let count = reader.count(2)?;
    let mut unsettled = BTreeMap::new();
    let mut previous = None;
    for _ in 0..count {
        let delta = reader.varint()?;
        let sequence = match previous {
            None => delta,
            Some(_) if delta == 0 => return Err(damaged("unsettled events out of order")),
            Some(previous) => u64::checked_add(previous, delta)
                .ok_or_else(|| damaged("unsettled sequence overflows"))?,
        };
        if sequence >= read_position {
            return Err(damaged("unsettled event at or past the read position"));
        }
        let attempts =
            u32::try_from(reader.varint()?).map_err(|_| damaged("attempts out of range"))?;
        unsettled.insert(sequence, attempts);
        previous = Some(sequence);
    }
    Ok(unsettled)
}

fn put(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_signed(out: &mut Vec<u8>, value: i64) {
    put(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The undecoded rest of a snapshot.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, SnapshotError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or_else(|| damaged("truncated"))?;
            self.0 = rest;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(damaged("varint overflows"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(damaged("varint too long"))
    }

    fn signed(&mut self) -> Result<i64, SnapshotError> {
        let raw = self.varint()?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// A count of items of at least `min_bytes` each: never more than the bytes left allow.
    fn count(&mut self, min_bytes: usize) -> Result<usize, SnapshotError> {
        let count = self.varint()?;
        match usize::try_from(count) {
            Ok(count) if count <= self.0.len() / min_bytes => Ok(count),
            _ => Err(damaged("count exceeds the bytes left")),
        }
    }

    fn string(&mut self) -> Result<String, SnapshotError> {
        let len = self.count(1)?;
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(bytes.to_vec()).map_err(|_| damaged("string is not UTF-8"))
    }
}

/// CRC-32 (IEEE 802.3, reflected), bitwise: snapshots are small and written about once a
/// second, so a table buys nothing.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::events::groups::{Candidate, Scan};

    fn busy_group() -> Group {
        let filter = GroupFilter::new(&[1, 2], vec!["u-1".into()], vec!["garmin".into()]).unwrap();
        let config = GroupConfig::new(filter, Ordering::PerUser, 5_000).unwrap();
        let name = GroupName::parse("billing.v2").unwrap();
        let mut group = Group::create(name, config, -1_234, 10, Limits::default());
        let member = group.join(3).unwrap();
        let candidates: Vec<Candidate> = (10..20)
            .map(|sequence| Candidate {
                sequence,
                user: Arc::from(if sequence % 2 == 0 { "a" } else { "b" }),
            })
            .collect();
        let scan = Scan {
            matching: &candidates,
            end: 25,
        };
        let got = group.next_deliveries(member, 0, scan).unwrap();
        assert_eq!(got.len(), 2, "one per user under per-user ordering");
        group.ack(member, &[10]).unwrap();
        group.nak(member, &[11], 100, 0).unwrap();
        group
    }

    #[test]
    fn a_snapshot_round_trips_exactly() {
        let group = busy_group();
        let bytes = group.snapshot();
        let restored = Group::restore(&bytes, Limits::default()).unwrap();
        assert_eq!(restored.durable(), group.durable());
        assert_eq!(restored.snapshot(), bytes);
        assert_eq!(restored.acked_through(), group.acked_through());
        assert_eq!(restored.stats(0).pending, group.stats(0).pending);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_an_error() {
        let bytes = busy_group().snapshot();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[at] ^= 1 << bit;
                assert!(decode(&flipped).is_err(), "bit {bit} of byte {at}");
            }
        }
    }

    #[test]
    fn another_version_is_named() {
        let mut bytes = busy_group().snapshot();
        bytes[4] = 2;
        assert_eq!(decode(&bytes), Err(SnapshotError::UnknownVersion(2)));
        assert_eq!(decode(b"nope, not this"), Err(SnapshotError::NotASnapshot));
    }

    /// Bytes with a valid frame and checksum around a hostile body.
    fn framed(body: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.push(VERSION);
        bytes.extend_from_slice(body);
        let checksum = crc32(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    #[test]
    fn a_valid_checksum_around_a_hostile_body_is_still_refused() {
        // A name of u64::MAX bytes, then a count of 2^60 unsettled events.
        let mut body = Vec::new();
        put(&mut body, u64::MAX);
        assert!(decode(&framed(&body)).is_err());
        let mut body = Vec::new();
        put_bytes(&mut body, b"g");
        put_signed(&mut body, 0);
        put(&mut body, 0);
        put_signed(&mut body, 1);
        for _ in 0..3 {
            put(&mut body, 0);
        }
        put(&mut body, 5);
        put(&mut body, 1 << 60);
        assert_eq!(
            decode(&framed(&body)),
            Err(damaged("count exceeds the bytes left"))
        );
    }

    #[test]
    fn the_checksum_is_crc32_ieee() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
        ))]

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&framed(&body));
            let _ = decode(&body);
        }

        #[test]
        fn varints_round_trip(value in any::<u64>(), signed in any::<i64>()) {
            let mut out = Vec::new();
            put(&mut out, value);
            put_signed(&mut out, signed);
            let mut reader = Reader(&out);
            prop_assert_eq!(reader.varint().unwrap(), value);
            prop_assert_eq!(reader.signed().unwrap(), signed);
            prop_assert!(reader.0.is_empty());
        }
    }
}
