//! The real `spike-gateway` binary: survives SIGKILL with nothing acknowledged lost
//! (SPEC §5), exits cleanly on SIGTERM, and refuses bad configuration in one line.

mod support;

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use spike_gateway::{
    events::embedded::CHECKPOINT_FILE, proto::event_stream_client::EventStreamClient,
    webhook::signature::sign,
};
use support::{
    KEY, MAIN, from_beginning,
    real_binary::{self, Gateway},
    record_change, wait_until,
};

/// The binary on `data_dir` with `key`, listening (under the shared start-up deadline).
fn start_with(data_dir: &Path, key: &str, envs: &[(&str, &str)]) -> Gateway {
    let mut command = real_binary::command(data_dir, key);
    command.envs(envs.iter().copied());
    real_binary::start(command).unwrap_or_else(|log| panic!("the gateway refused to start:\n{log}"))
}

fn start(data_dir: &Path) -> Gateway {
    start_with(data_dir, KEY, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = start(dir.path());
    let url = format!("http://{}{MAIN}", gateway.http);
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));

    // 8 concurrent posters, each posting distinct users until the gateway dies.
    let client = reqwest::Client::new();
    let posters: Vec<_> = (0..8u64)
        .map(|poster| {
            let (client, url, acknowledged) = (client.clone(), url.clone(), acknowledged.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let user = format!("crash-{poster}-{n}");
                    let body = serde_json::to_vec(&record_change(&user, n)).unwrap();
                    let sent = client
                        .post(&url)
                        .header("X-Body-Signature", sign(KEY, &body))
                        .body(body)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status().as_u16() == 200 => {
                            acknowledged.lock().unwrap().insert(user);
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();

    // Kill mid-burst, with requests in flight.
    wait_until(
        Duration::from_secs(60),
        "300 webhooks are acknowledged before the kill",
        async || acknowledged.lock().unwrap().len() >= 300,
    )
    .await;
    gateway.child.kill().expect("SIGKILL");
    gateway.child.wait().unwrap();
    for poster in posters {
        poster.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    println!("acknowledged before SIGKILL: {}", acknowledged.len());

    let mut restarted = start(dir.path());
    let mut stream = EventStreamClient::connect(format!("http://{}", restarted.grpc))
        .await
        .unwrap()
        .subscribe(from_beginning())
        .await
        .unwrap()
        .into_inner();
    let mut found = BTreeSet::new();
    let mut sequences = Vec::new();
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_millis(1000), stream.message()).await
    {
        sequences.push(event.sequence);
        found.insert(event.application_user_id);
    }
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();

    let missing: Vec<_> = acknowledged.difference(&found).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
}

#[test]
fn bad_configuration_is_one_line_and_a_non_zero_exit() {
    let run = |envs: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spike-gateway"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in envs {
            command.env(k, v);
        }
        command.output().expect("binary runs")
    };
    let cases: [(&[(&str, &str)], &str); 6] = [
        (
            &[
                ("SPIKE_WEBHOOK_SIGNATURE_KEY", "k"),
                ("GATEWAY_GRPC_ADDR", "0.0.0.0:50051"),
            ],
            "refusing to serve health data on 0.0.0.0:50051 without authentication",
        ),
        (
            &[
                ("SPIKE_WEBHOOK_SIGNATURE_KEY", "k"),
                ("GATEWAY_RETENTION", "soon"),
            ],
            "soon",
        ),
        (&[], "SPIKE_WEBHOOK_SIGNATURE_KEY"),
        (
            &[
                ("SPIKE_WEBHOOK_SIGNATURE_KEY", "k"),
                ("GATEWAY_RETENTION", "0s"),
            ],
            "GATEWAY_RETENTION",
        ),
        (
            &[("SPIKE_WEBHOOK_SIGNATURE_KEY_FILE", "/nonexistent/key")],
            "/nonexistent/key",
        ),
        (
            &[
                ("SPIKE_WEBHOOK_SIGNATURE_KEY", "k"),
                ("GATEWAY_STORE", "nats"),
            ],
            "NATS_URL",
        ),
    ];
    for (envs, expected) in cases {
        let output = run(envs);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{envs:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(expected), "{envs:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Posts `body` signed to MAIN; the response's (appended, duplicates).
async fn post_counts(gateway: &Gateway, body: &serde_json::Value) -> (u64, u64) {
    let body = serde_json::to_vec(body).unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}{MAIN}", gateway.http))
        .header("X-Body-Signature", sign(KEY, &body))
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(response.status().as_u16(), 200);
    let counts: serde_json::Value = response.json().await.unwrap();
    (
        counts["appended"].as_u64().unwrap(),
        counts["duplicates"].as_u64().unwrap(),
    )
}

/// SIGTERM exits cleanly and saves the dedup index; the next start loads it instead of
/// rebuilding it from the log, and a delivery from before the restart is a duplicate.
#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_the_restart_loads_the_dedup_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join(CHECKPOINT_FILE);
    let mut gateway = start(dir.path());
    let delivery = record_change("before-restart", 1);
    assert_eq!(post_counts(&gateway, &delivery).await, (1, 0));
    let exit = gateway.terminate(Duration::from_secs(10));
    assert!(exit.success(), "exit status {exit:?}");
    assert!(checkpoint.exists(), "{}", gateway.log.lock().unwrap());

    let restarted = start(dir.path());
    let log = restarted.log.lock().unwrap().clone();
    assert!(
        log.contains("dedup index loaded from the checkpoint"),
        "{log}"
    );
    assert!(
        !checkpoint.exists(),
        "a started gateway leaves no checkpoint to trust"
    );
    assert_eq!(post_counts(&restarted, &delivery).await, (0, 1));
}

#[tokio::test]
async fn debug_logs_contain_no_body_key_or_signature() {
    const SECRET_KEY: &str = "KEY-MARKER-6f1c0e";
    const BODY_MARKER: &str = "DISH-MARKER-93a7";
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = start_with(dir.path(), SECRET_KEY, &[("RUST_LOG", "debug")]);
    let log = gateway.log.clone();
    let client = reqwest::Client::new();
    let post = |path: &'static str, body: Vec<u8>, signature: String| {
        let request = client
            .post(format!("http://{}{path}", gateway.http))
            .header("X-Body-Signature", signature)
            .body(body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let meal = format!(
        r#"{{"record_id":"r-1","status":"completed","dish_name":"{BODY_MARKER}","nutritional_fields":{{"energy_kcal":1}}}}"#
    );
    let unusable = format!(r#"{{"note":"{BODY_MARKER}"}}"#);
    let wrong_type = format!(r#"{{"record_id":"r-2","dish_name":["{BODY_MARKER}"]}}"#);
    let not_json = format!("{BODY_MARKER} is not json");
    let mut signatures = Vec::new();
    for (path, body, expected) in [
        ("/webhooks/spike/nutrition", meal.clone(), 200),
        ("/webhooks/spike", unusable, 200),
        ("/webhooks/spike/nutrition", wrong_type, 200),
        ("/webhooks/spike", not_json, 400),
    ] {
        let signature = sign(SECRET_KEY, body.as_bytes());
        signatures.push(signature.clone());
        assert_eq!(post(path, body.into_bytes(), signature).await, expected);
    }
    // A caller-supplied request id shows up on the webhook's log lines.
    let traced = client
        .post(format!("http://{}/webhooks/spike", gateway.http))
        .header("X-Body-Signature", sign(SECRET_KEY, b"[]"))
        .header("x-request-id", "trace-abc123")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status().as_u16(), 200);
    // And every RPC runs in a span with one.
    let stream = EventStreamClient::connect(format!("http://{}", gateway.grpc))
        .await
        .unwrap()
        .subscribe(from_beginning())
        .await
        .unwrap()
        .into_inner();
    wait_until(
        Duration::from_secs(5),
        "the subscription is logged",
        async || log.lock().unwrap().contains("subscriber connected"),
    )
    .await;
    drop(stream);

    let forged = sign("another-key", meal.as_bytes());
    assert_eq!(
        post("/webhooks/spike", meal.clone().into_bytes(), forged.clone()).await,
        401
    );
    signatures.push(forged);

    gateway.child.kill().unwrap();
    gateway.child.wait().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(
        log.contains("webhook acknowledged"),
        "debug logs were captured:\n{log}"
    );
    assert!(log.contains("request_id=trace-abc123"), "{log}");
    assert!(
        log.lines().any(|l| l
            .contains("rpc{method=/spike.gateway.v1.EventStream/Subscribe request_id=")
            && l.contains("subscriber connected")),
        "{log}"
    );
    assert!(
        log.lines()
            .filter(|l| l.contains("webhook acknowledged") || l.contains("webhook refused"))
            .all(|l| l.contains("request_id=")),
        "every webhook line carries a request id:\n{log}"
    );
    for secret in [SECRET_KEY, BODY_MARKER]
        .iter()
        .copied()
        .chain(signatures.iter().map(String::as_str))
    {
        assert!(!log.contains(secret), "log contains {secret:?}:\n{log}");
    }
}

#[test]
fn grpc_without_tls_on_a_routable_address_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = start_with(
        dir.path(),
        KEY,
        &[
            ("GATEWAY_GRPC_ADDR", "0.0.0.0:0"),
            ("GATEWAY_GRPC_TOKENS", "tok-SECRET-77"),
        ],
    );
    gateway.child.kill().unwrap();
    gateway.child.wait().unwrap();
    let log = gateway.log.lock().unwrap();
    assert!(log.contains("cleartext"), "{log}");
    assert!(!log.contains("tok-SECRET-77"), "{log}");
}
