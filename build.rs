//! Compiles `proto/` with protox (a pure-Rust protobuf compiler) so that a fresh machine
//! needs no system `protoc`, and saves the descriptor set for gRPC server reflection.
//! Also records what `spike_gateway_build_info` reports: the git commit (when built from a
//! checkout, or given as `SPIKE_GATEWAY_GIT_COMMIT`) and the compiler's version.

use std::{path::PathBuf, process::Command};

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
    build_info();
    Ok(())
}

/// Sets `SPIKE_GATEWAY_GIT_COMMIT` and `SPIKE_GATEWAY_RUSTC_VERSION` for `env!`; either is
/// `unknown` when it cannot be found (a source tarball, a container build without `.git`).
fn build_info() {
    println!("cargo:rerun-if-env-changed=SPIKE_GATEWAY_GIT_COMMIT");
    let commit = std::env::var("SPIKE_GATEWAY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs.
            for path in ["HEAD", "packed-refs"] {
                watch_git_path(path);
            }
            if let Some(branch) = output("git", &["rev-parse", "--symbolic-full-name", "HEAD"]) {
                watch_git_path(&branch);
            }
            output("git", &["rev-parse", "--short=12", "HEAD"])
        });
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    // `rustc 1.91.0 (f8297e351 2025-10-28)`: the version is the second word.
    let rustc_version =
        output(&rustc, &["--version"]).and_then(|v| v.split_whitespace().nth(1).map(str::to_owned));
    let unknown = || "unknown".to_owned();
    println!(
        "cargo:rustc-env=SPIKE_GATEWAY_GIT_COMMIT={}",
        commit.unwrap_or_else(unknown)
    );
    println!(
        "cargo:rustc-env=SPIKE_GATEWAY_RUSTC_VERSION={}",
        rustc_version.unwrap_or_else(unknown)
    );
}

/// A command's trimmed stdout, if it ran and succeeded.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Asks cargo to rerun this script when a file of the git directory changes. Only existing
/// files: a missing one would make cargo rerun the script on every build.
fn watch_git_path(path: &str) {
    if let Some(file) = output("git", &["rev-parse", "--git-path", path])
        && std::path::Path::new(&file).exists()
    {
        println!("cargo:rerun-if-changed={file}");
    }
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
