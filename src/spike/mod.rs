//! Client for Spike's REST API: per-user HMAC auth with a token cache, bounded retries for
//! look-ups, and the caller's deadline over everything.
//!
//! - [`tokens`]: the per-user token cache (one fetch per user at a time).
//! - [`error`]: [`SpikeError`] and the one table from Spike's HTTP statuses to gRPC codes.
//!
//! Request and response bodies are health data: nothing here logs them, only statuses.

pub mod error;
pub mod tokens;

use std::time::Duration;

use bytes::Bytes;
use prost_types::Timestamp;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::Instrument;

pub use error::SpikeError;
use tokens::TokenCache;

use crate::{
    config::{Secret, SpikeConfig},
    proto::{LabReportResult, NutritionResult},
    wire::{
        MAX_NESTING, WireItem, answer_record, answer_records, lab_report_result, nutrition_result,
        sign,
    },
};

/// Attempts per look-up (the first plus retries of transient failures).
const LOOKUP_ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between attempts, whatever `Retry-After` asks for.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a failed call may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads: retry 429, 5xx and network failures with backoff.
    Lookup,
    /// Writes: retry only when the request certainly never reached Spike (connect failed).
    Upload,
}

/// Body of `POST /nutrition_records/image`. Unset options are left to Spike's defaults.
#[derive(Debug, Default, Serialize)]
pub struct NutritionImageUpload {
    /// Base64 of the image bytes.
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_ingredients: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_nutri_score: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_dish_description: Option<bool>,
    /// Nutritional field keys; omitted when empty, so Spike applies its default set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub include_nutrition_fields: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub analysis_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language_code: Option<String>,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_on_process: Option<bool>,
}

/// Body of `POST /lab_reports`.
#[derive(Debug, Default, Serialize)]
pub struct LabReportUpload {
    pub mime_type: String,
    /// Base64 of the document bytes.
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_on_process: Option<bool>,
}

#[derive(Serialize)]
struct AuthRequest<'a> {
    application_id: u64,
    application_user_id: &'a str,
    signature: String,
}

#[derive(Deserialize)]
struct AuthAnswer {
    access_token: String,
}

/// RFC 9457 problem details, as far as we use them.
#[derive(Deserialize)]
struct Problem {
    title: Option<String>,
    detail: Option<String>,
}

/// One HTTP exchange's outcome before any policy is applied.
enum Exchange {
    Answered {
        status: StatusCode,
        body: Bytes,
        retry_after: Option<Duration>,
    },
    /// The connection was never made: the request did not reach Spike.
    NotConnected(String),
    /// Failed after the request may have been sent.
    Failed(String),
    TimedOut,
}

pub struct SpikeClient {
    // reqwest pools connections per host; one client serves every call.
    http: reqwest::Client,
    base_url: String,
    application_id: Option<u64>,
    hmac_key: Option<Secret>,
    tokens: TokenCache,
}

impl SpikeClient {
    pub fn new(config: &SpikeConfig) -> Result<Self, SpikeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("spike-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SpikeError::Connection(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base_url: config.api_base_url.clone(),
            application_id: config.application_id,
            hmac_key: config.hmac_key.clone(),
            tokens: TokenCache::default(),
        })
    }

    pub async fn upload_nutrition_image(
        &self,
        user: &str,
        upload: &NutritionImageUpload,
        deadline: Instant,
    ) -> Result<NutritionResult, SpikeError> {
        let body = json_body(upload)?;
        let answer = self
            .call(
                user,
                Method::POST,
                "/nutrition_records/image",
                &[],
                Some(body),
                Retry::Upload,
                deadline,
            )
            .await?;
        nutrition_from(&record(&answer, None)?)
    }

    pub async fn nutrition_record(
        &self,
        user: &str,
        record_id: &str,
        deadline: Instant,
    ) -> Result<NutritionResult, SpikeError> {
        let path = format!("/nutrition_records/{record_id}");
        let answer = self
            .call(user, Method::GET, &path, &[], None, Retry::Lookup, deadline)
            .await?;
        nutrition_from(&record(&answer, None)?)
    }

    pub async fn nutrition_records(
        &self,
        user: &str,
        from: &Timestamp,
        to: &Timestamp,
        deadline: Instant,
    ) -> Result<Vec<NutritionResult>, SpikeError> {
        let query = range_query(from, to);
        let answer = self
            .call(
                user,
                Method::GET,
                "/nutrition_records",
                &query,
                None,
                Retry::Lookup,
                deadline,
            )
            .await?;
        records(&answer)?.iter().map(nutrition_from).collect()
    }

    pub async fn upload_lab_report(
        &self,
        user: &str,
        upload: &LabReportUpload,
        deadline: Instant,
    ) -> Result<LabReportResult, SpikeError> {
        let body = json_body(upload)?;
        let answer = self
            .call(
                user,
                Method::POST,
                "/lab_reports",
                &[],
                Some(body),
                Retry::Upload,
                deadline,
            )
            .await?;
        lab_from(&record(&answer, Some("lab_report"))?)
    }

    pub async fn lab_report(
        &self,
        user: &str,
        record_id: &str,
        deadline: Instant,
    ) -> Result<LabReportResult, SpikeError> {
        let path = format!("/lab_reports/{record_id}");
        let answer = self
            .call(user, Method::GET, &path, &[], None, Retry::Lookup, deadline)
            .await?;
        lab_from(&record(&answer, None)?)
    }

    pub async fn lab_reports(
        &self,
        user: &str,
        from: &Timestamp,
        to: &Timestamp,
        deadline: Instant,
    ) -> Result<Vec<LabReportResult>, SpikeError> {
        let query = range_query(from, to);
        let answer = self
            .call(
                user,
                Method::GET,
                "/lab_reports",
                &query,
                None,
                Retry::Lookup,
                deadline,
            )
            .await?;
        records(&answer)?.iter().map(lab_from).collect()
    }

    /// An authenticated call: token from the cache, one refresh on 401/403, retries as
    /// `retry` allows, all within `deadline`.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        user: &str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Bytes>,
        retry: Retry,
        deadline: Instant,
    ) -> Result<Bytes, SpikeError> {
        let (application_id, hmac_key) = self.credentials()?;
        let mut refreshed = false;
        let mut attempt = 1;
        loop {
            let token = self
                .tokens
                .get(user, || {
                    self.fetch_token(application_id, hmac_key, user, deadline)
                })
                .await?;
            let exchange = self
                .exchange(
                    method.clone(),
                    path,
                    query,
                    body.clone(),
                    Some(&token),
                    deadline,
                )
                .await;
            let (error, wait) = match exchange {
                Exchange::Answered { status, body, .. } if status.is_success() => return Ok(body),
                Exchange::Answered { status, body, .. } if matches!(status.as_u16(), 401 | 403) => {
                    if refreshed {
                        return Err(SpikeError::CredentialsRejected {
                            detail: problem_detail(&body),
                        });
                    }
                    // Expired or revoked token: a rejected request did nothing, so sending
                    // it again with a fresh token is safe even for an upload.
                    self.tokens.invalidate(user, &token).await;
                    refreshed = true;
                    continue;
                }
                Exchange::Answered {
                    status,
                    body,
                    retry_after,
                } => {
                    let error = SpikeError::Http {
                        status: status.as_u16(),
                        detail: problem_detail(&body),
                    };
                    let transient =
                        status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                    if !(transient && retry == Retry::Lookup && attempt < LOOKUP_ATTEMPTS) {
                        return Err(error);
                    }
                    (error, retry_after.unwrap_or_else(|| backoff(attempt)))
                }
                Exchange::NotConnected(message) if attempt < LOOKUP_ATTEMPTS => {
                    (SpikeError::Connection(message), backoff(attempt))
                }
                Exchange::Failed(message)
                    if retry == Retry::Lookup && attempt < LOOKUP_ATTEMPTS =>
                {
                    (SpikeError::Connection(message), backoff(attempt))
                }
                Exchange::NotConnected(message) | Exchange::Failed(message) => {
                    return Err(SpikeError::Connection(message));
                }
                Exchange::TimedOut => return Err(SpikeError::DeadlineExceeded),
            };
            let wait = wait.min(MAX_BACKOFF);
            if Instant::now() + wait >= deadline {
                // No time for another attempt: report what actually went wrong.
                return Err(error);
            }
            tracing::debug!(attempt, ?wait, error = %error, "retrying Spike call");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn credentials(&self) -> Result<(u64, &Secret), SpikeError> {
        let id = self
            .application_id
            .ok_or(SpikeError::NotConfigured("SPIKE_APPLICATION_ID"))?;
        let key = self
            .hmac_key
            .as_ref()
            .ok_or(SpikeError::NotConfigured("SPIKE_HMAC_KEY"))?;
        Ok((id, key))
    }

    /// `POST /auth/hmac`: signature = lowercase hex HMAC-SHA256(HMAC key, user id).
    async fn fetch_token(
        &self,
        application_id: u64,
        hmac_key: &Secret,
        user: &str,
        deadline: Instant,
    ) -> Result<String, SpikeError> {
        let request = AuthRequest {
            application_id,
            application_user_id: user,
            signature: sign(hmac_key.expose(), user.as_bytes()),
        };
        let body = json_body(&request)?;
        match self
            .exchange(Method::POST, "/auth/hmac", &[], Some(body), None, deadline)
            .await
        {
            Exchange::Answered { status, body, .. } if status.is_success() => {
                Ok(parse::<AuthAnswer>(&body)?.access_token)
            }
            Exchange::Answered { status, body, .. } if matches!(status.as_u16(), 401 | 403) => {
                Err(SpikeError::CredentialsRejected {
                    detail: problem_detail(&body),
                })
            }
            Exchange::Answered { status, body, .. } => Err(SpikeError::Http {
                status: status.as_u16(),
                detail: problem_detail(&body),
            }),
            Exchange::NotConnected(message) | Exchange::Failed(message) => {
                Err(SpikeError::Connection(message))
            }
            Exchange::TimedOut => Err(SpikeError::DeadlineExceeded),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Bytes>,
        token: Option<&str>,
        deadline: Instant,
    ) -> Exchange {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Exchange::TimedOut;
        }
        // A client span per attempt; no path or query (they name users and records).
        let span = tracing::info_span!(
            "spike",
            otel.name = method.as_str(),
            otel.kind = "client",
            http.request.method = method.as_str(),
            http.response.status_code = tracing::field::Empty,
        );
        let mut context = http::HeaderMap::new();
        crate::telemetry::otel::inject(&span, &mut context);
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .timeout(remaining)
            .headers(context)
            .header("accept", "application/json");
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let failed = |e: reqwest::Error| {
            let e = e.without_url();
            if e.is_timeout() {
                Exchange::TimedOut
            } else if e.is_connect() {
                Exchange::NotConnected(e.to_string())
            } else {
                Exchange::Failed(e.to_string())
            }
        };
        let response = match request.send().instrument(span.clone()).await {
            Ok(response) => response,
            Err(e) => return failed(e),
        };
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        tracing::debug!(status = status.as_u16(), path, "Spike answered");
        match response.bytes().await {
            Ok(body) => Exchange::Answered {
                status,
                body,
                retry_after,
            },
            Err(e) => failed(e),
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1))
}

fn json_body(value: &impl Serialize) -> Result<Bytes, SpikeError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| SpikeError::UnexpectedAnswer(format!("cannot encode the request: {e}")))
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, SpikeError> {
    // A list holds records, each up to MAX_NESTING deep.
    if crate::wire::payload::nested_deeper_than(body, MAX_NESTING + 2) {
        return Err(SpikeError::UnexpectedAnswer("nested too deeply".into()));
    }
    serde_json::from_slice(body).map_err(|e| {
        SpikeError::UnexpectedAnswer(format!(
            "not the expected JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// One lab report or nutrition record, read as the webhook front reads them.
fn record(body: &[u8], under: Option<&str>) -> Result<WireItem, SpikeError> {
    answer_record(body, under).map_err(|e| SpikeError::UnexpectedAnswer(e.detail))
}

fn records(body: &[u8]) -> Result<Vec<WireItem>, SpikeError> {
    answer_records(body).map_err(|e| SpikeError::UnexpectedAnswer(e.detail))
}

fn problem_detail(body: &[u8]) -> Option<String> {
    let problem: Problem = serde_json::from_slice(body).ok()?;
    problem.detail.or(problem.title).filter(|d| !d.is_empty())
}

fn nutrition_from(item: &WireItem) -> Result<NutritionResult, SpikeError> {
    nutrition_result(item).map_err(|e| SpikeError::UnexpectedAnswer(e.detail))
}

fn lab_from(item: &WireItem) -> Result<LabReportResult, SpikeError> {
    lab_report_result(item).map_err(|e| SpikeError::UnexpectedAnswer(e.detail))
}

fn range_query(from: &Timestamp, to: &Timestamp) -> [(&'static str, String); 2] {
    [
        ("from_timestamp", rfc3339(from)),
        ("to_timestamp", rfc3339(to)),
    ]
}

/// RFC 3339 in UTC with a `Z`, as Spike's query parameters expect.
pub fn rfc3339(ts: &Timestamp) -> String {
    chrono::DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}
