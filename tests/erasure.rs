//! `Admin/EraseUser`: a user's events leave replay and dedup; other users' stay.

mod support;

use spike_gateway::proto::{EraseUserRequest, admin_client::AdminClient};
use support::*;
use tonic::{Code, Request};

fn erase(user: &str, token: Option<&str>) -> Request<EraseUserRequest> {
    let mut request = Request::new(EraseUserRequest {
        application_user_id: user.into(),
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

async fn erases_one_user_and_keeps_the_others(store: &str) {
    let app = spawn_app_with(&["--store", store, "--admin-tokens", "root-token"]).await;
    app.post(MAIN, &fixture("main-batch.json")).await; // User1, User2
    app.post(LAB, &fixture("lab-report-completed.json")).await; // end_user_id1
    app.post(NUTRITION, &fixture("nutrition-failed.json")).await; // end_user_id1
    app.post_json(
        MAIN,
        &serde_json::json!({"application_user_id": "end_user_id1", "oops": 1}),
    )
    .await; // a dead letter naming the user

    let mut admin = AdminClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap();
    let erased = admin
        .erase_user(erase("end_user_id1", Some("root-token")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            erased.events_removed,
            erased.dedup_entries_removed,
            erased.dead_letters_removed
        ),
        (2, 2, 1),
        "{store}"
    );
    assert_eq!(app.log.dead_letter_count().await.unwrap(), 0, "{store}");

    let mut replay = app.subscribe(from_beginning()).await.unwrap();
    let users: Vec<String> = take(&mut replay, 2)
        .await
        .into_iter()
        .map(|e| e.application_user_id)
        .collect();
    assert_eq!(users, ["User1", "User2"], "{store}");
    assert_quiet(&mut replay).await;

    // The dedup entries went too: Spike redelivering the same report appends it again,
    // while the other users' events are still recognised as duplicates.
    let body: serde_json::Value = app
        .post(LAB, &fixture("lab-report-completed.json"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["appended"], 1, "{store}: {body}");
    let body: serde_json::Value = app
        .post(MAIN, &fixture("main-batch.json"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["duplicates"], 2, "{store}: {body}");
}

#[tokio::test]
async fn erasure_on_the_embedded_log() {
    erases_one_user_and_keeps_the_others("embedded").await;
}

#[tokio::test]
async fn erasure_on_the_memory_log() {
    erases_one_user_and_keeps_the_others("memory").await;
}

#[tokio::test]
async fn erasure_needs_an_admin_token() {
    let app = spawn_app_with(&["--admin-tokens", "root-token", "--grpc-tokens", "reader"]).await;
    app.post(MAIN, &fixture("main-batch.json")).await;
    let mut admin = AdminClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap();
    for token in [None, Some("wrong"), Some("reader")] {
        let status = admin.erase_user(erase("User1", token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    assert_eq!(app.log.bounds().await.unwrap().next, 3);
    let status = admin
        .erase_user(erase("", Some("root-token")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Without admin tokens the service is closed, whatever the caller sends.
    let closed = spawn_app().await;
    let mut admin = AdminClient::connect(format!("http://{}", closed.grpc))
        .await
        .unwrap();
    let status = admin
        .erase_user(erase("User1", Some("anything")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("GATEWAY_ADMIN_TOKENS"),
        "{}",
        status.message()
    );
}
