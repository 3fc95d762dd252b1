//! What grpcurl and load balancers rely on: reflection v1 and v1alpha, health, and the
//! optional bearer-token check.

mod support;

use support::*;
use tonic::{Code, Request, transport::Channel};

async fn channel(app: &TestApp) -> Channel {
    Channel::from_shared(format!("http://{}", app.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

const EXPECTED: [&str; 2] = ["spike.gateway.v1.EventStream", "grpc.health.v1.Health"];

#[tokio::test]
async fn reflection_v1_lists_the_services_and_serves_their_files() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(channel(&app).await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("spike.gateway.v1.EventStream".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        next_answer(&mut answers).await.message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in EXPECTED {
        assert!(names.contains(&expected), "{names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        next_answer(&mut answers).await.message_response
    else {
        panic!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn reflection_v1alpha_works_for_older_grpcurl() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(channel(&app).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        next_answer(&mut answers).await.message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in EXPECTED {
        assert!(names.contains(&expected), "{names:?}");
    }
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let app = spawn_app().await;
    let mut client = HealthClient::new(channel(&app).await);
    for service in ["", "spike.gateway.v1.EventStream"] {
        let status = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn with_tokens_configured_every_rpc_but_health_needs_one() {
    use spike_gateway::proto::{SubscribeRequest, event_stream_client::EventStreamClient};
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let app = spawn_app_with(&["--grpc-tokens", "alpha,beta"]).await;
    let mut client = EventStreamClient::new(channel(&app).await);

    let with = |token: Option<&str>| {
        let mut request = Request::new(SubscribeRequest::default());
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", token.parse().unwrap());
        }
        request
    };
    for bad in [
        None,
        Some("Bearer gamma"),
        Some("alpha"),
        Some("Bearer "),
        Some("Basic alpha"),
        Some("bearer ALPHA"),
    ] {
        let status = client.subscribe(with(bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{bad:?}");
    }
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
    for good in ["Bearer alpha", "Bearer beta", "bearer alpha", "BEARER beta"] {
        assert!(client.subscribe(with(Some(good))).await.is_ok(), "{good}");
    }
    let mut health = HealthClient::new(channel(&app).await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");
}

/// The next reflection answer, failing the test if none arrives within 5 s.
async fn next_answer<T>(answers: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(5), answers.message())
        .await
        .expect("a reflection answer within 5 s")
        .expect("no error")
        .expect("an answer, not the end of the stream")
}
