//! The `nats` backend: NATS JetStream, for several gateway replicas behind a load balancer.
//!
//! Every replica appends to one stream and reads from it, so a subscriber on any replica
//! sees what any replica received. Dedup is JetStream's: each event is published with
//! `Nats-Msg-Id` = `event_id` and the stream's duplicate window = the dedup window. An
//! event's `sequence` is its stream sequence.
//!
//! Subjects are `{prefix}.event.{type}.{user}.p{N}` (user escaped by [`subject_token`],
//! since Spike ids may contain `.`), so NATS can filter by type and user. `p{N}` is the
//! user's partition ([`partition_of`]: a stable hash of the user id, modulo the fixed
//! [`PARTITIONS`]), which per-user consumer groups read one consumer per partition (see
//! [`super::nats_groups`]). The token is *trailing*, so a filter on type and user is still
//! one subject (`{prefix}.event.{type}.{user}.*`). Streams written before it (0.1, and
//! this release before partitions) hold 4-token subjects `{prefix}.event.{type}.{user}`;
//! they stay readable: see "Legacy subjects" below. Dead letters go to a second stream on
//! `{prefix}.dead.{category}`, keeping event sequences contiguous.
//!
//! Each subscription reads the stream with its own ordered push consumer
//! ([`NatsLog::follow`]): `after_sequence`, `from_beginning`, `since` and live map onto
//! deliver policies, and a filter naming at most one type and one user becomes the
//! consumer's filter subject, so NATS filters at the source. Ordered consumers recreate
//! themselves on any gap or reconnect, so a stream stays ordered, gap-free and
//! duplicate-free; flow control keeps a slow reader from buffering without bound.
//!
//! **Legacy subjects.** nats-server 2.9 takes one filter subject per consumer, and no
//! single subject matches both `a.b.c.d` and `a.b.c.d.e`. So while the stream still holds
//! a 4-token message (checked at connect and again by each `Subscribe` until none is
//! left: retention removes them), a narrowing `Subscribe` reads `{prefix}.event.>` and the
//! gateway applies the filter; once they are gone it narrows at the source again. Groups
//! read them with one extra consumer (see [`super::nats_groups`]). Every message this
//! release publishes has 5 tokens, so the legacy form never comes back.
//!
//! No history is read in this process, so NATS is not a [`super::LocalLog`]: the
//! subscription entry point is [`super::Backend::Nats`].
//!
//! **No transaction across the two streams.** [`EventLog::admit`] publishes a request's
//! dead letters, then its events, then removes redriven letters; a failure part way gets the
//! webhook a 503 and Spike retries the same bytes. Every message carries a `Nats-Msg-Id`
//! (events: `event_id`; dead letters: [`dead_letter_key`]) and both streams' duplicate
//! windows are the dedup window, which covers Spike's retry schedule, so the retry stores
//! only what the failed attempt did not: never a message twice. A redrive that fails after
//! its events were stored leaves the letters, and redriving them again finds the events
//! duplicates and then removes them.
//!
//! Dead letters: a letter's id is its dead-letter stream sequence. Rewriting one (a new
//! reason, backfilled user ids) publishes the new version and deletes the old, so its id
//! changes. Erasure scans the dead-letter stream, decodes each letter and deletes those
//! whose recorded user ids name the user.
//!
//! **Upgrade from 0.1** (whose event ids followed another rule): messages published by this
//! release carry the header `Spike-Gateway-Id-Rule: 2`. At connect, a replica reads the
//! headers (not the bodies) of the events published within the last dedup window up to the
//! first message with that header, and keeps the `Nats-Msg-Id`s of those without it: an
//! event whose `legacy_event_id` is among them is a duplicate. The set is dropped once the
//! window has passed. 0.1 replicas must all be stopped before the first replica of this
//! release starts (see the README, "Upgrading from 0.1").

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
use futures_util::StreamExt;
use prost::Message;

use super::{
    Admission, Admitted, AppendOutcome, Backend, CommittedEvent, Erased, EventLog, LogBounds,
    LogError, NewEvent, dead_letter_key, names_user,
    subscription::{Feed, Filter, Start, SubscriptionError, first_position},
    time::{Micros, from_micros, now_micros},
};
use crate::proto::{DeadLetter, Event, EventType, WebhookCategory};

/// Names the identity rule of an event message's `Nats-Msg-Id`; 0.1 sent no such header.
const ID_RULE_HEADER: &str = "Spike-Gateway-Id-Rule";
/// Whole-content event ids (SPEC §2.4).
const ID_RULE: &str = "2";
/// How long the upgrade scan waits for the next message before giving up on the rest.
/// Only a stalled server makes it wait that long: the scan stops at the last message
/// pending when it began.
const SCAN_IDLE: Duration = Duration::from_secs(5);

/// Messages the client buffers per subscription before the ordered consumer has to
/// recover (it then re-reads from the last delivered sequence, losing nothing). Bounds a
/// slow subscriber's memory on this replica.
const SUBSCRIPTION_CAPACITY: usize = 1024;
/// How long one publish waits for its PubAck before the webhook gets a 503.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Partitions of the subject layout: a user's events all carry `p{partition_of(user)}`.
/// Fixed, not configurable: changing it would move users to other partitions, and a
/// per-user group could then deliver a user's newer events (new partition) before older
/// ones still pending in the old partition. 16 lets 16 users proceed in parallel per
/// group, at the cost of 16 JetStream consumers per per-user group.
pub const PARTITIONS: u32 = 16;

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
    closed: AtomicBool,
    /// The stream may still hold 4-token (pre-partition) event subjects; cleared once a
    /// look-up finds none (they never come back: see the module docs).
    legacy_subjects: AtomicBool,
    // 0.1-rule msg ids still in JetStream's duplicate window (see the module docs). A std
    // Mutex: held only for a map lookup, never across an await.
    legacy: std::sync::Mutex<LegacyIds>,
}

/// Message ids 0.1 published within the duplicate window, until that window has passed.
#[derive(Default)]
struct LegacyIds {
    /// msg id → (stream sequence, subject token of the user), the token for erasure.
    ids: std::collections::HashMap<String, (u64, String)>,
    /// After this, JetStream has forgotten every one of them.
    until: Micros,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Storage(format!("{what}: {e}"))
}

impl NatsLog {
    /// Connects, and creates or validates both streams.
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
                // Dead letters are deduplicated by content key like events by event id, so
                // a retried request stores none twice.
                duplicate_window: settings.dedup_window,
                storage: StorageType::File,
                allow_direct: true,
                ..Default::default()
            },
        )
        .await?;

        let legacy = legacy_ids(&events, &client, &settings).await?;
        if !legacy.ids.is_empty() {
            tracing::info!(
                ids = legacy.ids.len(),
                "events published by 0.1 are in the duplicate window: their redeliveries stay duplicates until it passes"
            );
        }
        let log = Self {
            client,
            jetstream,
            events,
            dead_letters,
            settings,
            closed: AtomicBool::new(false),
            legacy_subjects: AtomicBool::new(true),
            legacy: std::sync::Mutex::new(legacy),
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
            "{}.event.{}.{}.p{}",
            self.settings.subject_prefix,
            type_token(event.r#type),
            subject_token(&event.application_user_id),
            partition_of(&event.application_user_id)
        )
    }

    /// The `{type}.{user}` tokens of the narrowest subject covering `filter` (`*` where it
    /// names none), or `None` when it names several of either (NATS 2.9 takes one
    /// filter subject).
    pub(super) fn tokens_for(filter: &Filter) -> Option<(String, String)> {
        let kind = match filter.event_types.len() {
            0 => "*".to_owned(),
            1 => type_token(*filter.event_types.iter().next()?),
            _ => return None,
        };
        let user = match filter.application_user_ids.len() {
            0 => "*".to_owned(),
            1 => subject_token(filter.application_user_ids.iter().next()?),
            _ => return None,
        };
        Some((kind, user))
    }

    /// `{prefix}.event.{kind}.{user}.{tail}`, or the 4-token legacy form without a tail.
    pub(super) fn event_subject(&self, kind: &str, user: &str, tail: Option<&str>) -> String {
        let prefix = &self.settings.subject_prefix;
        match tail {
            Some(tail) => format!("{prefix}.event.{kind}.{user}.{tail}"),
            None => format!("{prefix}.event.{kind}.{user}"),
        }
    }

    /// The narrowest single subject covering `filter` for a `Subscribe`: wide while the
    /// stream may hold legacy subjects, which a narrowed one would miss.
    pub(super) async fn subject_for(&self, filter: &Filter) -> Result<String, LogError> {
        match Self::tokens_for(filter) {
            Some((kind, user)) if !self.legacy_from(1).await? => {
                Ok(self.event_subject(&kind, &user, Some("*")))
            }
            _ => Ok(self.event_filter()),
        }
    }

    /// Whether the stream holds a 4-token (pre-partition) event at or after `sequence`.
    /// Once none is left anywhere, answers without asking NATS.
    pub(super) async fn legacy_from(&self, sequence: u64) -> Result<bool, LogError> {
        if !self.legacy_subjects.load(Ordering::Acquire) {
            return Ok(false);
        }
        let legacy = format!("{}.event.*.*", self.settings.subject_prefix);
        match self
            .events
            .direct_get_next_for_subject(legacy, Some(sequence.max(1)))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                if sequence <= 1 {
                    self.legacy_subjects.store(false, Ordering::Release);
                }
                Ok(false)
            }
            Err(e) => Err(unavailable("NATS read failed", e)),
        }
    }

    /// The JetStream context and the settings, for the groups' counters.
    pub(super) fn jetstream(&self) -> (&Context, &NatsSettings) {
        (&self.jetstream, &self.settings)
    }

    /// The events stream, for the consumer groups' durable consumers.
    pub(super) fn events_stream(&self) -> stream::Stream {
        self.events.clone()
    }

    /// Where a consumer starting at `start` begins: its deliver policy, the first
    /// sequence when the start names one, and the bounds it was checked against.
    pub(super) async fn deliver_policy(
        &self,
        start: Start,
    ) -> Result<(DeliverPolicy, Option<u64>, LogBounds), SubscriptionError> {
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
        Ok((deliver_policy, position, bounds))
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

    fn dead_letter_filter(&self) -> String {
        format!("{}.dead.>", self.settings.subject_prefix)
    }

    /// The stream sequence of the 0.1 event `legacy_id` names, if JetStream still knows it.
    fn legacy_duplicate(&self, legacy_id: Option<&str>, now: Micros) -> Option<u64> {
        let legacy = self.legacy.lock().unwrap_or_else(|e| e.into_inner());
        if legacy.until <= now {
            return None;
        }
        legacy.ids.get(legacy_id?).map(|(sequence, _)| *sequence)
    }

    /// Publishes events with their msg ids; one round trip for the batch.
    async fn publish_events(
        &self,
        events: Vec<NewEvent>,
        now: Micros,
    ) -> Result<Vec<AppendOutcome>, LogError> {
        // Publish everything first, then collect the acks in order.
        let mut pending = Vec::with_capacity(events.len());
        for new in events {
            if let Some(sequence) = self.legacy_duplicate(new.legacy_event_id.as_deref(), now) {
                pending.push(Pending::Known(AppendOutcome::Duplicate { sequence }));
                continue;
            }
            let mut event = new.event;
            event.received_at.get_or_insert_with(|| from_micros(now));
            event.sequence = 0;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.event_id.as_str());
            headers.insert(ID_RULE_HEADER, ID_RULE);
            let subject = self.subject_of(&event);
            // The layout subscribers are sent, so reading it back copies nothing but the
            // sequence in front.
            let payload = CommittedEvent::new(event).encoded(true);
            pending.push(Pending::Ack(self.publish(subject, headers, payload).await?));
        }
        let mut outcomes = Vec::with_capacity(pending.len());
        for pending in pending {
            outcomes.push(match pending {
                Pending::Known(outcome) => outcome,
                Pending::Ack(ack) => acknowledged(ack).await?,
            });
        }
        Ok(outcomes)
    }

    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, LogError> {
        self.jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| unavailable("NATS publish failed", e))
    }

    /// Publishes a dead letter under `msg_id`; the ack's outcome names the letter's id.
    async fn publish_letter(
        &self,
        mut letter: DeadLetter,
        msg_id: &str,
        now: Micros,
    ) -> Result<jetstream::context::PublishAckFuture, LogError> {
        let category = WebhookCategory::try_from(letter.path_category)
            .unwrap_or(WebhookCategory::Unspecified)
            .as_str_name()
            .trim_start_matches("WEBHOOK_CATEGORY_")
            .to_ascii_lowercase();
        letter.id = 0;
        letter.received_at.get_or_insert_with(|| from_micros(now));
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        let subject = format!("{}.dead.{category}", self.settings.subject_prefix);
        self.publish(subject, headers, letter.encode_to_vec().into())
            .await
    }

    /// Rewrites stored letters: the new version is published, then the old one deleted.
    /// The msg id names the letter it replaces, so a retry publishes it once.
    async fn replace_letters(&self, letters: Vec<DeadLetter>, now: Micros) -> Result<(), LogError> {
        for letter in letters {
            let old = letter.id;
            if self.letter_at(old).await?.is_none() {
                continue;
            }
            let msg_id = format!("{}:replaces:{old}", dead_letter_key(&letter));
            acknowledged(self.publish_letter(letter, &msg_id, now).await?).await?;
            self.delete_letter(old).await?;
        }
        Ok(())
    }

    async fn delete_letter(&self, id: u64) -> Result<(), LogError> {
        delete_message(&self.dead_letters, id).await
    }

    /// Deletes (and erases) the events on `subject` one by one; returns how many. Not a
    /// filtered purge: nats-server 2.9 moves every consumer's ack floor past the last
    /// purged sequence, so consumer groups would skip the other users' events in between
    /// (seen on 2.9.10, tests/nats_consume.rs). One round trip per event of the user.
    async fn delete_events(&self, subject: String) -> Result<u64, LogError> {
        let (mut deleted, mut at) = (0, 1);
        loop {
            let message = match self
                .events
                .direct_get_next_for_subject(subject.as_str(), Some(at))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(deleted),
                Err(e) => return Err(unavailable("NATS read failed", e)),
            };
            at = message.sequence + 1;
            delete_message(&self.events, message.sequence).await?;
            deleted += 1;
        }
    }
}

/// Deletes message `id` of `stream` (the server overwrites it); one already gone is fine.
async fn delete_message(stream: &stream::Stream, id: u64) -> Result<(), LogError> {
    match stream.delete_message(id).await {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            // Already gone (redriven or erased by another replica): the goal holds.
            async_nats::jetstream::stream::DeleteMessageErrorKind::JetStream(js)
                if js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
                    || js.error_code() == jetstream::ErrorCode::SEQUENCE_NOT_FOUND =>
            {
                Ok(())
            }
            _ => Err(unavailable("NATS delete failed", e)),
        },
    }
}

impl NatsLog {
    /// The stored letter at `id` exactly, if any.
    async fn letter_at(&self, id: u64) -> Result<Option<DeadLetter>, LogError> {
        Ok(self.letter_at_or_after(id).await?.filter(|l| l.id == id))
    }

    /// The stored letter with the smallest id at or after `id`, if any.
    async fn letter_at_or_after(&self, id: u64) -> Result<Option<DeadLetter>, LogError> {
        match self
            .dead_letters
            .direct_get_next_for_subject(self.dead_letter_filter(), Some(id.max(1)))
            .await
        {
            Ok(message) => {
                let mut letter = DeadLetter::decode(message.payload).map_err(|e| {
                    LogError::Storage(format!("undecodable dead letter {}: {e}", message.sequence))
                })?;
                letter.id = message.sequence;
                Ok(Some(letter))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable("NATS read failed", e)),
        }
    }

    /// Deletes the dead letters naming `user`; returns how many.
    async fn erase_letters(&self, user: &str) -> Result<u64, LogError> {
        let mut erased = 0;
        let mut at = 1;
        while let Some(letter) = self.letter_at_or_after(at).await? {
            at = letter.id + 1;
            if names_user(&letter, user) {
                self.delete_letter(letter.id).await?;
                erased += 1;
            }
        }
        Ok(erased)
    }

    /// `received_at` of the stored event at or after `sequence`, if any: where
    /// [`EventLog::bounds`] says retention has trimmed through.
    async fn received_at_or_after(&self, sequence: u64) -> Result<Option<Micros>, LogError> {
        match self
            .events
            .direct_get_next_for_subject(self.event_filter(), Some(sequence))
            .await
        {
            Ok(message) => Ok(Some(
                decode(message.sequence, message.payload)?.received_at(),
            )),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable("NATS read failed", e)),
        }
    }

    /// Follows the stream from `start` with an ordered push consumer of its own, filtered
    /// at the source by the narrowest subject covering `filter`: `Subscribe` on NATS.
    pub async fn follow(
        &self,
        start: Start,
        filter: &Filter,
    ) -> Result<Box<dyn Feed>, SubscriptionError> {
        let (deliver_policy, position, bounds) = self.deliver_policy(start).await?;
        let consumer = self
            .events
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: self.subject_for(filter).await?,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("cannot create a NATS consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("cannot read a NATS consumer", e))?;
        Ok(Box::new(NatsFeed {
            messages,
            position: position.unwrap_or(bounds.oldest),
        }))
    }

    /// Number of dead letters stored, shared by every replica: the dead-letter stream's
    /// message count (one stream-info request).
    pub async fn dead_letter_count(&self) -> Result<u64, LogError> {
        let mut dead = self.dead_letters.clone();
        Ok(dead
            .info()
            .await
            .map_err(|e| unavailable("cannot read the dead-letter stream", e))?
            .state
            .messages)
    }
}

/// An event's outcome, known now (a 0.1 duplicate) or when its PubAck arrives.
enum Pending {
    Known(AppendOutcome),
    Ack(jetstream::context::PublishAckFuture),
}

async fn acknowledged(
    ack: jetstream::context::PublishAckFuture,
) -> Result<AppendOutcome, LogError> {
    let ack = ack
        .await
        .map_err(|e| unavailable("NATS did not acknowledge", e))?;
    // On a duplicate JetStream answers with the sequence of the message stored first.
    Ok(if ack.duplicate {
        AppendOutcome::Duplicate {
            sequence: ack.sequence,
        }
    } else {
        AppendOutcome::Appended {
            sequence: ack.sequence,
        }
    })
}

/// Reads the headers of the events published within the last dedup window, up to the
/// first one this release published, and keeps the msg ids 0.1 gave the others.
async fn legacy_ids(
    events: &stream::Stream,
    client: &async_nats::Client,
    settings: &NatsSettings,
) -> Result<LegacyIds, LogError> {
    let now = now_micros();
    let window = settings.dedup_window.as_micros() as Micros;
    let mut legacy = LegacyIds {
        ids: Default::default(),
        until: now.saturating_add(window),
    };
    let Some(mut messages) =
        window_headers(events, client, settings, now.saturating_sub(window)).await?
    else {
        return Ok(legacy); // nothing published within the window
    };
    let prefix_len = settings.subject_prefix.len() + ".event.".len();
    loop {
        let message = match tokio::time::timeout(SCAN_IDLE, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(unavailable("upgrade scan failed", e)),
            Ok(None) => return Err(LogError::Storage("the upgrade scan consumer ended".into())),
            Err(_) => {
                tracing::warn!(
                    "the upgrade scan of the duplicate window stalled; continuing with what it read"
                );
                return Ok(legacy);
            }
        };
        let Ok(info) = message.info() else { continue };
        let headers = message.headers.as_ref();
        if headers.and_then(|h| h.get(ID_RULE_HEADER)).is_some() {
            return Ok(legacy); // from here on, this release's messages
        }
        if let Some(id) = headers.and_then(|h| h.get("Nats-Msg-Id")) {
            // Subject `{prefix}.event.{type}.{user token}`: keep the token for erasure.
            let token = message
                .subject
                .get(prefix_len..)
                .and_then(|rest| rest.split('.').nth(1))
                .map_or_else(String::new, str::to_owned);
            let entry = (info.stream_sequence, token);
            legacy.ids.insert(id.as_str().to_owned(), entry);
        }
        if info.pending == 0 {
            return Ok(legacy); // the newest message when the scan began
        }
    }
}

/// The headers (not the bodies) of the events published since `start`, or `None` if there
/// are none.
async fn window_headers(
    events: &stream::Stream,
    client: &async_nats::Client,
    settings: &NatsSettings,
    start: Micros,
) -> Result<Option<push::Ordered>, LogError> {
    let consumer = events
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{}.event.>", settings.subject_prefix),
            deliver_policy: DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(i128::from(start) * 1_000)
                    .map_err(|e| unavailable("invalid scan start", e))?,
            },
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("cannot create the upgrade scan consumer", e))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(None);
    }
    let messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable("cannot read the upgrade scan consumer", e))?;
    Ok(Some(messages))
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
pub(super) fn decode(sequence: u64, payload: bytes::Bytes) -> Result<CommittedEvent, LogError> {
    CommittedEvent::decode(sequence, payload)
        .map_err(|e| LogError::Storage(format!("undecodable event at {sequence}: {e}")))
}

/// The partition of `user`'s events: FNV-1a (64 bit) of the id's bytes modulo
/// [`PARTITIONS`]. Stable across releases and platforms, since it decides which consumer
/// of a per-user group reads the user; never change it (or [`PARTITIONS`]) for a stream
/// in use.
pub fn partition_of(user: &str) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = user.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    (hash % u64::from(PARTITIONS)) as u32
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
    async fn admit(&self, admission: Admission) -> Result<Admitted, LogError> {
        self.connected()?;
        let now = now_micros();
        // Like events: publish every letter, then collect the acks (one round trip).
        let mut acks = Vec::with_capacity(admission.dead_letters.len());
        for letter in admission.dead_letters {
            let key = dead_letter_key(&letter);
            acks.push(self.publish_letter(letter, &key, now).await?);
        }
        let mut dead_letters = Vec::with_capacity(acks.len());
        for ack in acks {
            dead_letters.push(acknowledged(ack).await?);
        }
        let events = self.publish_events(admission.events, now).await?;
        self.replace_letters(admission.updated, now).await?;
        // Last: a redriven letter goes only once its events are stored.
        for id in admission.resolved {
            self.delete_letter(id).await?;
        }
        Ok(Admitted {
            events,
            dead_letters,
        })
    }

    async fn dead_letters(
        &self,
        after_id: u64,
        limit: usize,
        user: Option<&str>,
    ) -> Result<Vec<DeadLetter>, LogError> {
        let mut out = Vec::new();
        let mut at = after_id.saturating_add(1);
        while out.len() < limit {
            let Some(letter) = self.letter_at_or_after(at).await? else {
                break;
            };
            at = letter.id + 1;
            if user.is_none_or(|u| names_user(&letter, u)) {
                out.push(letter);
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
            match self.received_at_or_after(oldest).await? {
                Some(received) => Some(received - 1),
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

    async fn housekeeping(&self) -> Result<(), LogError> {
        // JetStream applies max_age and the duplicate window itself.
        Ok(())
    }

    /// Deletes the user's events and the dead letters naming the user. JetStream
    /// keeps its duplicate-window message ids (event ids and letter keys, which are hashes)
    /// until the window passes; they cannot be erased here: see the README's Security
    /// section.
    async fn erase_user(&self, user: &str) -> Result<Erased, LogError> {
        self.connected()?;
        let token = subject_token(user);
        let dead_letters = self.erase_letters(user).await?;
        self.legacy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ids
            .retain(|_, (_, owner)| *owner != token);
        // Both layouts: the user's partition form, and the legacy 4-token form.
        let mut events = 0;
        for tail in [Some("*"), None] {
            events += self
                .delete_events(self.event_subject("*", &token, tail))
                .await?;
        }
        Ok(Erased {
            events,
            dead_letters,
            ..Erased::default()
        })
    }

    fn wants_legacy_ids(&self) -> bool {
        let legacy = self.legacy.lock().unwrap_or_else(|e| e.into_inner());
        !legacy.ids.is_empty() && now_micros() < legacy.until
    }

    fn health(&self) -> super::LogHealth {
        use super::LogHealth;
        match self.connected() {
            Ok(()) => LogHealth::Ready,
            Err(LogError::Closed) => LogHealth::Closed,
            Err(e) => LogHealth::Unreachable(e.to_string()),
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.client.flush().await;
    }

    fn backend(self: Arc<Self>) -> Backend {
        Backend::Nats(self)
    }
}

#[cfg(test)]
mod tests {
    use super::{PARTITIONS, partition_of, subject_token};

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: a change would reorder users' events in per-user groups.
        assert_eq!(partition_of(""), (0xcbf2_9ce4_8422_2325_u64 % 16) as u32);
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the published test vector).
        assert_eq!(partition_of("a"), (0xaf63_dc4c_8601_ec8c_u64 % 16) as u32);
        let used: std::collections::HashSet<_> = (0..200)
            .map(|n| partition_of(&format!("user-{n}")))
            .collect();
        assert_eq!(used.len(), PARTITIONS as usize, "{used:?}");
    }

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
