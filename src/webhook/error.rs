//! Every non-200 answer of the HTTP front, and its status (SPEC §2.2, §6). Each one goes
//! out with a JSON `{"error": "..."}` body.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::signature::SignatureError;
use crate::events::LogError;
use crate::wire::NotJson;

/// Why a webhook request was not acknowledged. Messages never contain the body, the
/// expected signature or a key.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("missing X-Body-Signature header")]
    MissingSignature,
    #[error(transparent)]
    BadSignature(#[from] SignatureError),
    #[error("body is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error(
        "the gateway is reading as many webhook bodies as it may buffer ({budget} bytes); retry later"
    )]
    BodyBudget { budget: usize },
    #[error("request headers are larger than the {limit}-byte limit")]
    HeadersTooLarge { limit: usize },
    #[error("the request took longer than {}s", .0.as_secs_f64())]
    Timeout(std::time::Duration),
    #[error("no such path")]
    NotFound,
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("could not read the request body")]
    UnreadableBody,
    #[error(transparent)]
    NotJson(#[from] NotJson),
    #[error("the gateway is shutting down; retry later")]
    ShuttingDown,
    #[error("the event log cannot take writes right now; retry later")]
    LogUnavailable(#[source] LogError),
}

impl WebhookError {
    pub fn status(&self) -> StatusCode {
        match self {
            WebhookError::MissingSignature
            | WebhookError::NotJson(_)
            | WebhookError::UnreadableBody => StatusCode::BAD_REQUEST,
            WebhookError::BadSignature(_) => StatusCode::UNAUTHORIZED,
            WebhookError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            WebhookError::NotFound => StatusCode::NOT_FOUND,
            WebhookError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // 503 makes Spike retry the same bytes later; dedup absorbs any overlap.
            WebhookError::ShuttingDown
            | WebhookError::LogUnavailable(_)
            | WebhookError::BodyBudget { .. }
            | WebhookError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl WebhookError {
    /// The `outcome` label of `webhooks_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            WebhookError::MissingSignature => "missing_signature",
            WebhookError::BadSignature(_) => "bad_signature",
            WebhookError::TooLarge { .. } => "too_large",
            WebhookError::BodyBudget { .. } => "body_budget",
            WebhookError::HeadersTooLarge { .. } => "headers_too_large",
            WebhookError::Timeout(_) => "timeout",
            WebhookError::NotFound => "not_found",
            WebhookError::MethodNotAllowed => "method_not_allowed",
            WebhookError::UnreadableBody => "unreadable_body",
            WebhookError::NotJson(_) => "not_json",
            WebhookError::ShuttingDown => "shutting_down",
            WebhookError::LogUnavailable(_) => "log_unavailable",
        }
    }
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let status = self.status();
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}
