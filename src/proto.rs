//! Types generated from `proto/spike/gateway/v1` by `build.rs`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("spike.gateway.v1");

/// Every proto file of the API, encoded, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/spike_gateway_descriptor.bin"));
