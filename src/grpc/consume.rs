//! `spike.gateway.v1.EventStream/Consume`: a consumer-group member's stream (SPEC §4.3).
//!
//! The first message must be `open`; it is validated here and joins the group through
//! [`Groups`] (local or NATS). Then a spawned reader passes the member's `ack`, `nak` and `term`
//! to the group's task, and the group's deliveries go out as the bytes the log encoded
//! once, wrapped in a `Delivery` ([`EncodedDelivery`]). The member's end, however it
//! comes (client gone, its side closed, a protocol violation, shutdown, deletion), hands
//! what it held back to the group.

use std::sync::Arc;

use futures_util::FutureExt;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    events::{
        consumers::{Answer, Groups, JoinError, MemberEnd, MemberMessage, Open},
        groups::{GroupConfig, GroupError, GroupFilter, GroupName, Ordering},
        subscription::{Start, SubscriptionError},
        time::{Micros, to_micros},
    },
    grpc::codec::EncodedDelivery,
    proto::{ConsumeOpen, ConsumeRequest, consume_open, consume_request},
};

/// Longest `ack_wait` an open may ask for: a day. Longer would let a dead member's
/// deliveries sit unnoticed for longer than any operator would want.
pub const MAX_ACK_WAIT: Micros = 24 * 3600 * 1_000_000;
/// Longest `nak` delay: the same bound, for the same reason.
pub const MAX_NAK_DELAY: Micros = MAX_ACK_WAIT;

/// The stream of one member's deliveries.
pub type DeliveryStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<EncodedDelivery, Status>> + Send + 'static>>;

/// Serves one `Consume` call; `groups` is `None` on a log without consumer groups.
pub async fn consume(
    groups: Option<&Arc<dyn Groups>>,
    request: Request<Streaming<ConsumeRequest>>,
) -> Result<Response<DeliveryStream>, Status> {
    let Some(groups) = groups else {
        return Err(Status::unimplemented(
            "this event log serves no consumer groups; use Subscribe",
        ));
    };
    let mut incoming = request.into_inner();
    let first = incoming
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before its open"))?;
    let (open, include_raw_json) = match first.request {
        Some(consume_request::Request::Open(open)) => parse_open(open)?,
        _ => {
            return Err(Status::invalid_argument(
                "the first message of Consume must be open",
            ));
        }
    };
    let group = open.group.clone();
    let member = groups.join(open).await.map_err(join_status)?;
    tracing::info!(%group, member = member.id.get(), "consumer connected");
    let handle = member.handle();
    let ended = member.ended.clone();
    tokio::spawn(async move {
        let answer = tokio::select! {
            () = ended.cancelled() => return,
            answer = read_answers(&mut incoming, &handle) => answer,
        };
        handle.send(answer).await;
    });
    let deliveries =
        futures_util::StreamExt::flat_map(ReceiverStream::new(member.deliveries), move |message| {
            futures_util::stream::iter(outgoing(message, &group, include_raw_json))
        });
    Ok(Response::new(Box::pin(deliveries)))
}

/// What one member message puts on the stream: its deliveries, or the status it ends with.
fn outgoing(
    message: MemberMessage,
    group: &GroupName,
    include_raw_json: bool,
) -> impl Iterator<Item = Result<EncodedDelivery, Status>> + use<> {
    let (handed, end) = match message {
        MemberMessage::Deliveries(handed) => (handed, None),
        MemberMessage::End(why) => (Vec::new(), Some(Err(end_status(group, why)))),
    };
    let deliveries = handed.into_iter().map(move |handed| {
        let event = handed.event.encoded(include_raw_json);
        Ok(EncodedDelivery::new(event, handed.attempt))
    });
    deliveries.chain(end)
}

/// Most sequences one merged ack carries to the group: a member's acks already received
/// go as one command (one pass of the group's task for the lot); the bound keeps that
/// command small whatever the client sends.
const ACK_BATCH: usize = 1024;

/// Passes the member's answers on until its stream ends; returns how it ended.
async fn read_answers(
    incoming: &mut Streaming<ConsumeRequest>,
    handle: &crate::events::consumers::MemberHandle,
) -> Answer {
    let mut carried = None;
    loop {
        let next = match carried.take() {
            Some(next) => next,
            None => next_answer(incoming.next().await),
        };
        let mut answer = match next {
            Ok(answer) => answer,
            Err(end) => return end,
        };
        if let Answer::Ack(sequences) = &mut answer {
            // Acks the client sent meanwhile, already received and decodable without
            // waiting, join this one; anything else waits for the next turn, in order.
            while sequences.len() < ACK_BATCH {
                let Some(ready) = incoming.next().now_or_never() else {
                    break;
                };
                match next_answer(ready) {
                    Ok(Answer::Ack(more)) => sequences.extend(more),
                    other => {
                        carried = Some(other);
                        break;
                    }
                }
            }
        }
        if !handle.send(answer).await {
            return Answer::Leave;
        }
    }
}

/// The stream's next message as an answer, or (`Err`) how the stream ends: the client
/// closed or broke it (the member's end), or it broke the protocol.
fn next_answer(message: Option<Result<ConsumeRequest, Status>>) -> Result<Answer, Answer> {
    match message {
        Some(Ok(request)) => answer_of(request).map_err(Answer::Violation),
        Some(Err(_)) | None => Err(Answer::Leave),
    }
}

/// One message after the open, or why it breaks the protocol.
fn answer_of(request: ConsumeRequest) -> Result<Answer, String> {
    use consume_request::Request as R;
    match request.request {
        Some(R::Ack(ack)) => Ok(Answer::Ack(ack.sequences)),
        Some(R::Term(term)) => Ok(Answer::Term(term.sequences)),
        Some(R::Nak(nak)) => {
            let delay = nak.delay.as_ref().map_or(0, duration_micros);
            if !(0..=MAX_NAK_DELAY).contains(&delay) {
                return Err(format!(
                    "nak delay must be between 0 and {} s",
                    MAX_NAK_DELAY / 1_000_000
                ));
            }
            Ok(Answer::Nak {
                sequences: nak.sequences,
                delay,
            })
        }
        Some(R::Open(_)) => Err("open was already sent: a stream opens once".to_owned()),
        None => Err("a ConsumeRequest must set ack, nak or term".to_owned()),
    }
}

fn duration_micros(duration: &prost_types::Duration) -> Micros {
    duration
        .seconds
        .saturating_mul(1_000_000)
        .saturating_add(Micros::from(duration.nanos / 1_000))
}

/// Validates an `open`; returns it with its `include_raw_json`.
fn parse_open(open: ConsumeOpen) -> Result<(Open, bool), Status> {
    let invalid = |e: GroupError| Status::invalid_argument(e.to_string());
    let group = GroupName::parse(&open.group).map_err(invalid)?;
    let filter = GroupFilter::new(
        &open.event_types,
        open.application_user_ids,
        open.provider_slugs,
    )
    .map_err(invalid)?;
    let ordering = Ordering::from_proto(open.ordering).map_err(invalid)?;
    let ack_wait = open.ack_wait.as_ref().map_or(0, duration_micros);
    if ack_wait > MAX_ACK_WAIT {
        return Err(Status::invalid_argument(format!(
            "ack_wait must be at most {} s",
            MAX_ACK_WAIT / 1_000_000
        )));
    }
    let config = GroupConfig::new(filter, ordering, ack_wait).map_err(invalid)?;
    let start = match open.start {
        None => Start::Live,
        Some(consume_open::Start::AfterSequence(after)) => Start::AfterSequence(after),
        Some(consume_open::Start::FromBeginning(true)) => Start::FromBeginning,
        Some(consume_open::Start::FromBeginning(false)) => Start::Live,
        Some(consume_open::Start::Since(since)) => Start::Since(to_micros(&since)),
    };
    let parsed = Open {
        group,
        config,
        start,
        max_in_flight: open.max_in_flight,
    };
    Ok((parsed, open.include_raw_json))
}

fn join_status(error: JoinError) -> Status {
    let message = error.to_string();
    match error {
        JoinError::Group(GroupError::Mismatch { .. }) => Status::failed_precondition(message),
        JoinError::Group(GroupError::UnknownMember(_) | GroupError::InvalidScan(_)) => {
            Status::internal(message)
        }
        JoinError::Group(_) => Status::invalid_argument(message),
        JoinError::Start(
            SubscriptionError::TooOld { .. } | SubscriptionError::AheadOfLog { .. },
        ) => Status::out_of_range(message),
        JoinError::Start(SubscriptionError::Log(crate::events::LogError::Damaged(_))) => {
            Status::data_loss(message)
        }
        JoinError::Start(_) | JoinError::ShuttingDown => Status::unavailable(message),
    }
}

fn end_status(group: &GroupName, why: MemberEnd) -> Status {
    match why {
        MemberEnd::ShuttingDown => Status::unavailable(format!(
            "the gateway is shutting down; this member's unacknowledged deliveries went back to group {group}: reconnect"
        )),
        MemberEnd::Deleted => Status::failed_precondition(format!(
            "consumer group {group} was deleted by an operator"
        )),
        MemberEnd::Protocol(why) => Status::invalid_argument(why),
    }
}
