//! Consumer groups on NATS (SPEC §4.3, §4.4): a group is a JetStream durable pull consumer
//! on the events stream, shared by every replica, so members on different replicas split
//! its work natively and its position lives in JetStream, not in any one gateway.
//!
//! - **The consumer**: `group_{name}` (`.` written `~`, which a group name cannot hold, so
//!   the mapping is one to one), `AckPolicy::Explicit`, `ack_wait` as the group's, its
//!   deliver policy from the creating open's start, and the narrowest single filter
//!   subject that covers the group's filter (nats-server 2.9 takes one); the rest of the
//!   filter is applied here, and a non-matching event is acked at once (it is not the
//!   group's work).
//! - **Its definition** (filter, ordering, `ack_wait`, `created_at`) is kept in the
//!   consumer's `description` (2.9 has no consumer metadata), so every replica compares a
//!   later open against the same thing (`FAILED_PRECONDITION` on a difference). A
//!   definition must fit JetStream's description limit ([`MAX_DESCRIPTION`]).
//! - **A member** is a task of its own: it pulls at most its room (`max_in_flight` minus
//!   what it holds), holds the messages until their ack, `-NAK` (with its delay) or
//!   `+TERM`, and on its end naks what it still holds without a delay, so JetStream
//!   redelivers them at once to any member. A replica that dies without a word is covered
//!   by `ack_wait`. `attempt` is the message's delivered count.
//! - **Per-user ordering**: the group's consumer gets `max_ack_pending` 1, so across every
//!   replica one event of the group is unsettled at a time: one user's events go in
//!   sequence order and never two at once, with no state outside JetStream. The price is
//!   that users do not proceed in parallel (see the README, "On NATS").
//!   `max_ack_pending` of an unordered group is [`Limits::max_waiting`].
//! - **Erasure**: the log purges the user's messages from the stream, and JetStream skips
//!   what is gone, so they leave every group's pending work without anything done here.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, PullConsumer, pull},
    stream,
};
use base64::Engine;
use futures_util::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    LogError,
    consumers::{
        AdminError, Answer, GroupRow, Groups, JoinError, Member, MemberEnd, MemberMessage, Open,
    },
    groups::{
        Counters, GroupConfig, GroupError, GroupFilter, GroupName, GroupStats, Limits, MemberId,
        Ordering,
    },
    nats::{NatsLog, decode},
    subscription::{Filter, Start, SubscriptionError},
    time::{Micros, from_micros, now_micros, to_micros},
};
use crate::proto::ConsumerGroupInfo;

/// JetStream refuses a consumer description longer than this (4 KiB on 2.9).
pub const MAX_DESCRIPTION: usize = 4096;
/// What a gateway group's description starts with, before its base64 definition.
const DESCRIPTION_TAG: &str = "spike-gateway group v1 ";
/// Consumer names of groups start with it, so other consumers on the stream are not
/// taken for groups.
const CONSUMER_PREFIX: &str = "group_";
/// How long one pull waits for messages before the member pulls again: also how long a
/// member that gained room (by acking) may wait for a pull sized to it.
const PULL_EXPIRES: Duration = Duration::from_millis(500);
/// How long past its `expires` a pull may stay unanswered before the member pulls anew.
const PULL_GRACE: Duration = Duration::from_millis(500);
/// Pause after a failed pull before the next (NATS unreachable, a consumer being
/// recreated by a seek): a retry loop would only add load.
const PULL_RETRY: Duration = Duration::from_millis(200);
/// Answers queued per member: the member's client waits (is pushed back on) when full;
/// each costs one publish to NATS, so a small queue suffices.
const ANSWER_QUEUE: usize = 64;

/// This replica's side of every group: its members, so an admin call can end them.
pub struct NatsGroups {
    log: Arc<NatsLog>,
    stream: stream::Stream,
    limits: Limits,
    shutdown: CancellationToken,
    next_member: AtomicU64,
    /// Per group: cancelled when an operator deletes it here, and how many members this
    /// replica has. A std mutex: held only for a map lookup or insert, never across an
    /// await.
    local: Mutex<HashMap<GroupName, LocalGroup>>,
    /// The members' tasks, so shutdown waits for them to return their deliveries. A std
    /// mutex: held only to push or take, never across an await.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Clone, Default)]
struct LocalGroup {
    deleted: CancellationToken,
    members: Arc<AtomicUsize>,
}

fn storage(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Storage(format!("{what}: {e}"))
}

fn consumer_name(group: &GroupName) -> String {
    format!("{CONSUMER_PREFIX}{}", group.as_str().replace('.', "~"))
}

/// A group's definition as its consumer's description.
fn describe(name: &GroupName, config: &GroupConfig, created_at: Micros) -> String {
    let filter = &config.filter;
    let definition = ConsumerGroupInfo {
        group: name.to_string(),
        event_types: filter.event_types().collect(),
        application_user_ids: filter.application_user_ids().map(str::to_owned).collect(),
        provider_slugs: filter.provider_slugs().map(str::to_owned).collect(),
        ordering: config.ordering.to_proto() as i32,
        ack_wait: Some(prost_types::Duration {
            seconds: config.ack_wait / 1_000_000,
            nanos: ((config.ack_wait % 1_000_000) * 1_000) as i32,
        }),
        created_at: Some(from_micros(created_at)),
        ..ConsumerGroupInfo::default()
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(definition.encode_to_vec());
    format!("{DESCRIPTION_TAG}{encoded}")
}

/// The definition a description holds; `None` for a consumer that is not a group's.
fn definition(description: Option<&str>) -> Option<(GroupName, GroupConfig, Micros)> {
    let encoded = description?.strip_prefix(DESCRIPTION_TAG)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let info = ConsumerGroupInfo::decode(bytes.as_slice()).ok()?;
    let filter = GroupFilter::new(
        &info.event_types,
        info.application_user_ids,
        info.provider_slugs,
    )
    .ok()?;
    let ordering = Ordering::from_proto(info.ordering).ok()?;
    let wait = info
        .ack_wait
        .map_or(0, |d| d.seconds * 1_000_000 + i64::from(d.nanos / 1_000));
    let config = GroupConfig::new(filter, ordering, wait).ok()?;
    let created_at = info.created_at.as_ref().map_or(0, to_micros);
    Some((GroupName::parse(&info.group).ok()?, config, created_at))
}

fn not_found(error: &async_nats::jetstream::context::ConsumerInfoError) -> bool {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as K;
    match error.kind() {
        K::NotFound => true,
        K::JetStream(js) => js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

impl NatsGroups {
    pub fn new(log: Arc<NatsLog>, limits: Limits, shutdown: CancellationToken) -> Self {
        Self {
            stream: log.events_stream(),
            log,
            limits,
            shutdown,
            next_member: AtomicU64::new(1),
            local: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// The group's consumer info, `None` if it does not exist.
    async fn info(&self, group: &GroupName) -> Result<Option<jetstream::consumer::Info>, LogError> {
        match self.stream.consumer_info(consumer_name(group)).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(storage("cannot read a consumer group from NATS", e)),
        }
    }

    /// The consumer of `name` starting at `start`, with `description`.
    async fn create(
        &self,
        name: &GroupName,
        config: &GroupConfig,
        description: String,
        start: Start,
    ) -> Result<(PullConsumer, Option<u64>), JoinError> {
        if description.len() > MAX_DESCRIPTION {
            return Err(GroupError::InvalidFilter(format!(
                "the group's filter is too long to keep in a NATS consumer ({} of {MAX_DESCRIPTION} bytes encoded)",
                description.len()
            ))
            .into());
        }
        let (deliver_policy, position, _) = self.log.deliver_policy(start).await?;
        let consumer = self
            .stream
            .create_consumer(pull::Config {
                durable_name: Some(consumer_name(name)),
                description: Some(description),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_micros(config.ack_wait.unsigned_abs()),
                filter_subject: self.log.subject_for(&config.filter.matcher()),
                max_ack_pending: match config.ordering {
                    Ordering::PerUser => 1,
                    Ordering::Unordered => self.limits.max_waiting.max(1) as i64,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| {
                SubscriptionError::Log(storage("cannot create the group's NATS consumer", e))
            })?;
        Ok((consumer, position))
    }

    /// The group's consumer, created at `open.start` if it does not exist yet; refused if
    /// it exists with another definition.
    async fn consumer_for(&self, open: &Open) -> Result<PullConsumer, JoinError> {
        // Twice: a concurrent open on another replica may create it between the look-up
        // and the create (which then fails, since the starts' configurations differ).
        for _ in 0..2 {
            if let Some(info) = self
                .info(&open.group)
                .await
                .map_err(SubscriptionError::Log)?
            {
                check_open(
                    &open.group,
                    info.config.description.as_deref(),
                    &open.config,
                )?;
                return self.stream.get_consumer(&info.name).await.map_err(|e| {
                    SubscriptionError::Log(storage("cannot open the group's NATS consumer", e))
                        .into()
                });
            }
            let description = describe(&open.group, &open.config, now_micros());
            match self
                .create(&open.group, &open.config, description, open.start)
                .await
            {
                Ok((consumer, _)) => {
                    tracing::info!(group = %open.group, "consumer group created on NATS");
                    return Ok(consumer);
                }
                Err(JoinError::Start(SubscriptionError::Log(_))) => continue,
                Err(other) => return Err(other),
            }
        }
        Err(SubscriptionError::Log(LogError::Storage(
            "the group's NATS consumer could neither be created nor read".to_owned(),
        ))
        .into())
    }

    fn local(&self, group: &GroupName) -> LocalGroup {
        let mut local = self.local.lock().expect("local lock is never poisoned");
        local.entry(group.clone()).or_default().clone()
    }
}

fn check_open(
    group: &GroupName,
    description: Option<&str>,
    requested: &GroupConfig,
) -> Result<(), GroupError> {
    let Some((_, existing, _)) = definition(description) else {
        return Err(GroupError::Mismatch {
            group: group.to_string(),
            difference: "a NATS consumer of that name that the gateway did not create".to_owned(),
        });
    };
    match existing.difference(requested) {
        Some(difference) => Err(GroupError::Mismatch {
            group: group.to_string(),
            difference,
        }),
        None => Ok(()),
    }
}

#[async_trait::async_trait]
impl Groups for NatsGroups {
    async fn join(&self, open: Open) -> Result<Member, JoinError> {
        if self.shutdown.is_cancelled() {
            return Err(JoinError::ShuttingDown);
        }
        let max_in_flight = match open.max_in_flight {
            0 => super::groups::DEFAULT_MAX_IN_FLIGHT.min(self.limits.max_in_flight),
            n if n > self.limits.max_in_flight => {
                return Err(GroupError::MaxInFlightTooLarge {
                    requested: n,
                    limit: self.limits.max_in_flight,
                }
                .into());
            }
            n => n,
        } as usize;
        let consumer = self.consumer_for(&open).await?;
        let id = MemberId::numbered(self.next_member.fetch_add(1, AtomicOrdering::Relaxed));
        // One slot more than the member may hold, for its end message.
        let (out, deliveries) = mpsc::channel(max_in_flight + 1);
        let (answers, answers_in) = mpsc::channel(ANSWER_QUEUE);
        let ended = CancellationToken::new();
        let local = self.local(&open.group);
        local.members.fetch_add(1, AtomicOrdering::Relaxed);
        let task = MemberTask {
            consumer,
            group: open.group.clone(),
            filter: open.config.filter.matcher(),
            max_in_flight,
            held: BTreeMap::new(),
            out,
            answers: answers_in,
            ended: ended.clone(),
            shutdown: self.shutdown.clone(),
            local,
        };
        let handle = tokio::spawn(task.run());
        let mut tasks = self.tasks.lock().expect("tasks lock is never poisoned");
        tasks.retain(|task| !task.is_finished());
        tasks.push(handle);
        Ok(Member::with_own_task(id, answers, deliveries, ended))
    }

    async fn list(&self) -> Result<Vec<GroupRow>, LogError> {
        let mut consumers = self.stream.consumers();
        let mut rows = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| storage("cannot list NATS consumers", e))?;
            if !info.name.starts_with(CONSUMER_PREFIX) {
                continue;
            }
            let Some((name, config, created_at)) = definition(info.config.description.as_deref())
            else {
                continue;
            };
            rows.push(row(name, config, created_at, &info));
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(rows)
    }

    async fn seek(&self, name: &GroupName, start: Start) -> Result<u64, AdminError> {
        let info = self
            .info(name)
            .await?
            .ok_or_else(|| AdminError::NotFound(name.clone()))?;
        let description = info.config.description.clone().unwrap_or_default();
        let Some((_, config, _)) = definition(Some(&description)) else {
            return Err(AdminError::NotFound(name.clone()));
        };
        // Checked before the old consumer goes, so a bad start leaves the group as it was.
        let (_, position, bounds) = self.log.deliver_policy(start).await?;
        self.stream
            .delete_consumer(&info.name)
            .await
            .map_err(|e| storage("cannot delete the group's NATS consumer", e))?;
        let (mut consumer, _) = self
            .create(name, &config, description, start)
            .await
            .map_err(|e| match e {
                JoinError::Start(e) => AdminError::Start(e),
                other => AdminError::Log(LogError::Storage(other.to_string())),
            })?;
        tracing::info!(group = %name, "consumer group's NATS consumer recreated at its new start");
        Ok(match position {
            Some(position) => position,
            // `since`: where JetStream placed the consumer.
            None => consumer
                .info()
                .await
                .map_or(bounds.next, |info| info.delivered.stream_sequence + 1),
        })
    }

    async fn delete(&self, name: &GroupName) -> Result<usize, AdminError> {
        let info = self
            .info(name)
            .await?
            .ok_or_else(|| AdminError::NotFound(name.clone()))?;
        self.stream
            .delete_consumer(&info.name)
            .await
            .map_err(|e| storage("cannot delete the group's NATS consumer", e))?;
        let local = self
            .local
            .lock()
            .expect("local lock is never poisoned")
            .remove(name)
            .unwrap_or_default();
        local.deleted.cancel();
        tracing::info!(group = %name, "consumer group deleted on NATS");
        // Members on other replicas end when their next pull finds the consumer gone.
        Ok(local.members.load(AtomicOrdering::Relaxed))
    }

    async fn erase_user(&self, _user: &str) -> Result<usize, LogError> {
        // The log's erasure purges the user's messages; JetStream skips them (module docs).
        Ok(0)
    }

    async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock is never poisoned"));
        for task in tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "a NATS consumer group member's task failed");
            }
        }
    }
}

/// A group's row from its consumer info. What JetStream does not count is 0 (README).
fn row(
    name: GroupName,
    config: GroupConfig,
    created_at: Micros,
    info: &jetstream::consumer::Info,
) -> GroupRow {
    let in_flight = info.num_ack_pending as u64;
    GroupRow {
        name,
        config,
        created_at,
        stats: GroupStats {
            acked_through: info.ack_floor.stream_sequence,
            pending: info.num_pending + in_flight,
            in_flight,
            // Pull requests the server holds: members (on any replica) waiting with room.
            members: info.num_waiting as u64,
            counters: Counters {
                redeliveries: info.num_redelivered as u64,
                ..Counters::default()
            },
        },
    }
}

/// One member on this replica: pulls, holds, and answers its deliveries.
struct MemberTask {
    consumer: PullConsumer,
    group: GroupName,
    filter: Filter,
    max_in_flight: usize,
    /// The messages delivered to the member and not answered yet, by stream sequence.
    held: BTreeMap<u64, jetstream::Message>,
    /// To the member's stream; room for `max_in_flight` deliveries and the end.
    out: mpsc::Sender<MemberMessage>,
    answers: mpsc::Receiver<Answer>,
    ended: CancellationToken,
    shutdown: CancellationToken,
    local: LocalGroup,
}

/// What ends a member's loop.
enum Stop {
    /// Its stream is gone: nothing to tell it.
    Left,
    End(MemberEnd),
}

impl MemberTask {
    async fn run(mut self) {
        let stop = self.serve().await;
        self.release().await;
        if let Stop::End(why) = stop {
            let _ = self.out.try_send(MemberMessage::End(why));
        }
        self.ended.cancel();
        self.local.members.fetch_sub(1, AtomicOrdering::Relaxed);
        tracing::info!(group = %self.group, "consumer group member left");
    }

    async fn serve(&mut self) -> Stop {
        let mut batch: Option<pull::Batch> = None;
        // A pull whose consumer was deleted (by a seek) may never hear back from the
        // server; the client's own timer is 5 s past `expires`. Give up on it sooner.
        let mut pulled_until = tokio::time::Instant::now();
        loop {
            if batch.is_none() && self.held.len() < self.max_in_flight {
                match self.pull().await {
                    Ok(pulled) => batch = Some(pulled),
                    Err(stop) => return stop,
                }
                pulled_until = tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE;
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Stop::End(MemberEnd::ShuttingDown),
                () = self.local.deleted.cancelled() => return Stop::End(MemberEnd::Deleted),
                () = tokio::time::sleep_until(pulled_until), if batch.is_some() => batch = None,
                answer = self.answers.recv() => match answer {
                    None | Some(Answer::Leave) => return Stop::Left,
                    Some(Answer::Violation(why)) => return Stop::End(MemberEnd::Protocol(why)),
                    Some(answer) => self.answer(answer).await,
                },
                message = next(&mut batch) => match message {
                    Some(Ok(message)) => {
                        if !self.take(message).await {
                            return Stop::Left;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::debug!(group = %self.group, %error, "pull ended");
                        batch = None;
                    }
                    None => batch = None,
                },
            }
        }
    }

    /// A pull for the member's room. A consumer that is gone (deleted by an operator on
    /// any replica) ends the member; other failures are retried after a pause.
    async fn pull(&mut self) -> Result<pull::Batch, Stop> {
        loop {
            let room = self.max_in_flight - self.held.len();
            let error = match self
                .consumer
                .batch()
                .max_messages(room)
                .expires(PULL_EXPIRES)
                .messages()
                .await
            {
                Ok(batch) => return Ok(batch),
                Err(error) => error.to_string(),
            };
            match self.consumer.info().await {
                Err(e) if not_found(&e) => return Err(Stop::End(MemberEnd::Deleted)),
                _ => {
                    tracing::warn!(group = %self.group, %error, "cannot pull from the group's NATS consumer; retrying")
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return Err(Stop::End(MemberEnd::ShuttingDown)),
                () = tokio::time::sleep(PULL_RETRY) => {}
            }
        }
    }

    /// Hands a pulled message to the member; `false` if the member is gone.
    async fn take(&mut self, message: jetstream::Message) -> bool {
        let Ok((sequence, attempt)) = message
            .info()
            .map(|info| (info.stream_sequence, info.delivered))
        else {
            return true;
        };
        let event = match decode(sequence, message.payload.clone()) {
            Ok(event) => event,
            Err(error) => {
                // Undecodable: redelivering it would fail forever.
                tracing::error!(group = %self.group, sequence, %error, "undecodable event terminated");
                self.settle(&message, AckKind::Term).await;
                return true;
            }
        };
        if !self.filter.matches(&event) {
            // Inside the consumer's subject but outside the group's filter: not its work.
            self.settle(&message, AckKind::Ack).await;
            return true;
        }
        let delivery = MemberMessage::Delivery {
            event: Arc::new(event),
            attempt: u32::try_from(attempt).unwrap_or(u32::MAX).max(1),
        };
        self.held.insert(sequence, message);
        // Fits: at most `max_in_flight` are held, and the channel has one more slot.
        self.out.try_send(delivery).is_ok()
    }

    async fn answer(&mut self, answer: Answer) {
        let (sequences, kind) = match answer {
            Answer::Ack(sequences) => (sequences, AckKind::Ack),
            Answer::Term(sequences) => (sequences, AckKind::Term),
            Answer::Nak { sequences, delay } => {
                let delay = (delay > 0).then(|| Duration::from_micros(delay.unsigned_abs()));
                (sequences, AckKind::Nak(delay))
            }
            Answer::Leave | Answer::Violation(_) => return,
        };
        for sequence in sequences {
            // Sequences not held by this member are ignored (SPEC §4.3).
            if let Some(message) = self.held.remove(&sequence) {
                self.settle(&message, kind).await;
            }
        }
    }

    async fn settle(&self, message: &jetstream::Message, kind: AckKind) {
        if let Err(error) = message.ack_with(kind).await {
            // JetStream redelivers after ack_wait: at-least-once holds.
            tracing::warn!(group = %self.group, %error, "cannot answer a NATS delivery");
        }
    }

    /// The member's end: what it held is redelivered at once.
    async fn release(&mut self) {
        for (_, message) in std::mem::take(&mut self.held) {
            self.settle(&message, AckKind::Nak(None)).await;
        }
    }
}

async fn next(
    batch: &mut Option<pull::Batch>,
) -> Option<Result<jetstream::Message, async_nats::Error>> {
    match batch {
        Some(batch) => batch.next().await,
        None => std::future::pending().await,
    }
}
