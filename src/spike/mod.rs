//! Client for Spike's REST API: per-user HMAC auth with a token cache, bounded retries for
//! look-ups, and the caller's deadline over everything.
//!
//! - [`tokens`]: the per-user token cache (one fetch per user at a time).
//! - [`error`]: [`SpikeError`] and the one table from Spike's HTTP statuses to gRPC codes.
//!
//! One path per concern: a [`SpikeRecord`] says where a record kind lives, a `Call`
//! describes one request, `SpikeClient::send` is the one authenticated send-and-retry
//! loop, and `Outcome::of` the one retry policy.
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
        MAX_NESTING, Unusable, WireItem, answer_record, answer_records, lab_report_result,
        nutrition_result, sign,
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
    /// The token request: one attempt; the calls that need the token retry instead.
    Never,
}

/// A kind of record Spike keeps per user (nutrition records, lab reports): where it lives
/// and how its JSON becomes protobuf. The client's one implementation serves every kind.
pub trait SpikeRecord: Sized {
    /// The upload's JSON body.
    type Upload: Serialize;
    /// The collection: `GET` lists it, a record is at `{COLLECTION}/{id}`.
    const COLLECTION: &'static str;
    /// Where uploads are posted.
    const UPLOAD_PATH: &'static str;
    /// The key the upload's answer nests the record under, if it does.
    const UPLOADED_UNDER: Option<&'static str>;
    /// The record as the webhook front reads the same JSON.
    fn from_wire(item: &WireItem) -> Result<Self, Unusable>;
}

impl SpikeRecord for NutritionResult {
    type Upload = NutritionImageUpload;
    const COLLECTION: &'static str = "/nutrition_records";
    const UPLOAD_PATH: &'static str = "/nutrition_records/image";
    const UPLOADED_UNDER: Option<&'static str> = None;

    fn from_wire(item: &WireItem) -> Result<Self, Unusable> {
        nutrition_result(item)
    }
}

impl SpikeRecord for LabReportResult {
    type Upload = LabReportUpload;
    const COLLECTION: &'static str = "/lab_reports";
    const UPLOAD_PATH: &'static str = "/lab_reports";
    const UPLOADED_UNDER: Option<&'static str> = Some("lab_report");

    fn from_wire(item: &WireItem) -> Result<Self, Unusable> {
        lab_report_result(item)
    }
}

/// One request to Spike's API, as every attempt sends it.
struct Call {
    method: Method,
    /// From the base URL on, e.g. `/lab_reports/{id}`.
    path: String,
    query: Vec<(&'static str, String)>,
    /// JSON; a refcounted clone per attempt.
    body: Option<Bytes>,
    retry: Retry,
}

impl Call {
    fn lookup(path: String, query: Vec<(&'static str, String)>) -> Self {
        Self {
            method: Method::GET,
            path,
            query,
            body: None,
            retry: Retry::Lookup,
        }
    }

    fn upload(path: &str, body: Bytes) -> Self {
        Self {
            method: Method::POST,
            path: path.to_owned(),
            query: Vec::new(),
            body: Some(body),
            retry: Retry::Upload,
        }
    }
}

/// What to do after one exchange: the one retry policy.
enum Outcome {
    Done(Bytes),
    /// 401/403: the token (or, for the token request, the HMAC key) was refused.
    Rejected(Option<String>),
    /// Transient, and `Retry` allows another attempt after the wait.
    Again(SpikeError, Duration),
    Failed(SpikeError),
}

impl Outcome {
    fn of(exchange: Exchange, retry: Retry, attempt: u32) -> Self {
        let attempts_left = attempt < LOOKUP_ATTEMPTS;
        match exchange {
            Exchange::Answered { status, body, .. } if status.is_success() => Self::Done(body),
            Exchange::Answered { status, body, .. } if matches!(status.as_u16(), 401 | 403) => {
                Self::Rejected(problem_detail(&body))
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
                let transient = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                if transient && retry == Retry::Lookup && attempts_left {
                    Self::Again(error, retry_after.unwrap_or_else(|| backoff(attempt)))
                } else {
                    Self::Failed(error)
                }
            }
            // Never reached Spike: safe to send again, even an upload.
            Exchange::NotConnected(message) if retry != Retry::Never && attempts_left => {
                Self::Again(SpikeError::Connection(message), backoff(attempt))
            }
            Exchange::Failed(message) if retry == Retry::Lookup && attempts_left => {
                Self::Again(SpikeError::Connection(message), backoff(attempt))
            }
            Exchange::NotConnected(message) | Exchange::Failed(message) => {
                Self::Failed(SpikeError::Connection(message))
            }
            Exchange::TimedOut => Self::Failed(SpikeError::DeadlineExceeded),
        }
    }
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

    /// Uploads a record for Spike to process (`POST R::UPLOAD_PATH`), without retries
    /// once the request may have reached Spike.
    pub async fn upload<R: SpikeRecord>(
        &self,
        user: &str,
        upload: &R::Upload,
        deadline: Instant,
    ) -> Result<R, SpikeError> {
        let call = Call::upload(R::UPLOAD_PATH, json_body(upload)?);
        let answer = self.send(user, &call, deadline).await?;
        convert(&record(&answer, R::UPLOADED_UNDER)?)
    }

    /// One record by id (`GET {R::COLLECTION}/{id}`).
    pub async fn record<R: SpikeRecord>(
        &self,
        user: &str,
        record_id: &str,
        deadline: Instant,
    ) -> Result<R, SpikeError> {
        let call = Call::lookup(format!("{}/{record_id}", R::COLLECTION), Vec::new());
        let answer = self.send(user, &call, deadline).await?;
        convert(&record(&answer, None)?)
    }

    /// The user's records in a time range (`GET R::COLLECTION?from_timestamp&to_timestamp`).
    pub async fn records<R: SpikeRecord>(
        &self,
        user: &str,
        from: &Timestamp,
        to: &Timestamp,
        deadline: Instant,
    ) -> Result<Vec<R>, SpikeError> {
        let query = vec![
            ("from_timestamp", rfc3339(from)),
            ("to_timestamp", rfc3339(to)),
        ];
        let call = Call::lookup(R::COLLECTION.to_owned(), query);
        let answer = self.send(user, &call, deadline).await?;
        records(&answer)?.iter().map(convert).collect()
    }

    /// The one authenticated path: token from the cache, one refresh on 401/403, retries as
    /// `call.retry` allows, all within `deadline`.
    async fn send(&self, user: &str, call: &Call, deadline: Instant) -> Result<Bytes, SpikeError> {
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
            let exchange = self.exchange(call, Some(&token), deadline).await;
            let (error, wait) = match Outcome::of(exchange, call.retry, attempt) {
                Outcome::Done(body) => return Ok(body),
                Outcome::Rejected(detail) if refreshed => {
                    return Err(SpikeError::CredentialsRejected { detail });
                }
                Outcome::Rejected(_) => {
                    // Expired or revoked token: a rejected request did nothing, so sending
                    // it again with a fresh token is safe even for an upload.
                    self.tokens.invalidate(user, &token).await;
                    refreshed = true;
                    continue;
                }
                Outcome::Failed(error) => return Err(error),
                Outcome::Again(error, wait) => (error, wait.min(MAX_BACKOFF)),
            };
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
        let call = Call {
            method: Method::POST,
            path: "/auth/hmac".into(),
            query: Vec::new(),
            body: Some(json_body(&request)?),
            retry: Retry::Never,
        };
        match Outcome::of(self.exchange(&call, None, deadline).await, call.retry, 1) {
            Outcome::Done(body) => Ok(parse::<AuthAnswer>(&body)?.access_token),
            Outcome::Rejected(detail) => Err(SpikeError::CredentialsRejected { detail }),
            // `Retry::Never` makes every other outcome final.
            Outcome::Failed(error) | Outcome::Again(error, _) => Err(error),
        }
    }

    /// Sends `call` once.
    async fn exchange(&self, call: &Call, token: Option<&str>, deadline: Instant) -> Exchange {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Exchange::TimedOut;
        }
        // A client span per attempt; no path or query (they name users and records).
        let span = tracing::info_span!(
            "spike",
            otel.name = call.method.as_str(),
            otel.kind = "client",
            http.request.method = call.method.as_str(),
            http.response.status_code = tracing::field::Empty,
        );
        let mut context = http::HeaderMap::new();
        crate::telemetry::otel::inject(&span, &mut context);
        let mut request = self
            .http
            .request(
                call.method.clone(),
                format!("{}{}", self.base_url, call.path),
            )
            .timeout(remaining)
            .headers(context)
            .header("accept", "application/json");
        if !call.query.is_empty() {
            request = request.query(&call.query);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = call.body.clone() {
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
        tracing::debug!(status = status.as_u16(), path = %call.path, "Spike answered");
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

fn convert<R: SpikeRecord>(item: &WireItem) -> Result<R, SpikeError> {
    R::from_wire(item).map_err(|e| SpikeError::UnexpectedAnswer(e.detail))
}

/// RFC 3339 in UTC with a `Z`, as Spike's query parameters expect.
pub fn rfc3339(ts: &Timestamp) -> String {
    chrono::DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16) -> Exchange {
        Exchange::Answered {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::new(),
            retry_after: None,
        }
    }

    fn again(exchange: Exchange, retry: Retry, attempt: u32) -> bool {
        matches!(Outcome::of(exchange, retry, attempt), Outcome::Again(..))
    }

    #[test]
    fn only_lookups_retry_answers_and_only_while_attempts_remain() {
        for status in [429, 500, 503] {
            assert!(again(answered(status), Retry::Lookup, 1), "{status}");
            assert!(!again(answered(status), Retry::Lookup, LOOKUP_ATTEMPTS));
            assert!(!again(answered(status), Retry::Upload, 1), "{status}");
            assert!(!again(answered(status), Retry::Never, 1), "{status}");
        }
        assert!(!again(answered(404), Retry::Lookup, 1));
        assert!(matches!(
            Outcome::of(answered(401), Retry::Upload, 1),
            Outcome::Rejected(None)
        ));
    }

    #[test]
    fn uploads_are_resent_only_when_spike_never_got_them() {
        let not_connected = || Exchange::NotConnected("refused".into());
        let failed = || Exchange::Failed("reset".into());
        assert!(again(not_connected(), Retry::Upload, 1));
        assert!(!again(failed(), Retry::Upload, 1));
        assert!(again(failed(), Retry::Lookup, 1));
        assert!(!again(not_connected(), Retry::Never, 1));
        assert!(matches!(
            Outcome::of(Exchange::TimedOut, Retry::Lookup, 1),
            Outcome::Failed(SpikeError::DeadlineExceeded)
        ));
    }
}
