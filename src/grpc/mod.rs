//! The gRPC server: `EventStream`, `SpikeRecords`, `Admin`, `grpc.health.v1.Health`, and
//! server reflection v1 and v1alpha (older grpcurl releases speak only v1alpha).

pub mod admin;
pub mod auth;
pub mod codec;
pub mod consume;
pub mod deadline;
pub mod event_stream;
pub mod group_admin;
pub mod records;
pub mod validate;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::{
    events::{EventLog, consumers::ConsumerGroups, groups::Limits},
    proto::{FILE_DESCRIPTOR_SET, spike_records_server::SpikeRecordsServer},
    spike::SpikeClient,
};
use auth::BearerAuth;
use event_stream::{EventStreamServer, EventStreamService};
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
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
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
    let groups = parts.log.serves_consumer_groups().then(|| {
        Arc::new(ConsumerGroups::new(
            parts.log.clone(),
            parts.group_limits,
            parts.streams_shutdown.clone(),
        ))
    });
    let admin = crate::proto::admin_server::AdminServer::with_interceptor(
        admin::AdminService::new(parts.log.clone(), parts.metrics.clone())
            .with_groups(groups.clone()),
        BearerAuth::required(
            parts.admin_tokens,
            "the Admin service is disabled: set GATEWAY_ADMIN_TOKENS to enable it",
        ),
    );
    let records = tonic::service::interceptor::InterceptedService::new(
        SpikeRecordsServer::new(RecordsService::new(
            parts.spike,
            parts.log.clone(),
            parts.metrics.clone(),
        ))
        .max_decoding_message_size(records::MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let event_stream = EventStreamServer::with_interceptor(
        EventStreamService::new(
            parts.log,
            groups.clone(),
            parts.streams_shutdown,
            parts.metrics,
        ),
        auth.clone(),
    );

    let mut server = Server::builder().trace_fn(|request| {
        let offered = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok());
        tracing::info_span!(
            "rpc",
            method = %request.uri().path(),
            request_id = %crate::telemetry::request_id(offered),
        )
    });
    if let Some(tls) = parts.tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(health)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1alpha,
            auth,
        ))
        .add_service(event_stream)
        .add_service(records)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small HTTP/2 frames wait on delayed ACKs: ~40 ms stalls
            // in delivery (measured by the latency benchmark). Keepalive finds dead peers
            // behind idle streams.
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(std::time::Duration::from_secs(60))),
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
