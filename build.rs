//! Compiles `proto/` with protox (a pure-Rust protobuf compiler) so that a fresh machine
//! needs no system `protoc`, and saves the descriptor set for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/spike/gateway/v1/events.proto",
    "proto/spike/gateway/v1/event_stream.proto",
    "proto/spike/gateway/v1/records.proto",
    "proto/spike/gateway/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("spike_gateway_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // prost's `event_stream_server` goes unused: the server is built by
    // `event_stream_server()` below, with its own codec.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // raw_json is shared by every subscriber of an event: `Bytes` clones are refcounts.
        .bytes(".spike.gateway.v1.Event.raw_json")
        // Deterministic field order in nutritional_fields, for readable output and stable tests.
        .btree_map(".")
        .compile_fds(descriptors)?;
    event_stream_server();
    Ok(())
}

/// The server side of `EventStream` with the stream's own codec: `Subscribe` sends events
/// the log has already encoded (`grpc::codec`). The route and messages are those of
/// `event_stream.proto`, so clients, reflection and grpcurl see no difference; clients keep
/// using the prost-generated `event_stream_client`.
fn event_stream_server() {
    let subscribe = tonic_build::manual::Method::builder()
        .name("subscribe")
        .route_name("Subscribe")
        .input_type("crate::proto::SubscribeRequest")
        .output_type("crate::grpc::codec::EncodedEvent")
        .codec_path("crate::grpc::codec::SubscribeCodec")
        .server_streaming()
        .build();
    // `Consume` sends each delivery around the event bytes the log encoded once, like
    // `Subscribe` (`grpc::codec::ConsumeCodec`).
    let consume = tonic_build::manual::Method::builder()
        .name("consume")
        .route_name("Consume")
        .input_type("crate::proto::ConsumeRequest")
        .output_type("crate::grpc::codec::EncodedDelivery")
        .codec_path("crate::grpc::codec::ConsumeCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("EventStream")
        .package("spike.gateway.v1")
        .method(subscribe)
        .method(consume)
        .build();
    // Writes `spike.gateway.v1.EventStream.rs`, next to prost's `spike.gateway.v1.rs`.
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[service]);
}
