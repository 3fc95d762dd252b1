//! Consumer-group delivery against plain `Subscribe` on the same log: four group members
//! acking each delivery as it arrives, against four plain subscribers.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeRequest, consume_open, consume_request,
    event_stream_client::EventStreamClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// One group member: opens `group` from the beginning and acks every delivery at once.
/// Counts first deliveries into `received`; returns when the stream ends.
pub async fn member(url: String, group: &'static str, received: Arc<AtomicU64>) {
    let mut client = EventStreamClient::connect(url).await.unwrap();
    // Acks queued for the stream: one per delivery, at most max_in_flight outstanding.
    let (requests, outgoing) = mpsc::channel(1024);
    let open = ConsumeOpen {
        group: group.to_owned(),
        start: Some(consume_open::Start::FromBeginning(true)),
        max_in_flight: 256,
        ..ConsumeOpen::default()
    };
    let message = |request| ConsumeRequest {
        request: Some(request),
    };
    requests
        .send(message(consume_request::Request::Open(open)))
        .await
        .unwrap();
    let mut deliveries = client
        .consume(ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    while let Ok(Some(delivery)) = deliveries.message().await {
        let sequence = delivery.event.map_or(0, |e| e.sequence);
        if delivery.attempt == 1 {
            received.fetch_add(1, Ordering::Relaxed);
        }
        let ack = consume_request::Request::Ack(Ack {
            sequences: vec![sequence],
        });
        if requests.send(message(ack)).await.is_err() {
            return;
        }
    }
}
