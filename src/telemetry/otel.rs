//! OpenTelemetry: span export over OTLP (gRPC or HTTP protobuf) and W3C trace context
//! (`traceparent` / `tracestate`) in and out.
//!
//! Off unless an OTLP endpoint is configured: then there is no exporter, no layer, and every
//! helper here returns at once (one relaxed atomic load). Spans are made with `tracing`;
//! the `tracing-opentelemetry` layer turns them into OpenTelemetry spans. `otel.name`,
//! `otel.kind` and dotted semantic-convention fields become the span's name, kind and
//! attributes. Attribute values are names, counts, methods and statuses only: never a
//! payload value, a signature, a key or a token.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_http::{Bytes, HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{OtlpProtocol, TraceSampler, TracesConfig};

/// Set once export starts; read by every propagation helper so that, when tracing is off,
/// no header is parsed or written.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Bound on an OTLP export (each batch): a stalled collector must not hold shutdown.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest collector answer read; its body is an `ExportTraceServiceResponse`, a few bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The running export; [`Export::shutdown`] flushes the spans still buffered.
#[derive(Debug, Default)]
pub struct Export {
    provider: Option<SdkTracerProvider>,
}

impl Export {
    /// Flushes and stops the exporter, waiting at most `within` (what is left of the
    /// shutdown grace). Call it while the tokio runtime still runs: the exports run on it.
    pub fn shutdown(self, within: Duration) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(within)
        {
            eprintln!("spike-gateway: spans not all exported at shutdown: {e}");
        }
    }
}

/// Starts the exporter and returns the layer that feeds it.
pub fn start<S>(
    config: &TracesConfig,
) -> Result<
    (
        Export,
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "OpenTelemetry export needs the async runtime".to_owned())?;
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match config.protocol {
        OtlpProtocol::Grpc => builder
            .with_tonic()
            .with_endpoint(&config.endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
        OtlpProtocol::HttpProtobuf => builder
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(&config.endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(Reqwest(
                reqwest::Client::builder()
                    .timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))?,
            ))
            .build(),
    }
    .map_err(|e| format!("cannot start the OTLP exporter: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: Arc::new(exporter),
            runtime,
        })
        .with_sampler(sampler(config.sampler))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("spike-gateway"));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((
        Export {
            provider: Some(provider),
        },
        layer,
    ))
}

fn sampler(config: TraceSampler) -> Sampler {
    let root = if config.ratio >= 1.0 {
        Sampler::AlwaysOn
    } else if config.ratio <= 0.0 {
        Sampler::AlwaysOff
    } else {
        Sampler::TraceIdRatioBased(config.ratio)
    };
    if config.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

/// Makes `span`'s parent the W3C trace context in `headers`, if they carry one.
pub fn continue_from(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled, which leaves nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// Writes `span`'s W3C trace context into `headers` (nothing when tracing is off).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if enabled() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
    }
}

/// `span`'s W3C `traceparent` and `tracestate`, empty when tracing is off or the span is
/// not recorded.
pub fn trace_context(span: &tracing::Span) -> (String, String) {
    let mut headers = http::HeaderMap::new();
    inject(span, &mut headers);
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (text("traceparent"), text("tracestate"))
}

/// Runs each export on the tokio runtime: the SDK's batch processor exports from its own
/// thread, and both the tonic and the reqwest clients need the runtime's reactor.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.export(batch).await })
            .await
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called while building the provider, before the exporter is shared.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// OTLP/HTTP over the crate's reqwest (the exporter's own client would add a second one).
#[derive(Debug)]
struct Reqwest(reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for Reqwest {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let mut response = self.0.execute(reqwest::Request::try_from(request)?).await?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err("the OTLP collector's answer is too large".into());
            }
            body.extend_from_slice(&chunk);
        }
        let mut answer = http::Response::new(Bytes::from(body));
        *answer.status_mut() = response.status();
        *answer.headers_mut() = std::mem::take(response.headers_mut());
        Ok(answer)
    }
}
