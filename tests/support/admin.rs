//! The Admin service from a test: an authenticated client, and the three stores to run an
//! admin test against.

use spike_gateway::proto::admin_client::AdminClient;
use tonic::{Request, transport::Channel};

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

/// `embedded`, `memory` and, when a nats-server can run here, `nats` (on a stream of its
/// own). Without nats-server the NATS case is skipped with a notice.
pub fn stores() -> Vec<Store> {
    let admin = ["--admin-tokens".to_owned(), ADMIN_TOKEN.to_owned()];
    let mut stores: Vec<Store> = ["embedded", "memory"]
        .into_iter()
        .map(|name| Store {
            name,
            flags: [vec!["--store".to_owned(), name.to_owned()], admin.to_vec()].concat(),
            _server: None,
        })
        .collect();
    let (url, server) = match std::env::var("NATS_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => (url, None),
        None if nats::installed() => {
            let server = nats::NatsServer::start();
            (server.url(), Some(server))
        }
        None => {
            eprintln!("SKIPPED: the nats case of this test (no nats-server on the PATH)");
            return stores;
        }
    };
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
    .chain(admin)
    .collect();
    stores.push(Store {
        name: "nats",
        flags,
        _server: server,
    });
    stores
}
