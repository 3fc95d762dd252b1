//! The gRPC server: `EventStream`, `SpikeRecords`, `Admin`, `grpc.health.v1.Health`, and
//! server reflection v1 and v1alpha (older grpcurl releases speak only v1alpha).

pub mod admin;
pub mod auth;
pub mod codec;
pub mod connections;
pub mod consume;
pub mod deadline;
pub mod event_stream;
pub mod group_admin;
pub mod health;
pub mod records;
pub mod validate;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};
use tonic_health::server::{HealthReporter, HealthService};

use crate::{
    config::{FilterLimits, GrpcLimits},
    events::{EventLog, consumers::ConsumerGroups, groups::Limits},
    proto::{
        FILE_DESCRIPTOR_SET, admin_server::AdminServer, spike_records_server::SpikeRecordsServer,
    },
    spike::SpikeClient,
};
use auth::BearerAuth;
use event_stream::{EventStreamServer, EventStreamService, StreamLimits};
use records::RecordsService;

/// Everything the gRPC server needs.
pub struct GrpcParts {
    pub log: Arc<dyn EventLog>,
    pub tokens: Vec<crate::config::Secret>,
    pub admin_tokens: Vec<crate::config::Secret>,
    /// Bounds on each consumer group's memory.
    pub group_limits: Limits,
    /// Cancelled at shutdown: ends open streams with UNAVAILABLE.
    pub streams_shutdown: CancellationToken,
    pub spike: Arc<SpikeClient>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// TLS (and with a client CA, mTLS) for the whole gRPC server.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub limits: GrpcLimits,
}

/// Largest `Admin` request: a user id and a little framing.
const ADMIN_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest `Subscribe` request: a filter at its limits, with room for protobuf framing and
/// the start position. Bigger requests are refused before they are decoded, so an oversized
/// filter costs nothing (a 4 MiB filter decoded into strings is ~27 MiB).
pub fn subscribe_message_limit(filter: FilterLimits) -> usize {
    let strings = 2 * filter.max_items * (filter.max_item_bytes + 8);
    let event_types = filter.max_items * 11;
    strings + event_types + 4096
}

/// Reads the configured certificate, key and client CA into a TLS configuration.
pub fn tls_config(
    files: &crate::config::TlsFiles,
) -> Result<tonic::transport::ServerTlsConfig, String> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

/// Serves until `stop` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    parts: GrpcParts,
    health: HealthService,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let limits = parts.limits;
    let health = health::BoundedHealth::server(health, limits.max_health_watches);
    let auth = BearerAuth::new(parts.tokens);
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid: build.rs produced it");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor set is valid: build.rs produced it");
    // Consumer groups are served over a local log's history; NATS serves none yet.
    let groups = parts.log.clone().backend().local().map(|local| {
        Arc::new(ConsumerGroups::new(
            local,
            parts.group_limits,
            parts.streams_shutdown.clone(),
        ))
    });
    let admin = InterceptedService::new(
        AdminServer::new(
            admin::AdminService::new(parts.log.clone(), parts.metrics.clone())
                .with_groups(groups.clone()),
        )
        .max_decoding_message_size(ADMIN_MESSAGE_BYTES),
        BearerAuth::required(
            parts.admin_tokens,
            "the Admin service is disabled: set GATEWAY_ADMIN_TOKENS to enable it",
        ),
    );
    let records = InterceptedService::new(
        SpikeRecordsServer::new(RecordsService::new(
            parts.spike,
            parts.log.clone(),
            parts.metrics.clone(),
        ))
        .max_decoding_message_size(records::MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let event_stream = InterceptedService::new(
        EventStreamServer::new(EventStreamService::new(
            parts.log,
            groups.clone(),
            parts.streams_shutdown,
            parts.metrics,
            StreamLimits {
                filter: limits.filter,
                buffer_bytes: limits.subscriber_buffer_bytes,
            },
        ))
        .max_decoding_message_size(subscribe_message_limit(limits.filter)),
        auth.clone(),
    );

    let mut server = bounded_server(&limits);
    if let Some(tls) = parts.tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(health)
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth))
        .add_service(event_stream)
        .add_service(records)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // HTTP/2 keepalive pings (see `bounded_server`) find dead peers behind idle streams.
            connections::incoming(listener, limits.max_connections, limits.idle_timeout),
            stop,
        )
        .await?;
    // The groups' tasks end with the streams (their shutdown is `streams_shutdown`) and
    // save their state on the way: wait, so the log closes after them.
    if let Some(groups) = groups {
        groups.stopped().await;
    }
    Ok(())
}

/// The server with its per-connection bounds (SPEC §6) and a span per RPC.
fn bounded_server(limits: &GrpcLimits) -> Server {
    Server::builder()
        // Without it one connection could open streams until memory runs out.
        .max_concurrent_streams(limits.max_streams_per_connection)
        // Pings make every live client send something within the interval, so the idle
        // timeout in `connections` only closes silent or dead peers.
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .trace_fn(|request| {
            let offered = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok());
            tracing::info_span!(
                "rpc",
                method = %request.uri().path(),
                request_id = %crate::telemetry::request_id(offered),
            )
        })
}

/// Marks the gateway's services serving (or not) in `grpc.health.v1`.
pub async fn set_serving(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    for service in [
        "spike.gateway.v1.EventStream",
        "spike.gateway.v1.SpikeRecords",
        "spike.gateway.v1.Admin",
    ] {
        reporter.set_service_status(service, status).await;
    }
}
