//! The Admin service from a test: an authenticated client, and the stores to run an admin
//! test against.

use spike_gateway::proto::{
    ConsumerGroupInfo, DeleteConsumerGroupRequest, DeleteConsumerGroupResponse, EraseUserRequest,
    EraseUserResponse, ListConsumerGroupsRequest, SeekConsumerGroupRequest,
    admin_client::AdminClient, seek_consumer_group_request,
};
use tonic::{Request, Status, transport::Channel};

use super::{TestApp, nats};

/// The admin token the apps of these helpers accept.
pub const ADMIN_TOKEN: &str = "root-token";

/// `message` with `authorization: Bearer <ADMIN_TOKEN>`.
pub fn authed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    request
}

pub async fn admin(app: &TestApp) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap()
}

/// Erases `user` (SPEC §4.4) as the admin.
pub async fn erase_user(app: &TestApp, user: &str) -> EraseUserResponse {
    admin(app)
        .await
        .erase_user(authed(EraseUserRequest {
            application_user_id: user.into(),
        }))
        .await
        .expect("EraseUser succeeds")
        .into_inner()
}

/// Every consumer group `app` lists.
pub async fn list_groups(app: &TestApp) -> Vec<ConsumerGroupInfo> {
    admin(app)
        .await
        .list_consumer_groups(authed(ListConsumerGroupsRequest {}))
        .await
        .expect("ListConsumerGroups succeeds")
        .into_inner()
        .groups
}

/// Moves `group` to after `sequence`; returns the next sequence it will deliver.
pub async fn seek_group(app: &TestApp, group: &str, sequence: u64) -> u64 {
    admin(app)
        .await
        .seek_consumer_group(authed(SeekConsumerGroupRequest {
            group: group.to_owned(),
            start: Some(seek_consumer_group_request::Start::AfterSequence(sequence)),
        }))
        .await
        .expect("SeekConsumerGroup succeeds")
        .into_inner()
        .next_sequence
}

pub async fn delete_group(
    app: &TestApp,
    group: &str,
) -> Result<DeleteConsumerGroupResponse, Status> {
    admin(app)
        .await
        .delete_consumer_group(authed(DeleteConsumerGroupRequest {
            group: group.to_owned(),
        }))
        .await
        .map(tonic::Response::into_inner)
}

/// Flags selecting a store, with the admin token; keeps the NATS server (if any) alive.
pub struct Store {
    pub name: &'static str,
    pub flags: Vec<String>,
    _server: Option<nats::NatsServer>,
}

impl Store {
    pub fn flags(&self) -> Vec<&str> {
        self.flags.iter().map(String::as_str).collect()
    }
}

/// `embedded` and `memory`: the stores every run has. A test's NATS case is a test of its
/// own, `#[ignore]`d and run by `.ci/test` when a server is there (see [`nats_store`]), so
/// that a run without nats-server counts it as skipped, never as passed.
pub fn local_stores() -> Vec<Store> {
    let admin = ["--admin-tokens".to_owned(), ADMIN_TOKEN.to_owned()];
    ["embedded", "memory"]
        .into_iter()
        .map(|name| Store {
            name,
            flags: [vec!["--store".to_owned(), name.to_owned()], admin.to_vec()].concat(),
            _server: None,
        })
        .collect()
}

/// Runs `scenario` on a fresh gateway of each local store in turn; the store's name is
/// printed first, so a failure says which one it was.
pub async fn on_each_local_store(scenario: impl AsyncFn(&TestApp)) {
    for store in local_stores() {
        eprintln!("store: {}", store.name);
        let app = super::spawn_app_with(&store.flags()).await;
        scenario(&app).await;
    }
}

/// The `nats` store, on a stream of its own: on `NATS_URL` when set, else on a nats-server
/// started for the test, which fails the test when none is installed (the NATS tests are
/// ignored, so they only run when asked for).
pub fn nats_store() -> Store {
    let (url, server) = nats::url_or_start();
    let (stream, prefix) = nats::unique_stream();
    let flags = [
        "--store",
        "nats",
        "--nats-url",
        &url,
        "--nats-stream",
        &stream,
    ]
    .into_iter()
    .chain(["--nats-subject-prefix", &prefix])
    .map(str::to_owned)
    .chain(["--admin-tokens".to_owned(), ADMIN_TOKEN.to_owned()])
    .collect();
    Store {
        name: "nats",
        flags,
        _server: server,
    }
}
