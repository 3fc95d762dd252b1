//! `EventStream/Consume` members for the consumer-group tests, on any store and any
//! gateway (an in-process app or a real binary, by its gRPC address).

use std::{net::SocketAddr, time::Duration};

use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeRequest, Delivery, consume_open, consume_request,
    event_stream_client::EventStreamClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

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
        if let Ok(item) =
            tokio::time::timeout(Duration::from_millis(300), self.deliveries.message()).await
        {
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
