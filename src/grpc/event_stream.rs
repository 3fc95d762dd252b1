//! `spike.gateway.v1.EventStream/Subscribe`.
//!
//! Each subscription is a spawned producer that drives a [`Feed`] and sends matching
//! events into a bounded channel that tonic drains to the client. The producer stops as
//! soon as the client goes away (the channel closes) or the gateway shuts down (the stream
//! ends with `UNAVAILABLE`, naming the sequence to resume after).

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    events::{
        EventLog,
        subscription::{self, Feed, Filter, Start, SubscriptionError},
        time::{now_micros, to_micros},
    },
    metrics::Metrics,
    proto::{Event, SubscribeRequest, event_stream_server::EventStream, subscribe_request},
};

/// Events buffered per subscriber between its producer and the HTTP/2 stream. Small: a
/// subscriber that stops reading stalls only its own producer, which then falls behind
/// the live ring and later catches up from the log; memory stays bounded either way.
const SUBSCRIBER_BUFFER: usize = 64;

pub struct EventStreamService {
    log: Arc<dyn EventLog>,
    /// Cancelled when the gateway shuts down; every producer watches it.
    shutdown: CancellationToken,
    subscribers: SubscriberCount,
    metrics: Arc<Metrics>,
}

impl EventStreamService {
    pub fn new(log: Arc<dyn EventLog>, shutdown: CancellationToken, metrics: Arc<Metrics>) -> Self {
        Self {
            log,
            shutdown,
            subscribers: SubscriberCount(metrics.subscribers()),
            metrics,
        }
    }
}

/// Number of live `Subscribe` producers (the `subscribers` gauge); a producer counts until
/// its task ends.
#[derive(Debug, Clone, Default)]
pub struct SubscriberCount(Gauge);

impl SubscriberCount {
    pub fn new(gauge: Gauge) -> Self {
        Self(gauge)
    }

    pub fn get(&self) -> usize {
        self.0.get().max(0) as usize
    }

    fn enter(&self) -> SubscriberGuard {
        self.0.inc();
        SubscriberGuard(self.0.clone())
    }
}

/// Decrements the count when the producer ends, however it ends.
struct SubscriberGuard(Gauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[tonic::async_trait]
impl EventStream for EventStreamService {
    type SubscribeStream = ReceiverStream<Result<Event, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("the gateway is shutting down"));
        }
        let request = request.into_inner();
        let filter = Filter::new(
            &request.event_types,
            request.application_user_ids,
            request.provider_slugs,
        )
        .map_err(Status::invalid_argument)?;
        let start = match request.start {
            None => Start::Live,
            Some(subscribe_request::Start::AfterSequence(after)) => Start::AfterSequence(after),
            Some(subscribe_request::Start::FromBeginning(true)) => Start::FromBeginning,
            Some(subscribe_request::Start::FromBeginning(false)) => Start::Live,
            Some(subscribe_request::Start::Since(since)) => Start::Since(to_micros(&since)),
        };
        let cursor = subscription::open(self.log.clone(), start, &filter)
            .await
            .map_err(status_of)?;
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_BUFFER);
        tracing::info!(?start, from = cursor.position(), "subscriber connected");
        let guard = self.subscribers.enter();
        tokio::spawn(produce(
            guard,
            cursor,
            filter,
            request.include_raw_json,
            sender,
            self.shutdown.clone(),
            self.metrics.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

fn status_of(error: SubscriptionError) -> Status {
    match error {
        SubscriptionError::TooOld { .. } | SubscriptionError::AheadOfLog { .. } => {
            Status::out_of_range(error.to_string())
        }
        SubscriptionError::LiveClosed => Status::unavailable(error.to_string()),
        SubscriptionError::Log(e) => Status::unavailable(e.to_string()),
    }
}

async fn produce(
    _guard: SubscriberGuard,
    mut cursor: Box<dyn Feed>,
    filter: Filter,
    include_raw_json: bool,
    sender: mpsc::Sender<Result<Event, Status>>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let end = loop {
        let batch = tokio::select! {
            // Shutdown first, so a stream that always has events still ends promptly.
            biased;
            () = shutdown.cancelled() => break shutting_down(cursor.as_ref()),
            () = sender.closed() => break None,
            batch = cursor.next_batch() => batch,
        };
        let events = match batch {
            Ok(events) => events,
            Err(e) => break Some(status_of(e)),
        };
        for event in events.iter().filter(|e| filter.matches(e)) {
            let sequence = event.sequence;
            let age = now_micros() - event.received_at.as_ref().map_or(0, to_micros);
            let mut event = Event::clone(event);
            if !include_raw_json {
                event.raw_json = Default::default();
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return finish(&sender, shutting_down_at(sequence)).await,
                sent = sender.send(Ok(event)) => if sent.is_err() { return },
            }
            metrics.delivered(
                sequence,
                std::time::Duration::from_micros(age.max(0) as u64),
            );
        }
    };
    if let Some(status) = end {
        finish(&sender, Some(status)).await;
    }
    tracing::debug!("subscriber gone");
}

fn shutting_down(cursor: &dyn Feed) -> Option<Status> {
    shutting_down_at(cursor.position())
}

/// `position` is the next sequence the subscriber has not received.
fn shutting_down_at(position: u64) -> Option<Status> {
    Some(Status::unavailable(format!(
        "the gateway is shutting down; reconnect with after_sequence={}",
        position.saturating_sub(1)
    )))
}

async fn finish(sender: &mpsc::Sender<Result<Event, Status>>, status: Option<Status>) {
    if let Some(status) = status {
        // The client may already be gone; nothing more to do then.
        let _ = sender.send(Err(status)).await;
    }
}
