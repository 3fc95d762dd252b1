//! OpenTelemetry traces from the real binary into an OTLP receiver started here, over both
//! protocols (gRPC and HTTP protobuf): span names, parent links (an incoming `traceparent`
//! on a webhook and on an RPC, webhook → append), the trace context each delivered event
//! carries, `traceparent` sent to Spike, and no payload value, key or token in any span.

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use prost::Message;
use spike_gateway::{
    proto::{GetNutritionRecordRequest, spike_records_client::SpikeRecordsClient},
    webhook::signature::sign,
};
use support::{
    KEY, MAIN, eventually,
    fake_spike::{APPLICATION_ID, FakeSpike, HMAC_KEY},
    from_beginning,
    real_binary::{self, Gateway},
    take,
};
use tokio_stream::wrappers::TcpListenerStream;

/// How long spans may take to reach the receiver (the batch delay is set to 100 ms).
const SPANS_WITHIN: Duration = Duration::from_secs(20);

/// An incoming trace context, as an upstream caller would send it.
const WEBHOOK_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const WEBHOOK_PARENT: &str = "00f067aa0ba902b7";
const RPC_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const RPC_PARENT: &str = "b7ad6b7169203331";

/// Payload values no span may carry.
const USER: &str = "user-7f3c1e9a";
const PROVIDER: &str = "provider-d41d8cd9";

/// Every span the receiver was sent, with its resource's `service.name`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| render(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on port 0.
async fn grpc_receiver(received: Received) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on port 0.
async fn http_receiver(received: Received) -> SocketAddr {
    async fn traces(State(received): State<Received>, body: Bytes) -> Vec<u8> {
        received.add(ExportTraceServiceRequest::decode(body).expect("OTLP protobuf"));
        ExportTraceServiceResponse::default().encode_to_vec()
    }
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .with_state(received);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn render(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| render(kv.value.as_ref().and_then(|v| v.value.as_ref())))
}

fn named<'a>(spans: &'a [(String, Span)], name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == name)
        .collect()
}

/// The binary exporting to `endpoint` with `protocol`, proxying to `spike`, exporting
/// batches every 100 ms.
fn gateway(dir: &std::path::Path, protocol: &str, endpoint: &str, spike: &str) -> Gateway {
    let mut command = exporting(dir, protocol, endpoint);
    command.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    command.envs([
        ("SPIKE_API_BASE_URL", spike),
        ("SPIKE_APPLICATION_ID", APPLICATION_ID),
        ("SPIKE_HMAC_KEY", HMAC_KEY),
    ]);
    real_binary::start(command).unwrap_or_else(|log| panic!("the gateway refused to start:\n{log}"))
}

fn exporting(dir: &std::path::Path, protocol: &str, endpoint: &str) -> std::process::Command {
    let mut command = real_binary::command(dir, KEY);
    command.envs([
        ("GATEWAY_STORE", "memory"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_SERVICE_NAME", "gateway-under-test"),
    ]);
    command
}

fn payload(n: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "application_user_id": USER,
        "timestamp": format!("2025-04-15T13:33:55.{n:09}Z"),
        "event_type": "record_change",
        "metrics": ["steps"],
        "provider_slug": PROVIDER,
    }))
    .unwrap()
}

/// Posts a signed webhook; its 200 body.
async fn post_webhook(gw: &Gateway, body: Vec<u8>, traceparent: Option<&str>) -> serde_json::Value {
    let mut request = reqwest::Client::new()
        .post(format!("http://{}{MAIN}", gw.http))
        .header("X-Body-Signature", sign(KEY, &body))
        .body(body);
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the whole scenario against a receiver speaking `protocol`.
async fn traces_reach_the_receiver(protocol: &str, endpoint: String, received: Received) {
    let spike = FakeSpike::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), protocol, &endpoint, &spike.url);

    post_webhook(&gw, payload(1), None).await;
    let incoming = format!("00-{WEBHOOK_TRACE}-{WEBHOOK_PARENT}-01");
    post_webhook(&gw, payload(2), Some(&incoming)).await;
    // The trace context is not part of the event's identity: a redelivery in another
    // trace is still a duplicate.
    let again = format!("00-{RPC_TRACE}-{WEBHOOK_PARENT}-01");
    let answer = post_webhook(&gw, payload(1), Some(&again)).await;
    assert_eq!(answer["duplicates"], 1, "{answer}");

    let mut records = SpikeRecordsClient::connect(format!("http://{}", gw.grpc))
        .await
        .unwrap();
    let mut request = tonic::Request::new(GetNutritionRecordRequest {
        application_user_id: USER.into(),
        record_id: "rec-1".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{RPC_TRACE}-{RPC_PARENT}-01").parse().unwrap(),
    );
    records.get_nutrition_record(request).await.unwrap();

    let mut client = spike_gateway::proto::event_stream_client::EventStreamClient::connect(
        format!("http://{}", gw.grpc),
    )
    .await
    .unwrap();
    let mut stream = client
        .subscribe(from_beginning())
        .await
        .unwrap()
        .into_inner();
    let events = take(&mut stream, 2).await;
    drop(stream);

    // Sent to Spike: the data call carries the incoming RPC trace.
    let data = spike.data_requests();
    let sent = data[0]
        .traceparent
        .as_deref()
        .expect("traceparent sent to Spike");
    assert!(sent.starts_with(&format!("00-{RPC_TRACE}-")), "{sent}");

    let wanted = |spans: &[(String, Span)]| {
        named(spans, "webhook receive").len() >= 3
            && named(spans, "append events").len() >= 3
            && named(spans, "webhook verify").len() >= 3
            && !named(spans, "spike.gateway.v1.SpikeRecords/GetNutritionRecord").is_empty()
            && !named(spans, "GET").is_empty()
    };
    let spans = eventually(SPANS_WITHIN, "the spans are exported", async || {
        let spans = received.spans();
        wanted(&spans).then_some(spans)
    })
    .await;
    // Flush on shutdown: SIGTERM within the grace, nothing refused.
    let exit = tokio::task::block_in_place(|| gw.terminate(Duration::from_secs(15)));
    assert!(exit.success());

    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "gateway-under-test")
    );
    let receives = named(&spans, "webhook receive");
    let continued = receives
        .iter()
        .find(|s| hex(&s.trace_id) == WEBHOOK_TRACE)
        .expect("the webhook with a traceparent continues its trace");
    assert_eq!(hex(&continued.parent_span_id), WEBHOOK_PARENT);
    assert_eq!(continued.kind, 2, "server span");
    assert_eq!(attr(continued, "http.route").as_deref(), Some(MAIN));
    assert_eq!(
        attr(continued, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(continued, "messaging.system").as_deref(),
        Some("spike_gateway")
    );
    let fresh = receives
        .iter()
        .find(|s| s.parent_span_id.is_empty())
        .expect("the webhook without a traceparent starts a trace (a root span)");

    for receive in [continued, fresh] {
        let child = |name| {
            named(&spans, name)
                .into_iter()
                .find(|s| s.parent_span_id == receive.span_id && s.trace_id == receive.trace_id)
                .unwrap_or_else(|| panic!("{name} under its webhook"))
        };
        child("webhook verify");
        let append = child("append events");
        assert_eq!(append.kind, 4, "producer span");
        assert_eq!(
            attr(append, "messaging.operation.type").as_deref(),
            Some("send")
        );
        assert_eq!(
            attr(append, "messaging.batch.message_count").as_deref(),
            Some("1")
        );
        // The delivered event carries the append span's context.
        let context = format!("00-{}-{}-01", hex(&append.trace_id), hex(&append.span_id));
        assert!(
            events.iter().any(|e| e.traceparent == context),
            "an event carries {context}: {:?}",
            events.iter().map(|e| &e.traceparent).collect::<Vec<_>>()
        );
    }

    let rpc = named(&spans, "spike.gateway.v1.SpikeRecords/GetNutritionRecord")[0];
    assert_eq!(hex(&rpc.trace_id), RPC_TRACE);
    assert_eq!(hex(&rpc.parent_span_id), RPC_PARENT);
    assert_eq!(attr(rpc, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        attr(rpc, "rpc.method").as_deref(),
        Some("GetNutritionRecord")
    );
    let calls: Vec<_> = named(&spans, "GET")
        .into_iter()
        .filter(|s| hex(&s.trace_id) == RPC_TRACE)
        .collect();
    assert!(!calls.is_empty(), "the Spike call is in the RPC's trace");
    assert!(
        calls
            .iter()
            .any(|s| sent == format!("00-{RPC_TRACE}-{}-01", hex(&s.span_id))),
        "Spike got the client span's context"
    );

    // Nothing secret or from a payload in any attribute, of any span.
    let token = spike.data_requests()[0]
        .authorization
        .clone()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    let all = format!("{spans:?}");
    for secret in [KEY, HMAC_KEY, USER, PROVIDER, "rec-1", token.as_str()] {
        assert!(!all.contains(secret), "{secret:?} appears in a span");
    }
    let signature = sign(KEY, &payload(1));
    assert!(!all.contains(&signature), "the signature appears in a span");
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_over_otlp_grpc() {
    let received = Received::default();
    let addr = grpc_receiver(received.clone()).await;
    traces_reach_the_receiver("grpc", format!("http://{addr}"), received).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_over_otlp_http_protobuf() {
    let received = Received::default();
    let addr = http_receiver(received.clone()).await;
    traces_reach_the_receiver("http/protobuf", format!("http://{addr}"), received).await;
}

/// With the default 5 s batch delay, spans of a webhook answered just before SIGTERM are
/// still exported: shutdown flushes them before the process exits.
#[tokio::test(flavor = "multi_thread")]
async fn spans_are_flushed_on_shutdown() {
    for protocol in ["grpc", "http/protobuf"] {
        let received = Received::default();
        let addr = match protocol {
            "grpc" => grpc_receiver(received.clone()).await,
            _ => http_receiver(received.clone()).await,
        };
        let dir = tempfile::tempdir().unwrap();
        let command = exporting(dir.path(), protocol, &format!("http://{addr}"));
        let mut gw = real_binary::start(command).unwrap();
        post_webhook(&gw, payload(4), None).await;
        assert!(
            received.spans().is_empty(),
            "nothing exported before the batch delay"
        );
        let exit = tokio::task::block_in_place(|| gw.terminate(Duration::from_secs(15)));
        assert!(exit.success());
        let spans = received.spans();
        for name in ["webhook receive", "webhook verify", "append events"] {
            assert_eq!(named(&spans, name).len(), 1, "{protocol}: {name} flushed");
        }
    }
}

/// Without an endpoint nothing is exported and events carry no trace context.
#[tokio::test(flavor = "multi_thread")]
async fn off_without_an_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = real_binary::command(dir.path(), KEY);
    command.env("GATEWAY_STORE", "memory");
    let gw = real_binary::start(command).unwrap();
    post_webhook(
        &gw,
        payload(3),
        Some(&format!("00-{WEBHOOK_TRACE}-{WEBHOOK_PARENT}-01")),
    )
    .await;
    let mut client = spike_gateway::proto::event_stream_client::EventStreamClient::connect(
        format!("http://{}", gw.grpc),
    )
    .await
    .unwrap();
    let mut stream = client
        .subscribe(from_beginning())
        .await
        .unwrap()
        .into_inner();
    let event = &take(&mut stream, 1).await[0];
    assert_eq!(
        (event.traceparent.as_str(), event.tracestate.as_str()),
        ("", "")
    );
}
