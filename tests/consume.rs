//! `EventStream/Consume` (SPEC §4.3) over a real gateway and real tonic clients: members
//! split a group's events, acks, naks, terms, `ack_wait`, `max_in_flight`, per-user
//! ordering, filter mismatches, restarts, and auth.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeOrdering, ConsumeRequest, Delivery, EventType, Nak, Term,
    consume_open, consume_request, event_stream_client::EventStreamClient,
};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, transport::Channel};

/// One member's stream: what it sends, and what it receives.
struct TestMember {
    requests: mpsc::Sender<ConsumeRequest>,
    deliveries: Streaming<Delivery>,
}

fn open_request(group: &str) -> ConsumeOpen {
    ConsumeOpen {
        group: group.to_owned(),
        start: Some(consume_open::Start::FromBeginning(true)),
        ..ConsumeOpen::default()
    }
}

fn request(request: consume_request::Request) -> ConsumeRequest {
    ConsumeRequest {
        request: Some(request),
    }
}

async fn consume_with(
    mut client: EventStreamClient<Channel>,
    first: ConsumeRequest,
) -> Result<TestMember, Status> {
    // Requests queued for the stream; the test sends only a few at a time.
    let (requests, outgoing) = mpsc::channel(64);
    requests.send(first).await.unwrap();
    let deliveries = tokio::time::timeout(
        Duration::from_secs(5),
        client.consume(ReceiverStream::new(outgoing)),
    )
    .await
    .expect("Consume answers within 5 s")?
    .into_inner();
    Ok(TestMember {
        requests,
        deliveries,
    })
}

async fn join(app: &TestApp, open: ConsumeOpen) -> Result<TestMember, Status> {
    consume_with(
        app.grpc_client().await,
        request(consume_request::Request::Open(open)),
    )
    .await
}

impl TestMember {
    /// The next delivery, failing the test if none comes within 5 s.
    async fn next(&mut self) -> Result<Delivery, Status> {
        tokio::time::timeout(Duration::from_secs(5), self.deliveries.message())
            .await
            .expect("a delivery within 5 s")
            .map(|d| d.expect("stream still open"))
    }

    async fn take(&mut self, n: usize) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.next().await.expect("a delivery, not an error"));
        }
        out
    }

    /// Asserts nothing arrives for a while (the time a delivery would take to show up).
    async fn assert_quiet(&mut self) {
        if let Ok(item) =
            tokio::time::timeout(Duration::from_millis(300), self.deliveries.message()).await
        {
            panic!("expected no delivery, got {item:?}");
        }
    }

    async fn send(&self, message: consume_request::Request) {
        self.requests.send(request(message)).await.unwrap();
    }

    async fn ack(&self, sequences: Vec<u64>) {
        self.send(consume_request::Request::Ack(Ack { sequences }))
            .await;
    }

    /// The stream's end status, within 5 s.
    async fn end(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(_) => continue,
                Err(status) => return status,
            }
        }
    }
}

fn seq(delivery: &Delivery) -> u64 {
    delivery
        .event
        .as_ref()
        .expect("a delivery has its event")
        .sequence
}

async fn post_events(app: &TestApp, user: &str, range: std::ops::Range<u64>) {
    for n in range {
        let response = app.post_json(MAIN, &record_change(user, n)).await;
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn two_members_split_200_events_exactly_once_while_subscribe_sees_all() {
    let app = spawn_app().await;
    let mut plain = app.subscribe(from_beginning()).await.unwrap();
    let open = ConsumeOpen {
        max_in_flight: 8,
        ..open_request("split")
    };
    let mut a = join(&app, open.clone()).await.unwrap();
    let mut b = join(&app, open).await.unwrap();
    post_events(&app, "u", 0..200).await;

    let mut seen: BTreeMap<u64, char> = BTreeMap::new();
    let mut per_member = [0usize; 2];
    while seen.len() < 200 {
        // Whichever member has a delivery ready; each acks what it gets.
        let (name, delivery) = tokio::select! {
            d = a.next() => ('a', d.unwrap()),
            d = b.next() => ('b', d.unwrap()),
        };
        assert_eq!(
            delivery.attempt, 1,
            "nothing fails, so nothing is redelivered"
        );
        let member = if name == 'a' { &a } else { &b };
        member.ack(vec![seq(&delivery)]).await;
        per_member[usize::from(name == 'b')] += 1;
        if let Some(first) = seen.insert(seq(&delivery), name) {
            panic!("{} delivered twice ({first} then {name})", seq(&delivery));
        }
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );
    assert!(
        per_member.iter().all(|&n| n > 0),
        "both members worked: {per_member:?}"
    );
    a.assert_quiet().await;
    b.assert_quiet().await;
    let all = take(&mut plain, 200).await;
    assert_eq!(all.len(), 200);
}

#[tokio::test]
async fn a_dead_members_deliveries_go_to_the_other_with_a_higher_attempt() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let open = ConsumeOpen {
        max_in_flight: 5,
        ..open_request("failover")
    };
    let mut doomed = join(&app, open.clone()).await.unwrap();
    post_events(&app, "u", 0..5).await;
    let held: BTreeSet<u64> = doomed.take(5).await.iter().map(seq).collect();
    let mut survivor = join(&app, open).await.unwrap();
    survivor.assert_quiet().await;
    drop(doomed);
    let redelivered = survivor.take(5).await;
    assert_eq!(redelivered.iter().map(seq).collect::<BTreeSet<_>>(), held);
    assert!(
        redelivered.iter().all(|d| d.attempt >= 2),
        "{redelivered:?}"
    );
}

#[tokio::test]
async fn an_unacked_delivery_comes_back_after_ack_wait() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let mut member = join(
        &app,
        ConsumeOpen {
            ack_wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: 400_000_000,
            }),
            ..open_request("slow")
        },
    )
    .await
    .unwrap();
    post_events(&app, "u", 0..1).await;
    let first = member.next().await.unwrap();
    assert_eq!(first.attempt, 1);
    let started = std::time::Instant::now();
    let again = member.next().await.unwrap();
    assert_eq!((seq(&again), again.attempt), (seq(&first), 2));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "redelivered after ack_wait, not at once: {:?}",
        started.elapsed()
    );
    member.ack(vec![seq(&again)]).await;
    member.assert_quiet().await;
}

#[tokio::test]
async fn nak_redelivers_and_term_never_does() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let mut member = join(&app, open_request("naks")).await.unwrap();
    post_events(&app, "u", 0..2).await;
    let got = member.take(2).await;
    let (naked, termed) = (seq(&got[0]), seq(&got[1]));
    member
        .send(consume_request::Request::Term(Term {
            sequences: vec![termed],
            reason: "poison".into(),
        }))
        .await;
    member
        .send(consume_request::Request::Nak(Nak {
            sequences: vec![naked],
            delay: None,
        }))
        .await;
    let again = member.next().await.unwrap();
    assert_eq!((seq(&again), again.attempt), (naked, 2));
    member.ack(vec![naked]).await;
    member.assert_quiet().await;
}

#[tokio::test]
async fn max_in_flight_caps_deliveries_exactly() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let mut member = join(
        &app,
        ConsumeOpen {
            max_in_flight: 3,
            ..open_request("capped")
        },
    )
    .await
    .unwrap();
    post_events(&app, "u", 0..10).await;
    let first = member.take(3).await;
    member.assert_quiet().await;
    member.ack(vec![seq(&first[0])]).await;
    let one_more = member.take(1).await;
    assert_eq!(seq(&one_more[0]), 4, "the next in sequence order");
    member.assert_quiet().await;
}

#[tokio::test]
async fn a_later_open_with_another_filter_is_a_failed_precondition() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let _first = join(&app, open_request("defined")).await.unwrap();
    let status = join(
        &app,
        ConsumeOpen {
            event_types: vec![EventType::RecordChange as i32],
            ..open_request("defined")
        },
    )
    .await
    .err()
    .expect("a different filter is refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("event_types"),
        "{}",
        status.message()
    );
    let status = join(
        &app,
        ConsumeOpen {
            ordering: ConsumeOrdering::PerUser as i32,
            ..open_request("defined")
        },
    )
    .await
    .err()
    .expect("a different ordering is refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("ordering"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn the_protocol_is_open_first_and_once() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let status = consume_with(
        app.grpc_client().await,
        request(consume_request::Request::Ack(Ack { sequences: vec![1] })),
    )
    .await
    .err()
    .expect("ack before open is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_name = join(&app, open_request("no spaces")).await.err().unwrap();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    let negative = join(
        &app,
        ConsumeOpen {
            ack_wait: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..open_request("g")
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(negative.code(), Code::InvalidArgument);
    let mut member = join(&app, open_request("g")).await.unwrap();
    member
        .send(consume_request::Request::Open(open_request("g")))
        .await;
    let status = member.end().await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("open"), "{}", status.message());
}

#[tokio::test]
async fn per_user_ordering_keeps_each_users_events_in_order_and_one_at_a_time() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let open = ConsumeOpen {
        ordering: ConsumeOrdering::PerUser as i32,
        max_in_flight: 10,
        ..open_request("ordered")
    };
    let mut a = join(&app, open.clone()).await.unwrap();
    let mut b = join(&app, open).await.unwrap();
    // Three users interleaved: u0, u1, u2, u0, u1, u2, ...
    for n in 0..30 {
        let user = format!("u{}", n % 3);
        post_events(&app, &user, n..n + 1).await;
    }
    // Each round the group can hand out exactly one event per user (three), whichever
    // member takes them; nothing more until they are acked.
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for round in 0..10 {
        let mut held: BTreeMap<String, (char, u64)> = BTreeMap::new();
        while held.len() < 3 {
            let (name, delivery) = tokio::select! {
                d = a.next() => ('a', d.unwrap()),
                d = b.next() => ('b', d.unwrap()),
            };
            let event = delivery.event.unwrap();
            let user = event.application_user_id;
            if let Some(previous) = held.insert(user.clone(), (name, event.sequence)) {
                panic!(
                    "round {round}: {user} has two in flight: {previous:?} and {}",
                    event.sequence
                );
            }
            order.entry(user).or_default().push(event.sequence);
        }
        a.assert_quiet().await;
        b.assert_quiet().await;
        for (name, sequence) in held.into_values() {
            let member = if name == 'a' { &a } else { &b };
            member.ack(vec![sequence]).await;
        }
    }
    for (user, sequences) in &order {
        assert_eq!(sequences.len(), 10, "{user}");
        assert!(sequences.is_sorted(), "{user}: {sequences:?}");
    }
}

#[tokio::test]
async fn consume_needs_a_grpc_token() {
    let app = spawn_app_with(&["--store", "memory", "--grpc-tokens", "secret-token"]).await;
    let status = join(&app, open_request("g")).await.err().unwrap();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn shutdown_ends_members_with_unavailable() {
    let mut app = spawn_app_with(&["--store", "memory"]).await;
    let mut member = join(&app, open_request("g")).await.unwrap();
    let stopping = tokio::spawn(async move {
        app.stop().await;
    });
    let status = member.end().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the app stops")
        .unwrap();
}

/// `acked_through` of `group` as the store saved it, if it saved the group.
async fn saved_acked_through(app: &TestApp, group: &str) -> Option<u64> {
    use spike_gateway::events::groups::{Group, Limits};
    let local = app.log.clone().backend().local()?;
    let snapshots = local.load_consumer_groups().await.ok()?;
    snapshots
        .iter()
        .filter_map(|s| Group::restore(s, Limits::default()).ok())
        .find(|g| g.name().as_str() == group)
        .map(|g| g.acked_through())
}

#[tokio::test]
async fn after_a_clean_stop_acked_events_never_come_back_and_the_rest_do() {
    let data_dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut app = spawn_app_in(data_dir.clone(), &[]).await;
    let mut member = join(&app, open_request("durable")).await.unwrap();
    post_events(&app, "u", 0..10).await;
    let got = member.take(10).await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    member.ack((1..=6).collect()).await;
    eventually(
        Duration::from_secs(5),
        "the group's acks are saved",
        async || (saved_acked_through(&app, "durable").await == Some(6)).then_some(()),
    )
    .await;
    app.stop().await;
    drop(app);
    assert_eq!(member.end().await.code(), Code::Unavailable);

    let app = spawn_app_in(data_dir, &[]).await;
    // The start is ignored for an existing group: it resumes where it was.
    let mut member = join(
        &app,
        ConsumeOpen {
            start: None,
            ..open_request("durable")
        },
    )
    .await
    .unwrap();
    let again = member.take(4).await;
    assert_eq!(again.iter().map(seq).collect::<Vec<_>>(), vec![7, 8, 9, 10]);
    assert!(again.iter().all(|d| d.attempt == 2), "{again:?}");
    member.assert_quiet().await;
}

/// The real binary on `data_dir`, and its gRPC and HTTP addresses.
fn start_binary(data_dir: &std::path::Path) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spike-gateway"))
        .env("SPIKE_WEBHOOK_SIGNATURE_KEY", KEY)
        .env("GATEWAY_DATA_DIR", data_dir)
        .env("GATEWAY_HTTP_ADDR", "127.0.0.1:0")
        .env("GATEWAY_GRPC_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("spike-gateway listening"))
        .expect("the gateway logs its addresses");
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    let field = |name: &str| {
        let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[start..].split_whitespace().next().unwrap().to_owned()
    };
    (child, field("grpc"), field("http"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_no_unacked_event_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, grpc, http) = start_binary(dir.path());
    let client = EventStreamClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let first = request(consume_request::Request::Open(open_request("crash")));
    let mut member = consume_with(client, first).await.unwrap();
    let web = reqwest::Client::new();
    for n in 0..20 {
        let body = serde_json::to_vec(&record_change("u", n)).unwrap();
        let response = web
            .post(format!("http://{http}{MAIN}"))
            .header(
                "X-Body-Signature",
                spike_gateway::webhook::signature::sign(KEY, &body),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let got = member.take(20).await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    member.ack((1..=10).collect()).await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();

    let (mut child, grpc, _) = start_binary(dir.path());
    let client = EventStreamClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let first = request(consume_request::Request::Open(open_request("crash")));
    let mut member = consume_with(client, first).await.unwrap();
    // At least once: acks of the last second may be redelivered, the unacked must be.
    // (Attempts made after the last save are not known after a crash, so an attempt
    // may start at 1 again.)
    let mut again = BTreeSet::new();
    while !(11..=20).all(|s| again.contains(&s)) {
        let delivery = member.next().await.expect("a redelivery");
        assert!(
            again.insert(seq(&delivery)),
            "{} delivered twice",
            seq(&delivery)
        );
        member.ack(vec![seq(&delivery)]).await;
    }
    assert!(again.iter().all(|s| (1..=20).contains(s)), "{again:?}");
    member.assert_quiet().await;
    child.kill().unwrap();
    child.wait().unwrap();
}

mod admin_calls {
    use super::*;
    use spike_gateway::proto::{
        DeleteConsumerGroupRequest, EraseUserRequest, ListConsumerGroupsRequest,
        SeekConsumerGroupRequest, seek_consumer_group_request,
    };
    use support::admin::{ADMIN_TOKEN, admin, authed};

    async fn list(app: &TestApp) -> Vec<spike_gateway::proto::ConsumerGroupInfo> {
        admin(app)
            .await
            .list_consumer_groups(authed(ListConsumerGroupsRequest {}))
            .await
            .unwrap()
            .into_inner()
            .groups
    }

    #[tokio::test]
    async fn list_seek_and_delete() {
        let app = spawn_app_with(&["--store", "memory", "--admin-tokens", ADMIN_TOKEN]).await;
        let mut member = join(&app, open_request("ops")).await.unwrap();
        post_events(&app, "u", 0..5).await;
        member.take(5).await;
        member.ack(vec![1, 2]).await;
        let row = eventually(Duration::from_secs(5), "the acks are applied", async || {
            list(&app).await.into_iter().find(|g| g.acked_through == 2)
        })
        .await;
        assert_eq!(
            (row.group.as_str(), row.in_flight, row.pending, row.members),
            ("ops", 3, 3, 1)
        );
        assert_eq!(row.ack_wait.unwrap().seconds, 30);

        let moved = admin(&app)
            .await
            .seek_consumer_group(authed(SeekConsumerGroupRequest {
                group: "ops".into(),
                start: Some(seek_consumer_group_request::Start::AfterSequence(3)),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(moved.next_sequence, 4);
        let again = member.take(2).await;
        assert_eq!(again.iter().map(seq).collect::<Vec<_>>(), vec![4, 5]);

        let deleted = admin(&app)
            .await
            .delete_consumer_group(authed(DeleteConsumerGroupRequest {
                group: "ops".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(deleted.members_ended, 1);
        assert_eq!(member.end().await.code(), Code::FailedPrecondition);
        assert!(list(&app).await.is_empty());
        let missing = admin(&app)
            .await
            .delete_consumer_group(authed(DeleteConsumerGroupRequest {
                group: "ops".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        // A later open creates it anew, at its own start.
        let mut fresh = join(&app, open_request("ops")).await.unwrap();
        assert_eq!(seq(&fresh.next().await.unwrap()), 1);
    }

    #[tokio::test]
    async fn the_group_rpcs_need_an_admin_token() {
        let app = spawn_app_with(&["--store", "memory", "--admin-tokens", ADMIN_TOKEN]).await;
        let status = admin(&app)
            .await
            .list_consumer_groups(ListConsumerGroupsRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    #[tokio::test]
    async fn erasure_removes_the_users_events_from_the_groups_work() {
        let app = spawn_app_with(&["--admin-tokens", ADMIN_TOKEN]).await;
        let mut member = join(
            &app,
            ConsumeOpen {
                max_in_flight: 1,
                ..open_request("erase")
            },
        )
        .await
        .unwrap();
        post_events(&app, "gone", 0..1).await;
        post_events(&app, "kept", 1..2).await;
        post_events(&app, "gone", 2..3).await;
        let held = member.next().await.unwrap();
        assert_eq!(held.event.unwrap().application_user_id, "gone");
        admin(&app)
            .await
            .erase_user(authed(EraseUserRequest {
                application_user_id: "gone".into(),
            }))
            .await
            .unwrap();
        member.ack(vec![1]).await;
        let next = member.next().await.unwrap();
        assert_eq!(next.event.unwrap().application_user_id, "kept");
        member.ack(vec![2]).await;
        member.assert_quiet().await;
    }
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn on_nats_consume_and_the_group_rpcs_say_not_yet() {
    use spike_gateway::proto::ListConsumerGroupsRequest;
    use support::admin::{admin, authed, nats_store};
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let status = join(&app, open_request("g")).await.err().unwrap();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(
        status.message().contains("not available yet"),
        "{}",
        status.message()
    );
    let status = admin(&app)
        .await
        .list_consumer_groups(authed(ListConsumerGroupsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn max_in_flight_over_the_configured_limit_is_refused() {
    let app = spawn_app_with(&["--store", "memory", "--group-max-in-flight", "8"]).await;
    let status = join(
        &app,
        ConsumeOpen {
            max_in_flight: 9,
            ..open_request("g")
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("limit of 8"),
        "{}",
        status.message()
    );
    let too_long = join(
        &app,
        ConsumeOpen {
            ack_wait: Some(prost_types::Duration {
                seconds: 25 * 3600,
                nanos: 0,
            }),
            ..open_request("g")
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    // The default (64) is capped by the lower limit, so a 0 still joins.
    join(&app, open_request("g")).await.unwrap();
}
