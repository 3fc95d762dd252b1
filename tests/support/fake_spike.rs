//! A fake of Spike's REST API over real HTTP: records every request and answers from
//! per-route scripts, falling back to plausible defaults.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    /// The W3C `traceparent` header, if the gateway sent one.
    pub traceparent: Option<String>,
    pub body: Value,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
    /// A signed webhook `(url, body, signature)` to deliver to the gateway before answering.
    pub webhook_first: Option<(String, Vec<u8>, String)>,
}

impl Scripted {
    pub fn new(status: u16, body: Value) -> Self {
        Self {
            status,
            body,
            headers: Vec::new(),
            delay: Duration::ZERO,
            webhook_first: None,
        }
    }

    pub fn problem(status: u16, detail: &str) -> Self {
        Self::new(
            status,
            json!({"title": "Error", "status": status, "detail": detail}),
        )
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct FakeState {
    requests: Mutex<Vec<Recorded>>,
    // "METHOD /path" → answers used in order; the last one repeats.
    scripts: Mutex<HashMap<String, VecDeque<Scripted>>>,
    tokens_issued: Mutex<u32>,
}

/// The Spike application id and HMAC key [`gateway_proxying_to`] configures.
pub const APPLICATION_ID: &str = "4242";
pub const HMAC_KEY: &str = "spike-hmac-key";

/// A gateway whose `SpikeRecords` proxy calls the Spike API at `url` (a [`FakeSpike`], or
/// an address where nothing listens).
pub async fn gateway_proxying_to(url: &str) -> super::TestApp {
    super::spawn_app_with(&[
        "--spike-api-base-url",
        url,
        "--spike-application-id",
        APPLICATION_ID,
        "--spike-hmac-key",
        HMAC_KEY,
    ])
    .await
}

#[derive(Clone)]
pub struct FakeSpike {
    pub url: String,
    state: Arc<FakeState>,
}

impl FakeSpike {
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let app = Router::new()
            .fallback(answer)
            .layer(DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// Answers for `route` ("GET /nutrition_records/r1"), in order; the last one repeats.
    pub fn script(&self, route: &str, answers: Vec<Scripted>) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(route.to_owned(), answers.into());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests other than token requests.
    pub fn data_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path != "/auth/hmac")
            .collect()
    }

    pub fn auth_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/auth/hmac")
            .collect()
    }
}

async fn answer(
    State(state): State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let recorded = Recorded {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().map(str::to_owned),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    state.requests.lock().unwrap().push(recorded.clone());

    let route = format!("{method} {path}");
    let scripted = {
        let mut scripts = state.scripts.lock().unwrap();
        scripts.get_mut(&route).and_then(|queue| {
            if queue.len() > 1 {
                queue.pop_front()
            } else {
                queue.front().cloned()
            }
        })
    };
    let scripted = match scripted {
        Some(scripted) => scripted,
        None => default_answer(&state, &recorded),
    };
    if let Some((url, body, signature)) = &scripted.webhook_first {
        let status = reqwest::Client::new()
            .post(url)
            .header("X-Body-Signature", signature)
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            status.as_u16(),
            200,
            "webhook delivered before the upload answer"
        );
    }
    // A deliberately slow Spike: the delay is what the test scripted.
    tokio::time::sleep(scripted.delay).await;
    let mut response = (
        StatusCode::from_u16(scripted.status).unwrap(),
        axum::Json(scripted.body),
    )
        .into_response();
    for (name, value) in scripted.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

pub fn nutrition_record(id: &str, status: &str, dish: &str) -> Value {
    json!({
        "record_id": id,
        "status": status,
        "dish_name": dish,
        "nutri_score": "B",
        "nutritional_fields": {"energy_kcal": 250},
        "uploaded_at": "2025-09-15T10:30:04.521Z",
    })
}

pub fn lab_report(id: &str, status: &str) -> Value {
    json!({
        "record_id": id,
        "status": status,
        "collection_date": "2024-01-15",
        "sections": [{"original_section_name": "HEMATOLOGY", "results": [
            {"original_test_name": "WBC", "value": 7.2, "within_normal_range": true}
        ]}],
    })
}

fn default_answer(state: &FakeState, request: &Recorded) -> Scripted {
    let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["auth", "hmac"]) => {
            let mut issued = state.tokens_issued.lock().unwrap();
            *issued += 1;
            let user = request.body["application_user_id"].as_str().unwrap_or("?");
            Scripted::new(
                200,
                json!({"access_token": format!("token-{user}-{issued}")}),
            )
        }
        ("POST", ["nutrition_records", "image"]) => Scripted::new(
            200,
            nutrition_record("nutrition-1", "completed", "from-upload"),
        ),
        ("GET", ["nutrition_records", id]) => {
            Scripted::new(200, nutrition_record(id, "completed", "from-get"))
        }
        ("GET", ["nutrition_records"]) => Scripted::new(
            200,
            json!([
                nutrition_record("n1", "completed", "soup"),
                nutrition_record("n2", "failed", "")
            ]),
        ),
        ("POST", ["lab_reports"]) => {
            Scripted::new(200, json!({"lab_report": lab_report("lab-1", "completed")}))
        }
        ("GET", ["lab_reports", id]) => Scripted::new(200, lab_report(id, "completed")),
        ("GET", ["lab_reports"]) => Scripted::new(200, json!([lab_report("l1", "completed")])),
        _ => Scripted::problem(404, "no such route in the fake"),
    }
}
