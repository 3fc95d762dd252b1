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

use crate::proto::SubscribeRequest;

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
