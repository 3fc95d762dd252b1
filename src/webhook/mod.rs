//! The HTTP front: Spike's webhooks in, `/healthz` and `/readyz` for operations.
//!
//! A webhook request goes: signature header → body (bounded per request, and in total across
//! requests by the [`BodyBudget`]) → HMAC over the raw bytes →
//! JSON split into items → each item classified and normalized ([`crate::wire`]) or kept as a
//! dead letter → one durable, atomic append of all the request's events and dead letters →
//! exactly `200`.
//!
//! Logs name the category, counts and reasons; never the body, a key or a signature.

pub mod error;
pub mod server;
pub mod signature;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::{
    deadletters,
    events::{
        AppendOutcome, EventLog,
        time::{from_micros, now_micros},
    },
    metrics::Metrics,
    proto::WebhookCategory,
    wire,
};
pub use error::WebhookError;
use signature::{Signature, Verifier};

/// Signature header (HTTP header names are case-insensitive; `HeaderMap` already is).
pub const SIGNATURE_HEADER: &str = "x-body-signature";

/// Largest request head (request line + headers) accepted, counted as on the wire; Spike's
/// are well under 4 KiB. Bigger heads get a JSON 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Shared by every webhook request, behind one `Arc`: axum clones the state for each
/// request, and cloning the fields (the verifier's keys are a `Vec`) cost an allocation and
/// a free per webhook.
pub struct WebhookState {
    pub log: Arc<dyn EventLog>,
    pub verifier: Verifier,
    pub max_body_bytes: usize,
    /// Bytes of webhook bodies buffered at once, across every request.
    pub body_budget: BodyBudget,
    /// Cleared when shutdown begins: new webhooks get 503 so Spike retries elsewhere/later.
    pub accepting: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Whole-request bound: Spike gives up after 30 s, so answering later is pointless, and
    /// a slow client must not hold a connection and its buffer longer than that.
    pub request_timeout: Duration,
}

/// The 200 body. Spike only looks at the status; the counts help whoever replays by hand.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub appended: usize,
    pub duplicates: usize,
    pub dead_lettered: usize,
}

/// One webhook endpoint: the category Spike delivers to `path`.
#[derive(Clone, Copy, Debug)]
struct Endpoint {
    category: WebhookCategory,
    path: &'static str,
}

/// Spike's three webhook categories and the path each is delivered to: the one table the
/// router reads; each request carries its row, so the spans' `http.route` is the path it
/// was routed by.
const WEBHOOK_ROUTES: [Endpoint; 3] = [
    Endpoint {
        category: WebhookCategory::Main,
        path: "/webhooks/spike",
    },
    Endpoint {
        category: WebhookCategory::LabReports,
        path: "/webhooks/spike/lab-reports",
    },
    Endpoint {
        category: WebhookCategory::NutritionRecords,
        path: "/webhooks/spike/nutrition",
    },
];

pub fn router(state: WebhookState) -> Router {
    let timeout = state.request_timeout;
    let webhooks =
        WEBHOOK_ROUTES
            .into_iter()
            .fold(Router::new(), |router, endpoint| {
                let receive_here = move |State(state): State<Arc<WebhookState>>,
                                         request: Request| async move {
                    receive(&state, endpoint, request).await
                };
                router.route(endpoint.path, post(receive_here))
            });
    webhooks
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { WebhookError::NotFound })
        .method_not_allowed_fallback(|| async { WebhookError::MethodNotAllowed })
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            within(timeout, request, next)
        }))
        .layer(middleware::from_fn(bounded_head))
        .with_state(Arc::new(state))
}

/// The whole-request bound, answered like every other error (tower-http's is bodiless).
async fn within(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout = ?limit, "request timed out");
            WebhookError::Timeout(limit).into_response()
        }
    }
}

/// Refuses request heads over [`MAX_HEAD_BYTES`] with a JSON 431. hyper refuses heads past
/// its read buffer on its own, with an empty body; this bound sits well below that buffer so
/// every refusal a client normally meets carries a JSON body.
async fn bounded_head(request: Request, next: Next) -> Response {
    let head = request.method().as_str().len()
        + uri_len(request.uri())
        + request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if head > MAX_HEAD_BYTES {
        return WebhookError::HeadersTooLarge {
            limit: MAX_HEAD_BYTES,
        }
        .into_response();
    }
    next.run(request).await
}

/// The length of `uri` as text (what `to_string` would give), without building the text.
fn uri_len(uri: &http::Uri) -> usize {
    // The parts `Uri`'s `Display` writes, in its order.
    uri.scheme_str()
        .map_or(0, |scheme| scheme.len() + "://".len())
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |query| "?".len() + query.len())
}

/// Bodies up to this size may use the budget's reserve. Spike's webhooks are a few KiB.
const SMALL_BODY_BYTES: usize = 64 * 1024;

/// The total of webhook body bytes buffered at once (SPEC §6: past it, 503 before reading
/// more). Bodies are buffered before their signature can be checked, so this is what bounds
/// the memory unauthenticated clients can hold, whatever the number of connections.
///
/// The last eighth of the budget is kept for small bodies: clients that stall in the middle
/// of large bodies can exhaust the rest until the request timeout, but ordinary webhooks
/// still get through meanwhile.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    /// One permit per buffered byte. A request holds its bytes' permits until it is answered.
    bytes: Arc<Semaphore>,
    total: usize,
    /// Permits a body past [`SMALL_BODY_BYTES`] may not take.
    reserve: usize,
}

impl BodyBudget {
    pub fn new(total: usize) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            reserve: total / 8,
        }
    }

    /// Bytes not held by any request right now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Charges `len` more bytes to `held`, or refuses without waiting.
    fn charge(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        len: usize,
    ) -> Result<(), WebhookError> {
        let refused = WebhookError::BodyBudget { budget: self.total };
        let already = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        // Checked before acquiring, so concurrent large bodies may dip into the reserve by
        // at most a frame each: a soft edge, which is all the reserve needs.
        if already + len > SMALL_BODY_BYTES
            && self.bytes.available_permits() < len.saturating_add(self.reserve)
        {
            return Err(refused);
        }
        let Ok(len) = u32::try_from(len) else {
            return Err(refused);
        };
        let permit = self
            .bytes
            .clone()
            .try_acquire_many_owned(len)
            .map_err(|_| refused)?;
        match held {
            Some(held) => held.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }
}

/// `{"ready": bool, "reason": ..., "detail": ...}`: the same answer gRPC health follows.
async fn ready(State(state): State<Arc<WebhookState>>) -> impl IntoResponse {
    let status = crate::readiness::status(&state.accepting, state.log.as_ref());
    let code = if status.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status))
}

async fn metrics(State(state): State<Arc<WebhookState>>) -> impl IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.scrape().await,
    )
}

/// The request's span (`webhook receive`, a server span) continues an incoming
/// `traceparent`; its children are `webhook verify` and `append events` (the commit).
async fn receive(
    state: &WebhookState,
    endpoint: Endpoint,
    request: Request,
) -> Result<Json<Accepted>, WebhookError> {
    // The request taken whole, not a `HeaderMap` extractor, which would clone the headers.
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    let span = tracing::info_span!(
        "webhook",
        category = endpoint.category.as_str_name(),
        request_id = %crate::telemetry::request_id(
            headers.get("x-request-id").and_then(|v| v.to_str().ok())
        ),
        otel.name = "webhook receive",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = endpoint.path,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "receive",
        messaging.destination.name = endpoint.path,
    );
    // Before the span is first entered: its parent is fixed then.
    crate::telemetry::otel::continue_from(&span, headers);
    received(state, endpoint.category, headers, body, &span)
        .instrument(span.clone())
        .await
}

async fn received(
    state: &WebhookState,
    path: WebhookCategory,
    headers: &HeaderMap,
    body: Body,
    span: &tracing::Span,
) -> Result<Json<Accepted>, WebhookError> {
    let started = std::time::Instant::now();
    let result = verify_and_append(state, path, headers, body).await;
    let outcome = result
        .as_ref()
        .map_or_else(|e| e.outcome(), |_| crate::metrics::ACCEPTED);
    let status = result
        .as_ref()
        .map_or_else(|e| e.status(), |_| StatusCode::OK);
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    state.metrics.webhook(path, outcome, started.elapsed());
    match &result {
        Ok(Json(accepted)) => tracing::info!(
            appended = accepted.appended,
            duplicates = accepted.duplicates,
            dead_lettered = accepted.dead_lettered,
            "webhook acknowledged"
        ),
        Err(e) => tracing::warn!(status = e.status().as_u16(), error = %e, "webhook refused"),
    }
    result
}

async fn verify_and_append(
    state: &WebhookState,
    path: WebhookCategory,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, WebhookError> {
    if !state.accepting.load(Ordering::Acquire) {
        return Err(WebhookError::ShuttingDown);
    }
    let signature = headers
        .get(SIGNATURE_HEADER)
        .ok_or(WebhookError::MissingSignature)?;
    let signature = Signature::parse(signature.as_bytes())?;
    // Held until the request is answered: the body's bytes stay charged to the budget.
    let (body, _charged) =
        read_body(body, headers, state.max_body_bytes, &state.body_budget).await?;
    tracing::info_span!("verify", otel.name = "webhook verify")
        .in_scope(|| state.verifier.verify(&body, &signature))?;

    let received_at = from_micros(now_micros());
    let legacy = deadletters::legacy_ids(state.log.as_ref());
    let parsed = wire::parse_body(&body, path, received_at, legacy)?;
    let mut batch = deadletters::batch(parsed, path, received_at);
    let append = append_span(path, &mut batch);
    let types: Vec<i32> = batch.events.iter().map(|e| e.event.r#type).collect();
    let reasons: Vec<_> = batch
        .dead_letters
        .iter()
        .map(|(reason, _)| *reason)
        .collect();
    // Events and dead letters in one atomic append: a retry (Spike retries when our 200
    // was lost) finds both already stored and stores neither again.
    let admitted = state
        .log
        .admit(batch.into_admission())
        .instrument(append)
        .await
        .map_err(WebhookError::LogUnavailable)?;
    let mut duplicates = 0;
    for (outcome, event_type) in admitted.events.iter().zip(types) {
        match outcome {
            AppendOutcome::Appended { sequence } => state.metrics.appended(event_type, *sequence),
            AppendOutcome::Duplicate { .. } => duplicates += 1,
        }
    }
    state.metrics.duplicates(duplicates as u64);
    let mut stored_letters = false;
    for (outcome, reason) in admitted.dead_letters.iter().zip(reasons) {
        if let AppendOutcome::Appended { .. } = outcome {
            state.metrics.dead_letter(path, reason);
            stored_letters = true;
        }
    }
    if stored_letters {
        deadletters::refresh_gauge(&state.log, &state.metrics).await;
    }
    Ok(Json(Accepted {
        appended: admitted.events.len() - duplicates,
        duplicates,
        dead_lettered: admitted.dead_letters.len(),
    }))
}

/// `messaging.system` of the gateway's spans (semantic conventions: lower-case name of the
/// messaging product; ours is none of the well-known ones).
pub const MESSAGING_SYSTEM: &str = "spike_gateway";

/// The commit's span (a producer span), and the trace context every event of the batch
/// carries from it, so a consumer can link its processing span to this delivery.
fn append_span(path: WebhookCategory, batch: &mut deadletters::Batch) -> tracing::Span {
    let span = tracing::info_span!(
        "append",
        otel.name = "append events",
        otel.kind = "producer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "send",
        messaging.operation.name = "append",
        messaging.destination.name = "events",
        messaging.batch.message_count = batch.events.len(),
        spike.webhook.category = path.as_str_name(),
        spike.dead_letters = batch.dead_letters.len(),
    );
    let (traceparent, tracestate) = crate::telemetry::otel::trace_context(&span);
    if !traceparent.is_empty() {
        for new in &mut batch.events {
            new.event.traceparent.clone_from(&traceparent);
            new.event.tracestate.clone_from(&tracestate);
        }
    }
    span
}

/// The body length the client declared, if it did. hyper has checked that it is a number.
fn declared_length(headers: &HeaderMap) -> Result<Option<usize>, WebhookError> {
    match headers.get(http::header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|v| Some(usize::try_from(v).unwrap_or(usize::MAX)))
            .ok_or(WebhookError::UnreadableBody),
    }
}

/// Reads the whole body, refusing it as soon as it exceeds `limit` or the shared `budget`
/// cannot hold its next frame (before buffering more). Returns the bytes and their charge.
async fn read_body(
    mut body: Body,
    headers: &HeaderMap,
    limit: usize,
    budget: &BodyBudget,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), WebhookError> {
    let declared = declared_length(headers)?;
    if declared.is_some_and(|length| length > limit) {
        // At once: waiting for a body that will be refused only holds the connection.
        return Err(WebhookError::TooLarge { limit });
    }
    let mut charged = None;
    // The frames as hyper handed them, joined once at the end: a body of one frame (Spike's
    // webhooks are a few KiB) is never copied, and a large one is copied once into an
    // allocation of its exact size instead of a buffer grown by doubling, whose freed
    // steps an allocator may keep resident.
    let mut frames: Vec<Bytes> = Vec::new();
    let mut length = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| WebhookError::UnreadableBody)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we read
        };
        if length + data.len() > limit {
            return Err(WebhookError::TooLarge { limit });
        }
        // A frame costs its entry in `frames` too: charged, a client that trickles its body a
        // byte per segment cannot hold 32 bytes of entries per byte the budget counts.
        budget.charge(&mut charged, data.len() + std::mem::size_of::<Bytes>())?;
        length += data.len();
        frames.push(data);
    }
    Ok((join(frames, length), charged))
}

/// The frames of a body as one buffer, copying only when there is more than one.
fn join(mut frames: Vec<Bytes>, length: usize) -> Bytes {
    if frames.len() == 1 {
        return frames.swap_remove(0);
    }
    let mut joined = BytesMut::with_capacity(length);
    for frame in frames {
        joined.extend_from_slice(&frame);
    }
    joined.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(frames: Vec<Bytes>) -> Body {
        Body::from_stream(futures_util::stream::iter(
            frames.into_iter().map(Ok::<_, std::convert::Infallible>),
        ))
    }

    #[tokio::test]
    async fn a_body_trickled_a_byte_a_frame_is_charged_for_its_frames() {
        let budget = BodyBudget::new(100_000);
        let headers = HeaderMap::new();
        let whole = body_of(vec![Bytes::from(vec![b' '; 4000])]);
        let (bytes, charged) = read_body(whole, &headers, 1 << 20, &budget).await.unwrap();
        assert_eq!(bytes.len(), 4000);
        drop(charged);
        assert_eq!(budget.available(), 100_000, "the charge is returned");

        // The same 4,000 bytes one per frame hold 4,000 entries of 32 bytes besides them:
        // past the 100,000 the budget has.
        let trickled = body_of((0..4000).map(|_| Bytes::from_static(b" ")).collect());
        let refused = read_body(trickled, &headers, 1 << 20, &budget).await;
        assert!(
            matches!(refused, Err(WebhookError::BodyBudget { .. })),
            "{refused:?}"
        );
        assert_eq!(budget.available(), 100_000);
    }

    #[test]
    fn the_uri_length_is_that_of_its_text() {
        for uri in [
            "/webhooks/spike",
            "/webhooks/spike?x=1&y",
            "*",
            "http://example.com",
            "http://example.com:8080/a/b?c",
            "example.com:443",
        ] {
            let uri: http::Uri = uri.parse().unwrap();
            assert_eq!(super::uri_len(&uri), uri.to_string().len(), "{uri}");
        }
    }
}
