//! The `Subscribe` stream's codec. Requests are decoded by prost like every other RPC;
//! events go out as the bytes the log encoded once when it committed them
//! ([`CommittedEvent::encoded`](crate::events::CommittedEvent::encoded)), so a delivery
//! is a copy into the HTTP/2 frame, not an `Event` encoding per subscriber.

use bytes::{BufMut, Bytes};
use tonic::{
    Status,
    codec::{Codec, EncodeBuf, Encoder},
};
use tonic_prost::ProstDecoder;

use crate::proto::{ConsumeRequest, SubscribeRequest};

/// One `spike.gateway.v1.Event`, already encoded.
#[derive(Debug, Clone)]
pub struct EncodedEvent(pub Bytes);

#[derive(Debug, Clone, Copy, Default)]
pub struct SubscribeCodec;

impl Codec for SubscribeCodec {
    type Encode = EncodedEvent;
    type Decode = SubscribeRequest;
    type Encoder = EncodedEventEncoder;
    type Decoder = ProstDecoder<SubscribeRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEventEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EncodedEventEncoder;

impl Encoder for EncodedEventEncoder {
    type Item = EncodedEvent;
    type Error = Status;

    fn encode(&mut self, item: EncodedEvent, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item.0);
        Ok(())
    }
}

/// One `spike.gateway.v1.Delivery`: the event's bytes as the log encoded them (shared,
/// not copied) and the attempt, written as `Delivery`'s wire format straight into the
/// HTTP/2 frame by [`EncodedDeliveryEncoder`], with no buffer of its own per delivery.
#[derive(Debug, Clone)]
pub struct EncodedDelivery {
    event: Bytes,
    attempt: u32,
}

impl EncodedDelivery {
    pub fn new(event: Bytes, attempt: u32) -> Self {
        Self { event, attempt }
    }

    /// `Delivery { event: <encoded>, attempt }` in protobuf's wire format.
    pub fn encode(&self, buf: &mut impl BufMut) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(self.event.len() as u64, buf);
        buf.put_slice(&self.event);
        if self.attempt != 0 {
            encode_key(2, WireType::Varint, buf);
            encode_varint(u64::from(self.attempt), buf);
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumeCodec;

impl Codec for ConsumeCodec {
    type Encode = EncodedDelivery;
    type Decode = ConsumeRequest;
    type Encoder = EncodedDeliveryEncoder;
    type Decoder = ProstDecoder<ConsumeRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedDeliveryEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EncodedDeliveryEncoder;

impl Encoder for EncodedDeliveryEncoder {
    type Item = EncodedDelivery;
    type Error = Status;

    fn encode(&mut self, item: EncodedDelivery, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::EncodedDelivery;
    use crate::proto::{Delivery, Event};

    #[test]
    fn an_encoded_delivery_decodes_as_prost_would_encode_it() {
        let event = Event {
            event_id: "e".into(),
            sequence: 7,
            application_user_id: "u".into(),
            ..Event::default()
        };
        for attempt in [0, 1, 300] {
            let mut encoded = Vec::new();
            EncodedDelivery::new(event.encode_to_vec().into(), attempt).encode(&mut encoded);
            let expected = Delivery {
                event: Some(event.clone()),
                attempt,
            };
            assert_eq!(Delivery::decode(encoded.as_slice()).unwrap(), expected);
        }
    }
}
