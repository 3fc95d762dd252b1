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
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // raw_json is shared by every subscriber of an event: `Bytes` clones are refcounts.
        .bytes(".spike.gateway.v1.Event.raw_json")
        // Deterministic field order in nutritional_fields, for readable output and stable tests.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
