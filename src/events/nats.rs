//! The `nats` backend: NATS JetStream, for several gateway replicas behind a load balancer.
//!
//! Every replica appends to one stream and reads from it, so a subscriber on any replica
//! sees what any replica received. Dedup is JetStream's: each event is published with
//! `Nats-Msg-Id` = `event_id` and the stream's duplicate window = the dedup window. An
//! event's `sequence` is its stream sequence.
//!
//! Subjects are `{prefix}.event.{type}.{user}` (user escaped by [`subject_token`], since
//! Spike ids may contain `.`), so NATS can filter by type and user. Dead letters go to a
//! second stream on `{prefix}.dead.{category}`, keeping event sequences contiguous.
//!
//! Each subscription reads the stream with its own ordered push consumer
//! ([`EventLog::follow`]): `after_sequence`, `from_beginning`, `since` and live map onto
//! deliver policies, and a filter naming at most one type and one user becomes the
//! consumer's filter subject, so NATS filters at the source. Ordered consumers recreate
//! themselves on any gap or reconnect, so a stream stays ordered, gap-free and
//! duplicate-free; flow control keeps a slow reader from buffering without bound.
//!
//! The generic [`EventLog::read`] / [`EventLog::live`] contract is implemented too
//! (direct gets, and one ordered consumer per replica feeding the local fan-out).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::{
    HeaderMap,
    connection::State,
    jetstream::{
        self, Context,
        consumer::{DeliverPolicy, push},
        stream::{self, DirectGetErrorKind, StorageType},
    },
};
use async_trait::async_trait;
use futures_util::{StreamExt, future::try_join_all};
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::{
    AppendOutcome, CommittedEvent, Erased, EventLog, LogBounds, LogError,
    fanout::{self, Fanout},
    subscription::{Feed, Filter, Start, SubscriptionError, first_position},
    time::{Micros, from_micros, now_micros},
};
use crate::proto::{DeadLetter, Event, EventType, WebhookCategory};

/// Messages the client buffers per subscription before the ordered consumer has to
/// recover (it then re-reads from the last delivered sequence, losing nothing). Bounds a
/// slow subscriber's memory on this replica.
const SUBSCRIPTION_CAPACITY: usize = 1024;
/// How long one publish waits for its PubAck before the webhook gets a 503.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before the tail consumer is recreated after an error.
const TAIL_RETRY: Duration = Duration::from_millis(500);

/// Where the gateway keeps its events in NATS.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
    pub dedup_window: Duration,
    pub retention: Duration,
}

pub struct NatsLog {
    client: async_nats::Client,
    jetstream: Context,
    events: stream::Stream,
    dead_letters: stream::Stream,
    settings: NatsSettings,
    fanout: Fanout,
    closed: AtomicBool,
    // Stops the tail task on close().
    stop_tail: CancellationToken,
    // The tail feeds only `live()`, which Subscribe does not use here (each subscription has
    // its own consumer): it starts with the first `live()` call, not at connect.
    tail_started: std::sync::Once,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Storage(format!("{what}: {e}"))
}

impl NatsLog {
    /// Connects, creates or validates both streams, and starts tailing.
    pub async fn connect(settings: NatsSettings) -> Result<Self, LogError> {
        let client = async_nats::ConnectOptions::new()
            .name("spike-gateway")
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connect(settings.url.as_str())
            .await
            .map_err(|e| unavailable(&format!("cannot connect to NATS at {}", settings.url), e))?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(ACK_TIMEOUT);

        let events = ensure_stream(
            &jetstream,
            stream::Config {
                name: settings.stream.clone(),
                subjects: vec![format!("{}.event.>", settings.subject_prefix)],
                max_age: settings.retention,
                duplicate_window: settings.dedup_window,
                storage: StorageType::File,
                allow_direct: true,
                ..Default::default()
            },
        )
        .await?;
        let dead_letters = ensure_stream(
            &jetstream,
            stream::Config {
                name: format!("{}_DEAD_LETTERS", settings.stream),
                subjects: vec![format!("{}.dead.>", settings.subject_prefix)],
                max_age: settings.retention,
                // Dead letters are not deduplicated; this is the server's default, stated so
                // that validation does not see a difference to correct.
                duplicate_window: Duration::from_secs(120),
                storage: StorageType::File,
                ..Default::default()
            },
        )
        .await?;

        let log = Self {
            client,
            jetstream,
            events,
            dead_letters,
            settings,
            fanout: Fanout::default(),
            closed: AtomicBool::new(false),
            stop_tail: CancellationToken::new(),
            tail_started: std::sync::Once::new(),
        };
        Ok(log)
    }

    /// Largest message the NATS server accepts; an event (with its raw JSON) must fit.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    fn event_filter(&self) -> String {
        format!("{}.event.>", self.settings.subject_prefix)
    }

    fn subject_of(&self, event: &Event) -> String {
        format!(
            "{}.event.{}.{}",
            self.settings.subject_prefix,
            type_token(event.r#type),
            subject_token(&event.application_user_id)
        )
    }

    /// The narrowest single subject covering `filter` (NATS 2.9 takes one filter subject).
    fn subject_for(&self, filter: &Filter) -> String {
        let one = |set: usize| set == 1;
        let kind = match filter.event_types.iter().next() {
            Some(t) if one(filter.event_types.len()) => type_token(*t),
            _ if filter.event_types.is_empty() => "*".to_owned(),
            _ => return self.event_filter(),
        };
        let user = match filter.application_user_ids.iter().next() {
            Some(u) if one(filter.application_user_ids.len()) => subject_token(u),
            _ if filter.application_user_ids.is_empty() => "*".to_owned(),
            _ => return self.event_filter(),
        };
        format!("{}.event.{kind}.{user}", self.settings.subject_prefix)
    }

    fn connected(&self) -> Result<(), LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(LogError::Storage(format!(
                "NATS is not connected ({state:?})"
            ))),
        }
    }

    /// The stored event at or after `sequence`, if any.
    async fn next_at_or_after(&self, sequence: u64) -> Result<Option<CommittedEvent>, LogError> {
        match self
            .events
            .direct_get_next_for_subject(self.event_filter(), Some(sequence))
            .await
        {
            Ok(message) => decode(message.sequence, message.payload).map(Some),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable("NATS read failed", e)),
        }
    }
}

/// Creates the stream, or checks an existing one and brings its limits in line.
async fn ensure_stream(
    jetstream: &Context,
    wanted: stream::Config,
) -> Result<stream::Stream, LogError> {
    let mut stream = jetstream
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| unavailable(&format!("cannot create or open stream {}", wanted.name), e))?;
    let existing = stream
        .info()
        .await
        .map_err(|e| unavailable("cannot read the stream's configuration", e))?
        .config
        .clone();
    if existing.subjects != wanted.subjects || existing.storage != wanted.storage {
        return Err(LogError::Storage(format!(
            "stream {} exists with subjects {:?} and {:?} storage; the gateway needs {:?} on file storage",
            wanted.name, existing.subjects, existing.storage, wanted.subjects
        )));
    }
    if existing.max_age != wanted.max_age
        || existing.duplicate_window != wanted.duplicate_window
        || existing.allow_direct != wanted.allow_direct
    {
        tracing::warn!(stream = %wanted.name, "updating the stream's retention / duplicate window to the gateway's configuration");
        let updated = stream::Config {
            max_age: wanted.max_age,
            duplicate_window: wanted.duplicate_window,
            allow_direct: wanted.allow_direct,
            ..existing
        };
        jetstream
            .update_stream(updated)
            .await
            .map_err(|e| unavailable(&format!("cannot update stream {}", wanted.name), e))?;
    }
    Ok(stream)
}

/// Follows the stream from its current end and publishes each event to the local fan-out.
/// Anything a receiver misses before the tail starts it reads from the log, as after a lag.
async fn tail(
    mut events: stream::Stream,
    client: async_nats::Client,
    filter: String,
    fanout: Fanout,
    stop: CancellationToken,
) {
    let mut next = loop {
        match events.info().await {
            Ok(info) => break info.state.last_sequence + 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stream's end for the tail; retrying");
                if pause(&stop).await {
                    return;
                }
            }
        }
    };
    loop {
        let consumer = events
            .create_consumer(push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(consumer) => match consumer.messages().await {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the NATS tail consumer; retrying");
                    if pause(&stop).await {
                        return;
                    }
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the NATS tail consumer; retrying");
                if pause(&stop).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = messages.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "NATS tail consumer failed; recreating it");
                    break;
                }
                None => break,
            };
            let Ok(info) = message.info() else { continue };
            let sequence = info.stream_sequence;
            match decode(sequence, message.payload.clone()) {
                Ok(event) => fanout.publish([Arc::new(event)]),
                Err(e) => tracing::error!(sequence, error = %e, "undecodable event in the stream"),
            }
            next = sequence + 1;
        }
        if pause(&stop).await {
            return;
        }
    }
}

/// Waits before a retry; true if the log is closing instead.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(TAIL_RETRY) => false,
    }
}

fn type_token(event_type: i32) -> String {
    EventType::try_from(event_type)
        .unwrap_or(EventType::Unspecified)
        .as_str_name()
        .trim_start_matches("EVENT_TYPE_")
        .to_ascii_lowercase()
}

/// One subscription's ordered consumer.
struct NatsFeed {
    messages: push::Ordered,
    position: u64,
}

#[async_trait]
impl Feed for NatsFeed {
    async fn next_batch(&mut self) -> Result<Vec<Arc<CommittedEvent>>, SubscriptionError> {
        loop {
            let message = match self.messages.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(unavailable("NATS consumer failed", e).into()),
                None => return Err(SubscriptionError::LiveClosed),
            };
            let Ok(info) = message.info() else { continue };
            let sequence = info.stream_sequence;
            let event = decode(sequence, message.payload.clone())?;
            self.position = sequence + 1;
            return Ok(vec![Arc::new(event)]);
        }
    }

    fn position(&self) -> u64 {
        self.position
    }
}

/// Messages hold the event without its sequence, which is the stream's own.
fn decode(sequence: u64, payload: bytes::Bytes) -> Result<CommittedEvent, LogError> {
    CommittedEvent::decode(sequence, payload)
        .map_err(|e| LogError::Storage(format!("undecodable event at {sequence}: {e}")))
}

/// A user id as one NATS subject token: `[A-Za-z0-9_-]` kept, every other byte `~XX` (hex).
/// Injective (so filters are exact), and `.`, `*`, `>` and spaces never reach the subject.
/// The empty id is `~`.
pub fn subject_token(user: &str) -> String {
    if user.is_empty() {
        return "~".to_owned();
    }
    let mut token = String::with_capacity(user.len());
    for byte in user.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            token.push(byte as char);
        } else {
            token.push_str(&format!("~{byte:02X}"));
        }
    }
    token
}

#[async_trait]
impl EventLog for NatsLog {
    async fn append(&self, events: Vec<Event>) -> Result<Vec<AppendOutcome>, LogError> {
        self.connected()?;
        let now = now_micros();
        // Publish everything first, then collect the acks: one round trip per request.
        let mut acks = Vec::with_capacity(events.len());
        for mut event in events {
            event.received_at.get_or_insert_with(|| from_micros(now));
            event.sequence = 0;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.event_id.as_str());
            let ack = self
                .jetstream
                .publish_with_headers(
                    self.subject_of(&event),
                    headers,
                    // The layout subscribers are sent, so reading it back copies nothing
                    // but the sequence in front.
                    CommittedEvent::new(event).encoded(true),
                )
                .await
                .map_err(|e| unavailable("NATS publish failed", e))?;
            acks.push(ack.into_future());
        }
        let acks = try_join_all(acks)
            .await
            .map_err(|e| unavailable("NATS did not acknowledge", e))?;
        Ok(acks
            .into_iter()
            .map(|ack| {
                if ack.duplicate {
                    AppendOutcome::Duplicate {
                        sequence: ack.sequence,
                    }
                } else {
                    AppendOutcome::Appended {
                        sequence: ack.sequence,
                    }
                }
            })
            .collect())
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), LogError> {
        self.connected()?;
        let category = WebhookCategory::try_from(letter.path_category)
            .unwrap_or(WebhookCategory::Unspecified)
            .as_str_name()
            .trim_start_matches("WEBHOOK_CATEGORY_")
            .to_ascii_lowercase();
        self.jetstream
            .publish(
                format!("{}.dead.{category}", self.settings.subject_prefix),
                letter.encode_to_vec().into(),
            )
            .await
            .map_err(|e| unavailable("NATS publish failed", e))?
            .await
            .map_err(|e| unavailable("NATS did not acknowledge", e))?;
        Ok(())
    }

    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Arc<CommittedEvent>>, LogError> {
        let mut out = Vec::new();
        let mut at = from;
        while out.len() < limit {
            match self.next_at_or_after(at).await? {
                Some(event) => {
                    at = event.sequence() + 1;
                    out.push(Arc::new(event));
                }
                None => break,
            }
        }
        Ok(out)
    }

    async fn bounds(&self) -> Result<LogBounds, LogError> {
        let mut events = self.events.clone();
        let info = events
            .info()
            .await
            .map_err(|e| unavailable("cannot read the stream's state", e))?;
        let state = &info.state;
        let next = state.last_sequence + 1;
        let oldest = if state.messages == 0 {
            next
        } else {
            state.first_sequence
        };
        // JetStream does not say when it removed messages; if any were removed, treat
        // everything before the oldest retained event as gone.
        let trimmed_through = if oldest > 1 {
            match self.next_at_or_after(oldest).await? {
                Some(event) => Some(event.received_at() - 1),
                None => Some(now_micros()),
            }
        } else {
            None
        };
        Ok(LogBounds {
            oldest,
            next,
            trimmed_through,
        })
    }

    async fn position_at(&self, since: Micros) -> Result<u64, LogError> {
        let bounds = self.bounds().await?;
        // Binary search on received_at, as for the embedded log. Replicas' clocks may
        // disagree by a little; `since` is as precise as they are.
        let (mut low, mut high) = (bounds.oldest, bounds.next);
        while low < high {
            let mid = low + (high - low) / 2;
            let at_or_after = match self.next_at_or_after(mid).await? {
                Some(event) => event.received_at() >= since,
                None => true,
            };
            if at_or_after {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        Ok(low)
    }

    fn live(&self) -> fanout::Receiver {
        // Subscribe before the tail starts, so the first receiver misses nothing it reads.
        let receiver = self.fanout.subscribe();
        self.tail_started.call_once(|| {
            tokio::spawn(tail(
                self.events.clone(),
                self.client.clone(),
                self.event_filter(),
                self.fanout.clone(),
                self.stop_tail.clone(),
            ));
        });
        receiver
    }

    async fn follow(
        &self,
        start: Start,
        filter: &Filter,
    ) -> Result<Option<Box<dyn Feed>>, SubscriptionError> {
        self.connected()?;
        let bounds = self.bounds().await?;
        let position = first_position(start, &bounds)?;
        let deliver_policy = match (start, position) {
            (Start::Live, _) => DeliverPolicy::New,
            (Start::FromBeginning, _) => DeliverPolicy::All,
            (Start::AfterSequence(_), Some(position)) => DeliverPolicy::ByStartSequence {
                start_sequence: position,
            },
            // JetStream's own timestamps: the moment the PubAck'd publish was stored, which
            // is received_at give or take the publish round trip.
            (Start::Since(since), _) => DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(i128::from(since) * 1_000)
                    .map_err(|e| unavailable("invalid since", e))?,
            },
            (Start::AfterSequence(_), None) => unreachable!("after_sequence names a position"),
        };
        let consumer = self
            .events
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: self.subject_for(filter),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("cannot create a NATS consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("cannot read a NATS consumer", e))?;
        Ok(Some(Box::new(NatsFeed {
            messages,
            position: position.unwrap_or(bounds.oldest),
        })))
    }

    async fn housekeeping(&self) -> Result<(), LogError> {
        // JetStream applies max_age and the duplicate window itself.
        Ok(())
    }

    /// Purges the user's subjects. JetStream keeps its duplicate-window message ids (event
    /// ids, which are hashes) until the window passes, and dead-letter subjects carry no
    /// user, so neither can be erased here: see the README's Security section.
    async fn erase_user(&self, user: &str) -> Result<Erased, LogError> {
        self.connected()?;
        let subject = format!(
            "{}.event.*.{}",
            self.settings.subject_prefix,
            subject_token(user)
        );
        let purged = self
            .events
            .purge()
            .filter(subject)
            .await
            .map_err(|e| unavailable("NATS purge failed", e))?;
        Ok(Erased {
            events: purged.purged,
            ..Erased::default()
        })
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        let mut dead = self.dead_letters.clone();
        Ok(dead
            .info()
            .await
            .map_err(|e| unavailable("cannot read the dead-letter stream", e))?
            .state
            .messages)
    }

    fn is_ready(&self) -> bool {
        self.connected().is_ok()
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.stop_tail.cancel();
        let _ = self.client.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::subject_token;

    #[test]
    fn user_tokens_are_safe_and_distinct() {
        let ids = [
            "a.b",
            "a~2Eb",
            "a",
            "a.b.c",
            "*",
            ">",
            "with space",
            "",
            "~",
            "ü",
        ];
        let tokens: Vec<_> = ids.iter().map(|id| subject_token(id)).collect();
        for token in &tokens {
            assert!(
                !token.is_empty() && !token.contains(['.', '*', '>', ' ']),
                "{token}"
            );
        }
        let distinct: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{tokens:?}");
        assert_eq!(subject_token("User_1-x"), "User_1-x");
        assert_eq!(subject_token("a.b"), "a~2Eb");
    }
}
