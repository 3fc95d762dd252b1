//! `EventStream/Consume` members for the consumer-group tests, on any store and any
//! gateway (an in-process app or a real binary, by its gRPC address).

use std::{net::SocketAddr, time::Duration};

use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeOrdering, ConsumeRequest, Delivery, EventType, Nak, Term,
    consume_open, consume_request, event_stream_client::EventStreamClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, transport::Channel};

use super::{MAIN, TestApp, record_change};

/// One member's stream: what it sends, and what it receives.
pub struct TestMember {
    pub requests: mpsc::Sender<ConsumeRequest>,
    pub deliveries: Streaming<Delivery>,
}

pub fn open_request(group: &str) -> ConsumeOpen {
    ConsumeOpen {
        group: group.to_owned(),
        start: Some(consume_open::Start::FromBeginning(true)),
        ..ConsumeOpen::default()
    }
}

pub fn request(request: consume_request::Request) -> ConsumeRequest {
    ConsumeRequest {
        request: Some(request),
    }
}

pub async fn consume_with(
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

pub async fn join(app: &TestApp, open: ConsumeOpen) -> Result<TestMember, Status> {
    join_at(app.grpc, open).await
}

/// A member on the gateway listening for gRPC at `grpc` (another replica, a real binary).
pub async fn join_at(grpc: SocketAddr, open: ConsumeOpen) -> Result<TestMember, Status> {
    let client = EventStreamClient::connect(format!("http://{grpc}"))
        .await
        .expect("the gateway's gRPC port accepts connections");
    consume_with(client, request(consume_request::Request::Open(open))).await
}

impl TestMember {
    /// The next delivery, failing the test if none comes within 5 s.
    pub async fn next(&mut self) -> Result<Delivery, Status> {
        tokio::time::timeout(Duration::from_secs(5), self.deliveries.message())
            .await
            .expect("a delivery within 5 s")
            .map(|d| d.expect("stream still open"))
    }

    pub async fn take(&mut self, n: usize) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.next().await.expect("a delivery, not an error"));
        }
        out
    }

    /// Asserts nothing arrives for a while (the time a delivery would take to show up).
    pub async fn assert_quiet(&mut self) {
        self.assert_quiet_for(Duration::from_millis(300)).await;
    }

    /// Asserts nothing arrives for `quiet` (longer than a redelivery would take).
    pub async fn assert_quiet_for(&mut self, quiet: Duration) {
        if let Ok(item) = tokio::time::timeout(quiet, self.deliveries.message()).await {
            panic!("expected no delivery, got {item:?}");
        }
    }

    pub async fn send(&self, message: consume_request::Request) {
        self.requests.send(request(message)).await.unwrap();
    }

    pub async fn ack(&self, sequences: Vec<u64>) {
        self.send(consume_request::Request::Ack(Ack { sequences }))
            .await;
    }

    /// The stream's end status, within 5 s.
    pub async fn end(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(_) => continue,
                Err(status) => return status,
            }
        }
    }
}

pub fn seq(delivery: &Delivery) -> u64 {
    delivery
        .event
        .as_ref()
        .expect("a delivery has its event")
        .sequence
}

pub async fn post_events(app: &TestApp, user: &str, range: std::ops::Range<u64>) {
    for n in range {
        let response = app.post_json(MAIN, &record_change(user, n)).await;
        assert_eq!(response.status(), 200);
    }
}

/// `millis` as a protobuf duration (an `ack_wait`, a nak's `delay`).
pub fn millis(millis: u32) -> Option<prost_types::Duration> {
    let millis = i32::try_from(millis).expect("a test duration fits in i32");
    Some(prost_types::Duration {
        seconds: i64::from(millis / 1000),
        nanos: (millis % 1000) * 1_000_000,
    })
}

// Scenarios every store must pass, written once: the local suite runs them on one gateway,
// the NATS suite on one or two replicas of a shared stream.

/// An unacked delivery returns after `ack_wait` (not before), with a higher attempt; once
/// acked it never returns, not even after another `ack_wait`.
pub async fn ack_wait_redelivers_and_acked_never_returns(app: &TestApp, ack_wait: Duration) {
    let mut member = join(
        app,
        ConsumeOpen {
            ack_wait: millis(u32::try_from(ack_wait.as_millis()).unwrap()),
            ..open_request("slow")
        },
    )
    .await
    .unwrap();
    post_events(app, "u", 0..1).await;
    let first = member.next().await.unwrap();
    assert_eq!(first.attempt, 1);
    let started = std::time::Instant::now();
    let again = member.next().await.unwrap();
    assert_eq!((seq(&again), again.attempt), (seq(&first), 2));
    assert!(
        started.elapsed() >= ack_wait * 4 / 5,
        "redelivered after ack_wait, not at once: {:?}",
        started.elapsed()
    );
    member.ack(vec![seq(&again)]).await;
    member.assert_quiet_for(ack_wait * 3 / 2).await;
}

/// A nak redelivers at once with a higher attempt, a term never redelivers. Returns the
/// member and the naked sequence, delivered twice and not yet acked.
pub async fn nak_redelivers_and_term_never_does(app: &TestApp) -> (TestMember, u64) {
    let mut member = join(app, open_request("naks")).await.unwrap();
    post_events(app, "u", 0..2).await;
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
    (member, naked)
}

/// A member never holds more than its `max_in_flight` unanswered deliveries; an ack makes
/// room for exactly one more, the next in sequence order.
pub async fn max_in_flight_caps_deliveries_exactly(app: &TestApp) {
    let mut member = join(
        app,
        ConsumeOpen {
            max_in_flight: 3,
            ..open_request("capped")
        },
    )
    .await
    .unwrap();
    post_events(app, "u", 0..10).await;
    let first = member.take(3).await;
    assert_eq!(first.iter().map(seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    member.assert_quiet().await;
    member.ack(vec![seq(&first[0])]).await;
    let one_more = member.take(1).await;
    assert_eq!(seq(&one_more[0]), 4, "the next in sequence order");
    member.assert_quiet().await;
}

/// Once `first` defined a group, an open on `second` (the same gateway or another replica)
/// with another filter or ordering is refused with FAILED_PRECONDITION naming what
/// differs; the same definition joins.
pub async fn another_definition_is_a_failed_precondition(first: &TestApp, second: &TestApp) {
    let _defining = join(first, open_request("defined")).await.unwrap();
    let differing = [
        (
            "event_types",
            ConsumeOpen {
                event_types: vec![EventType::RecordChange as i32],
                ..open_request("defined")
            },
        ),
        (
            "ordering",
            ConsumeOpen {
                ordering: ConsumeOrdering::PerUser as i32,
                ..open_request("defined")
            },
        ),
    ];
    for (field, open) in differing {
        let status = join(second, open)
            .await
            .err()
            .unwrap_or_else(|| panic!("a different {field} is refused"));
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    join(second, open_request("defined")).await.unwrap();
}

/// The first half of the erasure scenario: a member holding the first of three events
/// (two of user `gone`, one of `kept`, one delivery at a time) when `gone` is erased.
/// Returns the member; [`erasure_leaves_only_the_other_users_work`] checks what follows.
pub async fn a_member_holds_an_event_of_a_user_erased_meanwhile(app: &TestApp) -> TestMember {
    let mut member = join(
        app,
        ConsumeOpen {
            max_in_flight: 1,
            ..open_request("erase")
        },
    )
    .await
    .unwrap();
    post_events(app, "gone", 0..1).await;
    post_events(app, "kept", 1..2).await;
    post_events(app, "gone", 2..3).await;
    let held = member.next().await.unwrap();
    assert_eq!(held.event.unwrap().application_user_id, "gone");
    super::admin::erase_user(app, "gone").await;
    member
}

/// The second half: acking the held event, the member gets `kept`'s and nothing of
/// `gone`'s, and once that is acked the group's floor passed both with nothing pending.
pub async fn erasure_leaves_only_the_other_users_work(app: &TestApp, mut member: TestMember) {
    member.ack(vec![1]).await;
    let next = member.next().await.unwrap();
    assert_eq!(next.event.unwrap().application_user_id, "kept");
    member.ack(vec![2]).await;
    member.assert_quiet().await;
    let row = super::eventually(Duration::from_secs(5), "the acks are applied", async || {
        super::admin::list_groups(app)
            .await
            .into_iter()
            .find(|g| g.acked_through >= 2 && g.in_flight == 0)
    })
    .await;
    assert_eq!(row.pending, 0, "{row:?}");
}
