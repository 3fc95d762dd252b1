//! The webhook front's answers (SPEC §2.2): exactly 200 on success, each refusal its status.

mod support;

use std::sync::{Arc, atomic::AtomicBool};

use spike_gateway::{
    config::Secret,
    events::{EventLog, memory::MemoryLog},
    webhook::{
        self, WebhookState,
        signature::{Verifier, sign},
    },
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn every_sample_is_acknowledged_with_exactly_200() {
    let app = spawn_app().await;
    for (name, path) in SAMPLES {
        let response = app.post(path, &fixture(name)).await;
        assert_eq!(response.status().as_u16(), 200, "{name}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["dead_lettered"], 0, "{name}: {body}");
    }
    // 10 samples, one of them a batch of two.
    assert_eq!(app.log.bounds().await.unwrap().next, 12);
}

#[tokio::test]
async fn the_main_path_classifies_lab_and_nutrition_payloads_by_content() {
    let app = spawn_app().await;
    for name in ["lab-report-completed.json", "nutrition-enveloped.json"] {
        let body: serde_json::Value = app.post(MAIN, &fixture(name)).await.json().await.unwrap();
        assert_eq!(body["appended"], 1, "{name}: {body}");
    }
}

#[tokio::test]
async fn missing_signature_is_400() {
    let app = spawn_app().await;
    let response = app
        .post_with_signature(MAIN, &fixture("main-batch.json"), None)
        .await;
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("X-Body-Signature"));
}

#[tokio::test]
async fn malformed_signature_is_401() {
    let app = spawn_app().await;
    let body = fixture("main-batch.json");
    let good = sign(KEY, &body);
    for bad in ["not-hex-at-all", &good[..40], &format!("{good}ab")] {
        let response = app.post_with_signature(MAIN, &body, Some(bad)).await;
        assert_eq!(response.status().as_u16(), 401, "{bad}");
    }
    assert_eq!(app.log.bounds().await.unwrap().next, 1, "nothing appended");
}

#[tokio::test]
async fn signature_by_another_key_is_401_and_never_echoes_the_expected_one() {
    let app = spawn_app().await;
    let body = fixture("main-batch.json");
    let response = app
        .post_with_signature(MAIN, &body, Some(&sign("some-other-key", &body)))
        .await;
    assert_eq!(response.status().as_u16(), 401);
    let text = response.text().await.unwrap();
    assert!(!text.contains(&sign(KEY, &body)), "{text}");
    assert!(!text.contains(KEY), "{text}");
}

#[tokio::test]
async fn a_signature_over_other_bytes_is_401() {
    let app = spawn_app().await;
    let body = fixture("main-batch.json");
    let mut altered = body.clone();
    altered.push(b'\n');
    let response = app
        .post_with_signature(MAIN, &altered, Some(&sign(KEY, &body)))
        .await;
    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn upper_case_hex_and_every_rotation_key_are_accepted() {
    let app = spawn_app_with(&["--webhook-signature-key", &format!("{KEY},next-key")]).await;
    let first = fixture("lab-report-completed.json");
    let upper = sign(KEY, &first).to_uppercase();
    let response = app.post_with_signature(LAB, &first, Some(&upper)).await;
    assert_eq!(response.status().as_u16(), 200);
    let second = fixture("lab-report-failed.json");
    let response = app
        .post_with_signature(LAB, &second, Some(&sign("next-key", &second)))
        .await;
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn the_header_name_is_case_insensitive_on_the_wire() {
    let app = spawn_app().await;
    let body = fixture("nutrition-failed.json");
    let request = format!(
        "POST {NUTRITION} HTTP/1.1\r\nHost: test\r\nX-BODY-SIGNATURE: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        sign(KEY, &body),
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = spawn_app_with(&["--max-body-bytes", "1024"]).await;
    let events: Vec<_> = (0..40).map(|n| record_change("u", n)).collect();
    let body = serde_json::to_vec(&events).unwrap();
    assert!(body.len() > 1024);
    let response = app.post(MAIN, &body).await;
    assert_eq!(response.status().as_u16(), 413);
    assert_eq!(app.log.bounds().await.unwrap().next, 1);
    // Just under the limit is fine.
    let small = serde_json::to_vec(&[record_change("u", 1)]).unwrap();
    assert_eq!(app.post(MAIN, &small).await.status().as_u16(), 200);
}

#[tokio::test]
async fn a_signed_body_that_is_not_json_is_400() {
    let app = spawn_app().await;
    for body in [&b"not json"[..], b"{\"truncated\": ", b"{\"a\": \"\xff\"}"] {
        let response = app.post(MAIN, body).await;
        assert_eq!(
            response.status().as_u16(),
            400,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[tokio::test]
async fn signed_json_that_cannot_be_classified_is_200_and_dead_lettered() {
    let app = spawn_app().await;
    let response = app
        .post_json(MAIN, &serde_json::json!({"hello": "world"}))
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["dead_lettered"], 1);
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        1
    );
    assert_eq!(app.log.bounds().await.unwrap().next, 1, "no event appended");

    // A lab report without record_id is meaningless: dead letter, still 200.
    let response = app
        .post_json(
            LAB,
            &serde_json::json!({"status": "completed", "sections": []}),
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        2
    );
}

#[tokio::test]
async fn a_batch_keeps_its_good_items_and_dead_letters_the_bad_ones() {
    let app = spawn_app().await;
    let batch = serde_json::json!([
        record_change("alice", 1),
        {"event_type": "record_change", "timestamp": "2025-01-01T00:00:00Z"},
        "not an object",
        record_change("bob", 2),
    ]);
    let body: serde_json::Value = app.post_json(MAIN, &batch).await.json().await.unwrap();
    assert_eq!(body["appended"], 2, "{body}");
    assert_eq!(body["dead_lettered"], 2, "{body}");
    assert_eq!(
        app.log.clone().backend().dead_letter_count().await.unwrap(),
        2
    );
}

#[tokio::test]
async fn a_log_that_cannot_take_writes_gives_503_and_fails_readiness() {
    let app = spawn_app().await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    app.log.close().await;
    let response = app.post(MAIN, &fixture("main-batch.json")).await;
    assert_eq!(response.status().as_u16(), 503);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let alive = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(alive.status().as_u16(), 200);
}

#[tokio::test]
async fn webhooks_during_shutdown_get_503() {
    // The front as it is once shutdown has begun: not accepting.
    let log: Arc<dyn EventLog> = Arc::new(MemoryLog::new(
        10,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    ));
    let router = webhook::router(WebhookState {
        log: log.clone(),
        verifier: Verifier::new(&[Secret::new(KEY)]),
        max_body_bytes: 1 << 20,
        body_budget: webhook::BodyBudget::new(8 << 20),
        accepting: Arc::new(AtomicBool::new(false)),
        metrics: Arc::default(),
        request_timeout: std::time::Duration::from_secs(5),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let body = fixture("main-batch.json");
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{MAIN}"))
        .header("X-Body-Signature", sign(KEY, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(log.bounds().await.unwrap().next, 1);
}

#[tokio::test]
async fn unknown_paths_and_methods_are_refused() {
    let app = spawn_app().await;
    let response = app.post("/webhooks/other", b"{}").await;
    assert_eq!(response.status().as_u16(), 404);
    let response = app.client.get(app.url(MAIN)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = spawn_app_with(&["--http-header-timeout", "500ms"]).await;
    let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
    stream
        .write_all(b"POST /webhooks/spike HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut buffer),
    )
    .await;
    assert!(read.is_ok(), "still connected after 5 s");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Other clients are served meanwhile and after.
    assert_eq!(
        app.post(MAIN, &fixture("main-batch.json"))
            .await
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let app = spawn_app().await;
    let body = fixture("main-batch.json");
    let response = app
        .client
        .post(app.url(MAIN))
        .header("X-Body-Signature", sign(KEY, &body))
        .header("X-Padding", "a".repeat(100 * 1024))
        .body(body.clone())
        .send()
        .await;
    match response {
        Ok(response) => assert_eq!(response.status().as_u16(), 431),
        Err(e) => assert!(
            e.is_request() || e.is_connect() || e.to_string().contains("connection"),
            "{e}"
        ),
    }
    assert_eq!(app.log.bounds().await.unwrap().next, 1, "nothing appended");
    assert_eq!(app.post(MAIN, &body).await.status().as_u16(), 200);
}

#[tokio::test]
async fn a_body_that_trickles_in_is_cut_off_by_the_request_timeout() {
    let app = spawn_app_with(&["--http-request-timeout", "700ms"]).await;
    let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
    let head = format!(
        "POST {MAIN} HTTP/1.1\r\nHost: test\r\nX-Body-Signature: {}\r\nContent-Length: 1000\r\n\r\n",
        "0".repeat(64)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"[").await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0; 1024];
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer)).await;
    let n = read.expect("answered within 5 s").unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}
