//! The HTTP front: Spike's webhooks in, `/healthz` and `/readyz` for operations.
//!
//! A webhook request goes: signature header → body (bounded) → HMAC over the raw bytes →
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
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;

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

/// Shared by every webhook request.
#[derive(Clone)]
pub struct WebhookState {
    pub log: Arc<dyn EventLog>,
    pub verifier: Verifier,
    pub max_body_bytes: usize,
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

pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/webhooks/spike", post(main_webhook))
        .route("/webhooks/spike/lab-reports", post(lab_report_webhook))
        .route("/webhooks/spike/nutrition", post(nutrition_webhook))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            state.request_timeout,
        ))
        .with_state(state)
}

/// `{"ready": bool, "reason": ..., "detail": ...}`: the same answer gRPC health follows.
async fn ready(State(state): State<WebhookState>) -> impl IntoResponse {
    let status = crate::readiness::status(&state.accepting, state.log.as_ref());
    let code = if status.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status))
}

async fn metrics(State(state): State<WebhookState>) -> impl IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn main_webhook(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, WebhookError> {
    receive(&state, WebhookCategory::Main, &headers, body).await
}

async fn lab_report_webhook(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, WebhookError> {
    receive(&state, WebhookCategory::LabReports, &headers, body).await
}

async fn nutrition_webhook(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, WebhookError> {
    receive(&state, WebhookCategory::NutritionRecords, &headers, body).await
}

#[tracing::instrument(
    name = "webhook",
    skip_all,
    fields(
        category = path.as_str_name(),
        request_id = %crate::telemetry::request_id(
            headers.get("x-request-id").and_then(|v| v.to_str().ok())
        ),
    )
)]
async fn receive(
    state: &WebhookState,
    path: WebhookCategory,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, WebhookError> {
    let started = std::time::Instant::now();
    let result = verify_and_append(state, path, headers, body).await;
    let outcome = result.as_ref().map_or_else(|e| e.outcome(), |_| "accepted");
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
    let body = read_body(body, state.max_body_bytes).await?;
    state.verifier.verify(&body, &signature)?;

    let received_at = from_micros(now_micros());
    let parsed = wire::parse_body(&body, path, received_at)?;
    let batch = deadletters::batch(parsed, path, received_at);
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
        deadletters::refresh_gauge(state.log.as_ref(), &state.metrics).await;
    }
    Ok(Json(Accepted {
        appended: admitted.events.len() - duplicates,
        duplicates,
        dead_lettered: admitted.dead_letters.len(),
    }))
}

/// Reads the whole body, refusing it as soon as it exceeds `limit` (before buffering more).
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, WebhookError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(WebhookError::TooLarge { limit })
        }
        Err(_) => Err(WebhookError::UnreadableBody),
    }
}
