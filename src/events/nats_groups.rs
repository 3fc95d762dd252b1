//! Consumer groups on NATS (SPEC §4.3, §4.4): a group is a set of JetStream durable pull
//! consumers on the events stream, shared by every replica, so members on different
//! replicas split its work natively and its position lives in JetStream, not in any one
//! gateway.
//!
//! - **The consumers** ([`plan`]): `AckPolicy::Explicit`, `ack_wait` as the group's, the
//!   deliver policy from the creating open's start, and a single filter subject each
//!   (nats-server 2.9 takes one) narrowed by the group's filter where it names one type or
//!   one user; the rest of the filter is applied here, and a non-matching event is acked
//!   at once (it is not the group's work).
//!   - unordered: one consumer on `{prefix}.event.{type}.{user}.*`, `max_ack_pending` =
//!     [`Limits::max_waiting`];
//!   - per-user: one consumer per partition (`{prefix}.event.{type}.{user}.p{N}`, see
//!     [`super::nats`]), each with `max_ack_pending` 1. A user's events are all in one
//!     partition, so across every replica one event of a user is unsettled at a time and
//!     they go in stream order; users of different partitions proceed in parallel, up to
//!     [`PARTITIONS`] at once. A filter naming users needs only their partitions.
//!   - legacy: when the stream holds pre-partition (4-token) events from the group's start,
//!     one more consumer on the 4-token form, read **before** the others: every legacy
//!     event precedes every partitioned one (0.1 replicas are stopped before this release
//!     starts), so members pull only from it until it has nothing pending or in flight
//!     (per-user: with `max_ack_pending` 1, so those events go one at a time for the
//!     group), then never again. That keeps first deliveries in order and per-user order
//!     across the change of layout, and delivers each old event once.
//!
//!   The group's *anchor* consumer is named `group_{name}` (`.` written `~`, which a group
//!   name cannot hold), the others `group_{name}@p{N}` / `group_{name}@legacy`; the anchor
//!   is created last and deleted first, so a group whose anchor exists is complete.
//! - **Its definition** (filter, ordering, `ack_wait`, `created_at`) is kept in every one of
//!   its consumers' `description` (2.9 has no consumer metadata), so every replica compares
//!   a later open against the same thing (`FAILED_PRECONDITION` on a difference). A
//!   definition must fit JetStream's description limit ([`MAX_DESCRIPTION`]).
//! - **A member** is a task of its own: it pulls from every consumer of the group with
//!   room (one message at a time from a partition, whose `max_ack_pending` is 1, and never
//!   from one where it holds a message), at most its room in total (`max_in_flight` minus
//!   what it holds and has asked for), rotating over the partitions when its room is
//!   smaller than their number; it holds the messages until their ack, `-NAK` (with its
//!   delay) or `+TERM`, and on its end naks what it still holds without a delay, so
//!   JetStream redelivers them at once to any member. A replica that dies without a word
//!   is covered by `ack_wait`. `attempt` is the message's delivered count.
//! - **Counters JetStream does not keep** ([`Tally`]): `terminated` and `expired` live in a
//!   stream `{stream}_GROUPS` used as a key-value store, one subject per group, updated with
//!   compare-and-set by whichever replica terms (or sees the expiry), so they survive
//!   restarts and are shared. `expired` is counted when the group is listed (an admin call
//!   or a metrics scrape): the stream sequences retention removed between the consumer's
//!   ack floor and the stream's first sequence, counted once; it is exact for an unordered
//!   group without a filter, and not counted (0) for other groups, whose consumers see
//!   only some subjects and cannot tell what the removed sequences held.
//! - **Erasure**: the log deletes the user's messages one by one, and JetStream skips what
//!   is gone, so they leave every group's pending work without anything done here.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    stream,
};
use base64::Engine;
use futures_util::{
    Stream, StreamExt,
    stream::{self as streams, SelectAll},
};
use prost::Message;
use tokio::sync::{OnceCell, mpsc};
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
    nats::{NatsLog, PARTITIONS, decode, partition_of},
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
/// member that gained room (by acking) may wait for a pull sized to it, and how long a
/// member with less room than partitions stays on one set of partitions.
const PULL_EXPIRES: Duration = Duration::from_millis(500);
/// How long past its `expires` a pull may stay unanswered before the member pulls anew.
const PULL_GRACE: Duration = Duration::from_millis(500);
/// Pause after a failed pull before the next (NATS unreachable, a consumer being
/// recreated by a seek): a retry loop would only add load.
const PULL_RETRY: Duration = Duration::from_millis(200);
/// Answers queued per member: the member's client waits (is pushed back on) when full;
/// each costs one publish to NATS, so a small queue suffices.
const ANSWER_QUEUE: usize = 64;
/// Compare-and-set attempts for a counter update before it is given up (logged).
const TALLY_ATTEMPTS: usize = 8;

/// What one of a group's consumers reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Every partition (unordered groups).
    All,
    Partition(u32),
    /// The pre-partition 4-token subjects.
    Legacy,
}

/// One of a group's consumers: its name and what it reads.
#[derive(Debug, Clone)]
struct Source {
    name: String,
    part: Part,
}

/// This replica's side of every group: its members, so an admin call can end them.
pub struct NatsGroups {
    log: Arc<NatsLog>,
    stream: stream::Stream,
    limits: Limits,
    shutdown: CancellationToken,
    next_member: AtomicU64,
    tally: Arc<Tally>,
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

fn anchor_name(group: &GroupName) -> String {
    format!("{CONSUMER_PREFIX}{}", group.as_str().replace('.', "~"))
}

/// The group's consumers, the anchor last (it is created last: see the module docs).
fn plan(group: &GroupName, config: &GroupConfig, legacy: bool) -> Vec<Source> {
    let anchor = anchor_name(group);
    let mut parts: Vec<Part> = match config.ordering {
        Ordering::Unordered => vec![Part::All],
        Ordering::PerUser => {
            let users: Vec<&str> = config.filter.application_user_ids().collect();
            let mut partitions: Vec<u32> = if users.is_empty() {
                (0..PARTITIONS).collect()
            } else {
                users.iter().map(|user| partition_of(user)).collect()
            };
            partitions.sort_unstable();
            partitions.dedup();
            partitions.into_iter().map(Part::Partition).collect()
        }
    };
    // The anchor is the first of them; it goes to the end of the list.
    parts.rotate_left(1);
    let mut sources: Vec<Source> = parts
        .iter()
        .enumerate()
        .map(|(at, &part)| Source {
            name: match part {
                _ if at + 1 == parts.len() => anchor.clone(),
                Part::Partition(n) => format!("{anchor}@p{n}"),
                Part::All | Part::Legacy => unreachable!("one All, no Legacy yet"),
            },
            part,
        })
        .collect();
    if legacy {
        let name = format!("{anchor}@legacy");
        sources.insert(
            0,
            Source {
                name,
                part: Part::Legacy,
            },
        );
    }
    sources
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
            tally: Arc::new(Tally::new(log.clone())),
            log,
            limits,
            shutdown,
            next_member: AtomicU64::new(1),
            local: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// A consumer's info, `None` if it does not exist.
    async fn info(&self, consumer: &str) -> Result<Option<jetstream::consumer::Info>, LogError> {
        match self.stream.consumer_info(consumer).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(storage("cannot read a consumer group from NATS", e)),
        }
    }

    /// The group's consumer configuration for `source`.
    fn consumer_config(
        &self,
        source: &Source,
        config: &GroupConfig,
        description: &str,
        deliver_policy: DeliverPolicy,
    ) -> pull::Config {
        let (kind, user) = NatsLog::tokens_for(&config.filter.matcher())
            .unwrap_or_else(|| ("*".to_owned(), "*".to_owned()));
        let tail = match source.part {
            Part::All => Some("*".to_owned()),
            Part::Partition(n) => Some(format!("p{n}")),
            Part::Legacy => None,
        };
        pull::Config {
            durable_name: Some(source.name.clone()),
            description: Some(description.to_owned()),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_micros(config.ack_wait.unsigned_abs()),
            filter_subject: self.log.event_subject(&kind, &user, tail.as_deref()),
            max_ack_pending: match config.ordering {
                Ordering::PerUser => 1,
                Ordering::Unordered => self.limits.max_waiting.max(1) as i64,
            },
            ..Default::default()
        }
    }

    /// Creates the group's consumers at `start` (the anchor last), accepting any that
    /// already exists with the same definition (a replica creating it concurrently).
    /// Returns the first sequence it reads, when the start names one.
    async fn create(
        &self,
        name: &GroupName,
        config: &GroupConfig,
        description: String,
        start: Start,
    ) -> Result<Option<u64>, JoinError> {
        if description.len() > MAX_DESCRIPTION {
            return Err(GroupError::InvalidFilter(format!(
                "the group's filter is too long to keep in a NATS consumer ({} of {MAX_DESCRIPTION} bytes encoded)",
                description.len()
            ))
            .into());
        }
        let (deliver_policy, position, bounds) = self.log.deliver_policy(start).await?;
        // One start for every consumer: `New` would be each one's own creation moment.
        let deliver_policy = match (deliver_policy, position) {
            (DeliverPolicy::New, Some(start_sequence)) => {
                DeliverPolicy::ByStartSequence { start_sequence }
            }
            (policy, _) => policy,
        };
        let legacy = self
            .log
            .legacy_from(position.unwrap_or(bounds.oldest))
            .await
            .map_err(SubscriptionError::Log)?;
        for source in plan(name, config, legacy) {
            let wanted = self.consumer_config(&source, config, &description, deliver_policy);
            if let Err(error) = self.stream.create_consumer(wanted).await {
                let existing = self
                    .info(&source.name)
                    .await
                    .map_err(SubscriptionError::Log)?;
                let existing = existing.ok_or_else(|| {
                    SubscriptionError::Log(storage(
                        "cannot create the group's NATS consumer",
                        error,
                    ))
                })?;
                check_open(name, existing.config.description.as_deref(), config)?;
            }
        }
        // What retention removed before the group (or its new start) is not its expiry.
        let before = bounds.oldest.saturating_sub(1);
        let counted = self.tally.update(name, |c| {
            let moved = c.expired_through < before;
            c.expired_through = c.expired_through.max(before);
            moved
        });
        if let Err(error) = counted.await {
            tracing::warn!(group = %name, %error, "cannot set the group's counters");
        }
        Ok(position)
    }

    /// The group's consumers, created at `open.start` if it does not exist yet; refused if
    /// it exists with another definition.
    async fn consumers_for(&self, open: &Open) -> Result<Vec<(Source, PullConsumer)>, JoinError> {
        let anchor = self
            .info(&anchor_name(&open.group))
            .await
            .map_err(SubscriptionError::Log)?;
        match anchor {
            Some(info) => check_open(
                &open.group,
                info.config.description.as_deref(),
                &open.config,
            )?,
            None => {
                let description = describe(&open.group, &open.config, now_micros());
                self.create(&open.group, &open.config, description, open.start)
                    .await?;
                tracing::info!(group = %open.group, "consumer group created on NATS");
            }
        }
        Ok(self.resolve(&open.group, &open.config).await?)
    }

    /// Handles on the group's consumers: the planned ones, and the legacy one if it exists.
    async fn resolve(
        &self,
        name: &GroupName,
        config: &GroupConfig,
    ) -> Result<Vec<(Source, PullConsumer)>, SubscriptionError> {
        let mut out = Vec::new();
        for source in plan(name, config, true) {
            if source.part == Part::Legacy && self.info(&source.name).await?.is_none() {
                continue;
            }
            let consumer = self
                .stream
                .get_consumer(&source.name)
                .await
                .map_err(|e| storage("cannot open the group's NATS consumer", e))?;
            out.push((source, consumer));
        }
        Ok(out)
    }

    /// Deletes the group's consumers (the anchor first); `false` if it had none.
    async fn delete_consumers(
        &self,
        name: &GroupName,
        config: &GroupConfig,
    ) -> Result<bool, LogError> {
        let mut sources = plan(name, config, true);
        sources.reverse();
        let mut any = false;
        for source in sources {
            match self.stream.delete_consumer(&source.name).await {
                Ok(_) => any = true,
                Err(e) => {
                    use async_nats::jetstream::stream::ConsumerErrorKind as K;
                    let gone = matches!(e.kind(), K::JetStream(js)
                        if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND);
                    if !gone {
                        return Err(storage("cannot delete the group's NATS consumer", e));
                    }
                }
            }
        }
        Ok(any)
    }

    /// The group's definition and description, from its anchor.
    async fn defined(&self, name: &GroupName) -> Result<(GroupConfig, String), AdminError> {
        let info = self
            .info(&anchor_name(name))
            .await?
            .ok_or_else(|| AdminError::NotFound(name.clone()))?;
        let description = info.config.description.clone().unwrap_or_default();
        let (_, config, _) =
            definition(Some(&description)).ok_or_else(|| AdminError::NotFound(name.clone()))?;
        Ok((config, description))
    }

    /// Through where every event of `consumer`'s subject is settled: up to the first
    /// message of its subject after its ack floor (which is unsettled, by the floor's
    /// definition), or everything the stream holds if there is none.
    async fn settled_through(
        &self,
        consumer: &jetstream::consumer::Info,
        state: &stream::State,
    ) -> Result<u64, LogError> {
        let floor = consumer.ack_floor.stream_sequence;
        if consumer.num_pending == 0 && consumer.num_ack_pending == 0 {
            return Ok(state.last_sequence.max(floor));
        }
        let subject = consumer.config.filter_subject.as_str();
        match self
            .stream
            .direct_get_next_for_subject(subject, Some(floor + 1))
            .await
        {
            Ok(next) => Ok(next.sequence.saturating_sub(1).max(floor)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                Ok(state.last_sequence.max(floor))
            }
            Err(e) => Err(storage("NATS read failed", e)),
        }
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
        let consumers = self.consumers_for(&open).await?;
        let id = MemberId::numbered(self.next_member.fetch_add(1, AtomicOrdering::Relaxed));
        // One slot more than the member may hold, for its end message.
        let (out, deliveries) = mpsc::channel(max_in_flight + 1);
        let (answers, answers_in) = mpsc::channel(ANSWER_QUEUE);
        let ended = CancellationToken::new();
        let local = self.local(&open.group);
        local.members.fetch_add(1, AtomicOrdering::Relaxed);
        let task = MemberTask {
            feeds: consumers.into_iter().map(Feed::new).collect(),
            per_user: open.config.ordering == Ordering::PerUser,
            legacy_drained: false,
            rotation: 0,
            pulls: SelectAll::new(),
            tally: self.tally.clone(),
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
        let mut groups: BTreeMap<GroupName, Listed> = BTreeMap::new();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| storage("cannot list NATS consumers", e))?;
            if !info.name.starts_with(CONSUMER_PREFIX) {
                continue;
            }
            let Some((name, config, created_at)) = definition(info.config.description.as_deref())
            else {
                continue;
            };
            let listed = groups.entry(name).or_insert_with(|| Listed {
                config,
                created_at,
                consumers: Vec::new(),
            });
            listed.consumers.push(info);
        }
        let state = self.stream.cached_info().state.clone();
        let mut stream = self.stream.clone();
        let state = stream.info().await.map_or(state, |info| info.state.clone());
        let mut rows = Vec::with_capacity(groups.len());
        for (name, listed) in groups {
            let counts = self.tally.observe(&name, &listed, &state).await;
            let mut settled = Vec::with_capacity(listed.consumers.len());
            for consumer in &listed.consumers {
                settled.push(self.settled_through(consumer, &state).await?);
            }
            let acked_through = settled.into_iter().min().unwrap_or(0);
            rows.push(row(name, listed, acked_through, counts));
        }
        Ok(rows)
    }

    async fn seek(&self, name: &GroupName, start: Start) -> Result<u64, AdminError> {
        let (config, description) = self.defined(name).await?;
        // Checked before the old consumers go, so a bad start leaves the group as it was.
        let (_, position, bounds) = self.log.deliver_policy(start).await?;
        self.delete_consumers(name, &config).await?;
        self.create(name, &config, description, start)
            .await
            .map_err(|e| match e {
                JoinError::Start(e) => AdminError::Start(e),
                other => AdminError::Log(LogError::Storage(other.to_string())),
            })?;
        tracing::info!(group = %name, "consumer group's NATS consumers recreated at its new start");
        Ok(match position {
            Some(position) => position,
            // `since`: where JetStream placed the anchor.
            None => self
                .info(&anchor_name(name))
                .await
                .ok()
                .flatten()
                .map_or(bounds.next, |info| info.delivered.stream_sequence + 1),
        })
    }

    async fn delete(&self, name: &GroupName) -> Result<usize, AdminError> {
        let (config, _) = self.defined(name).await?;
        if !self.delete_consumers(name, &config).await? {
            return Err(AdminError::NotFound(name.clone()));
        }
        self.tally.forget(name).await;
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
        // The log's erasure deletes the user's messages; JetStream skips them (module docs).
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

/// One group as listed: its definition and its consumers' infos.
struct Listed {
    config: GroupConfig,
    created_at: Micros,
    consumers: Vec<jetstream::consumer::Info>,
}

impl Listed {
    /// Where retention's removals are countable: the consumer of an unordered group
    /// without a filter, which reads every (partitioned) event; none while a legacy
    /// consumer exists, which splits the stream's sequences between two consumers.
    fn counts_expiry(&self) -> Option<&jetstream::consumer::Info> {
        let takes_all = self.config.ordering == Ordering::Unordered
            && self.config.filter.event_types().next().is_none()
            && self.config.filter.application_user_ids().next().is_none()
            && self.config.filter.provider_slugs().next().is_none();
        match self.consumers.as_slice() {
            [only] if takes_all => Some(only),
            _ => None,
        }
    }
}

/// A group's row from its consumers' infos (README, "On NATS").
fn row(name: GroupName, listed: Listed, acked_through: u64, counts: Tally3) -> GroupRow {
    let consumers = &listed.consumers;
    let in_flight: u64 = consumers.iter().map(|c| c.num_ack_pending as u64).sum();
    let unsettled: u64 = consumers.iter().map(|c| c.num_pending).sum();
    // Every matching event up to it is settled: a consumer with nothing pending or in
    // flight has settled everything the stream holds.
    GroupRow {
        name,
        config: listed.config,
        created_at: listed.created_at,
        stats: GroupStats {
            acked_through,
            pending: unsettled + in_flight,
            in_flight,
            // Pull requests the server holds: members (on any replica) waiting with room.
            // A member pulls from several consumers at once, so the largest count.
            members: consumers
                .iter()
                .map(|c| c.num_waiting as u64)
                .max()
                .unwrap_or(0),
            counters: Counters {
                redeliveries: consumers.iter().map(|c| c.num_redelivered as u64).sum(),
                terminated: counts.terminated,
                expired: counts.expired,
                ..Counters::default()
            },
        },
    }
}

/// A group's counters in its key-value entry: terminated, expired, and the stream
/// sequence through which removals were counted as expired (so none is counted twice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally3 {
    terminated: u64,
    expired: u64,
    expired_through: u64,
}

impl Tally3 {
    fn encode(self) -> bytes::Bytes {
        let mut out = Vec::with_capacity(24);
        for value in [self.terminated, self.expired, self.expired_through] {
            out.extend_from_slice(&value.to_be_bytes());
        }
        out.into()
    }

    /// An entry of another length (none is written) counts as empty.
    fn decode(bytes: &[u8]) -> Self {
        let word = |at: usize| {
            bytes
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes)
        };
        if bytes.len() != 24 {
            return Self::default();
        }
        Self {
            terminated: word(0),
            expired: word(8),
            expired_through: word(16),
        }
    }
}

/// The groups' `terminated` and `expired` counters in the `{stream}_GROUPS` stream, one
/// subject per group holding its latest value (`max_messages_per_subject` 1), shared by
/// every replica (module docs). A key-value bucket by hand: async-nats's own KV creation
/// sends a configuration nats-server 2.9 does not answer in a form the client reads.
struct Tally {
    log: Arc<NatsLog>,
    /// Opened (or created) on first use, then shared by every member and admin call.
    bucket: OnceCell<stream::Stream>,
}

impl Tally {
    fn new(log: Arc<NatsLog>) -> Self {
        Self {
            log,
            bucket: OnceCell::new(),
        }
    }

    /// The group's counter subject: `{prefix}.groups.{name}`, `.` written `~` (which a
    /// group name cannot hold), so one group is one token.
    fn subject(&self, group: &GroupName) -> String {
        let prefix = &self.log.jetstream().1.subject_prefix;
        format!("{prefix}.groups.{}", group.as_str().replace('.', "~"))
    }

    async fn bucket(&self) -> Result<&stream::Stream, LogError> {
        self.bucket
            .get_or_try_init(|| async {
                let (jetstream, settings) = self.log.jetstream();
                jetstream
                    .get_or_create_stream(stream::Config {
                        name: format!("{}_GROUPS", settings.stream),
                        description: Some("spike-gateway consumer group counters".to_owned()),
                        subjects: vec![format!("{}.groups.>", settings.subject_prefix)],
                        max_messages_per_subject: 1,
                        storage: stream::StorageType::File,
                        allow_direct: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| storage("cannot open the groups' counters", e))
            })
            .await
    }

    /// Applies `change` to the group's counters with compare-and-set (the publish expects
    /// the subject's last sequence it read); `change` returns `false` when there is
    /// nothing to write. Returns the counters as they now are.
    async fn update(
        &self,
        group: &GroupName,
        change: impl Fn(&mut Tally3) -> bool,
    ) -> Result<Tally3, LogError> {
        let bucket = self.bucket().await?;
        let subject = self.subject(group);
        for _ in 0..TALLY_ATTEMPTS {
            let (mut counts, revision) =
                match bucket.direct_get_last_for_subject(subject.as_str()).await {
                    Ok(message) => (Tally3::decode(&message.payload), message.sequence),
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                        (Tally3::default(), 0)
                    }
                    Err(e) => return Err(storage("cannot read a group's counters", e)),
                };
            if !change(&mut counts) {
                return Ok(counts);
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                revision.to_string().as_str(),
            );
            let (jetstream, _) = self.log.jetstream();
            let published = jetstream
                .publish_with_headers(subject.clone(), headers, counts.encode())
                .await;
            // A refused publish: another replica wrote first; read again.
            if let Ok(ack) = published
                && ack.await.is_ok()
            {
                return Ok(counts);
            }
        }
        Err(LogError::Storage(format!(
            "a group's counters changed {TALLY_ATTEMPTS} times under one update"
        )))
    }

    /// Counts `n` terms; a failure is logged (the count is then short by `n`).
    async fn terminated(&self, group: &GroupName, n: u64) {
        if let Err(error) = self
            .update(group, |c| {
                c.terminated += n;
                true
            })
            .await
        {
            tracing::warn!(%group, %error, "terminated events not counted");
        }
    }

    /// The group's counters, first counting as expired what retention removed before
    /// the group settled it (where countable: [`Listed::counts_expiry`]).
    async fn observe(&self, group: &GroupName, listed: &Listed, state: &stream::State) -> Tally3 {
        let removed_through = state.first_sequence.saturating_sub(1);
        let floor = listed.counts_expiry().map(|c| c.ack_floor.stream_sequence);
        let counted = self
            .update(group, |c| match floor {
                Some(floor) if removed_through > floor.max(c.expired_through) => {
                    c.expired += removed_through - floor.max(c.expired_through);
                    c.expired_through = removed_through;
                    true
                }
                _ => false,
            })
            .await;
        counted.unwrap_or_else(|error| {
            tracing::warn!(%group, %error, "cannot read a group's counters");
            Tally3::default()
        })
    }

    /// A deleted group's counters go with it.
    async fn forget(&self, group: &GroupName) {
        let purged = match self.bucket().await {
            // A filtered purge of the counters' own stream: no consumer reads it.
            Ok(bucket) => bucket
                .purge()
                .filter(self.subject(group))
                .await
                .map(|_| ())
                .map_err(|e| storage("cannot delete a group's counters", e)),
            Err(e) => Err(e),
        };
        if let Err(error) = purged {
            tracing::warn!(%group, %error, "a deleted group's counters stay");
        }
    }
}

/// One pull's messages, tagged with its feed; `None` once the pull is over.
type Pulled = Pin<Box<dyn Stream<Item = (usize, Option<PullItem>)> + Send>>;
type PullItem = Result<jetstream::Message, async_nats::Error>;

/// One of the group's consumers as a member reads it.
struct Feed {
    consumer: PullConsumer,
    part: Part,
    /// Whether a pull of it is open: one at a time, so `asked` is that pull's.
    pulling: bool,
    /// Messages asked for by its open pull and not received yet.
    asked: usize,
    /// Whether its open pull brought anything (for the legacy consumer's drain check).
    brought: bool,
    /// Messages from it the member holds.
    held: usize,
}

impl Feed {
    fn new((source, consumer): (Source, PullConsumer)) -> Self {
        Self {
            consumer,
            part: source.part,
            pulling: false,
            asked: 0,
            brought: false,
            held: 0,
        }
    }
}

/// One member on this replica: pulls, holds, and answers its deliveries.
struct MemberTask {
    feeds: Vec<Feed>,
    per_user: bool,
    /// The legacy consumer (if any) has nothing pending or in flight: read the others.
    legacy_drained: bool,
    /// Where the next round of pulls starts among the feeds, so a member with less room
    /// than partitions reaches every one in turn.
    rotation: usize,
    /// The open pulls, one per feed at most.
    pulls: SelectAll<Pulled>,
    tally: Arc<Tally>,
    group: GroupName,
    filter: Filter,
    max_in_flight: usize,
    /// The messages delivered to the member and not answered yet, by stream sequence,
    /// with the feed each came from.
    held: BTreeMap<u64, (jetstream::Message, usize)>,
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
        loop {
            if let Err(stop) = self.pull_more().await {
                return stop;
            }
            let pulling = !self.pulls.is_empty();
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Stop::End(MemberEnd::ShuttingDown),
                () = self.local.deleted.cancelled() => return Stop::End(MemberEnd::Deleted),
                answer = self.answers.recv() => match answer {
                    None | Some(Answer::Leave) => return Stop::Left,
                    Some(Answer::Violation(why)) => return Stop::End(MemberEnd::Protocol(why)),
                    Some(answer) => self.answer(answer).await,
                },
                item = self.pulls.next(), if pulling => match item {
                    Some((feed, Some(Ok(message)))) => {
                        let feed_state = &mut self.feeds[feed];
                        feed_state.asked = feed_state.asked.saturating_sub(1);
                        feed_state.brought = true;
                        if !self.take(message, feed).await {
                            return Stop::Left;
                        }
                    }
                    Some((_, Some(Err(error)))) => {
                        tracing::debug!(group = %self.group, %error, "pull failed");
                    }
                    Some((feed, None)) => self.pull_over(feed).await,
                    None => {}
                },
            }
        }
    }

    /// The feeds to pull from now: the legacy one alone until it is drained; after that,
    /// per-user, never again (everything in it is settled), unordered, with the others
    /// (what it redelivers after a nak or `ack_wait` comes from it).
    fn readable(&self) -> Vec<usize> {
        let legacy = self.feeds.iter().position(|f| f.part == Part::Legacy);
        match legacy {
            Some(at) if !self.legacy_drained => vec![at],
            _ => (0..self.feeds.len())
                .filter(|&at| !self.per_user || self.feeds[at].part != Part::Legacy)
                .collect(),
        }
    }

    /// Whether a pull of `feed` asks for as many as there is room (else for one: a
    /// per-user consumer has one message in flight at most).
    fn batched(&self, feed: usize) -> bool {
        match self.feeds[feed].part {
            Part::All => true,
            Part::Legacy => !self.per_user,
            Part::Partition(_) => false,
        }
    }

    /// Opens pulls on the readable feeds that have none, within the member's room.
    async fn pull_more(&mut self) -> Result<(), Stop> {
        let readable = self.readable();
        let count = readable.len();
        let mut candidates: Vec<usize> = (0..count)
            .map(|k| readable[(self.rotation + k) % count])
            .filter(|&at| !self.feeds[at].pulling)
            .collect();
        // A partition whose message the member holds delivers nothing until it is
        // answered (max_ack_pending 1), so it goes last; it is still pulled when there is
        // room, since a seek may have recreated its consumer and its message is forgotten.
        candidates.sort_by_key(|&at| !self.batched(at) && self.feeds[at].held > 0);
        let asked: usize = self.feeds.iter().map(|f| f.asked).sum();
        let mut room = self.max_in_flight.saturating_sub(self.held.len() + asked);
        if room == 0 || candidates.is_empty() {
            return Ok(());
        }
        if room < candidates.len() {
            with_work_first(&self.feeds, &mut candidates).await;
        }
        for at in candidates {
            if room == 0 {
                break;
            }
            let want = if self.batched(at) { room } else { 1 };
            let batch = self.pull(at, want).await?;
            let feed = &mut self.feeds[at];
            feed.pulling = true;
            feed.asked = want;
            feed.brought = false;
            room -= want;
            let deadline = tokio::time::sleep(PULL_EXPIRES + PULL_GRACE);
            // A pull whose consumer was deleted (by a seek) may never hear back from the
            // server; the client's own timer is 5 s past `expires`. Give up on it sooner.
            let tagged = batch
                .take_until(deadline)
                .map(move |item| (at, Some(item)))
                .chain(streams::once(async move { (at, None) }));
            self.pulls.push(Box::pin(tagged));
        }
        self.rotation = self.rotation.wrapping_add(1);
        Ok(())
    }

    /// A pull on `feed` ended: its room is free again; the legacy consumer is drained once
    /// a pull of it brings nothing and it has nothing left to deliver (per-user: and
    /// nothing in flight, so no user's older event is unsettled).
    async fn pull_over(&mut self, feed: usize) {
        let state = &mut self.feeds[feed];
        state.pulling = false;
        state.asked = 0;
        if state.part != Part::Legacy || state.brought || self.legacy_drained {
            return;
        }
        if let Ok(info) = state.consumer.info().await
            && info.num_pending == 0
            && (info.num_ack_pending == 0 || !self.per_user)
        {
            tracing::info!(group = %self.group, "the group's pre-partition events are settled");
            self.legacy_drained = true;
        }
    }

    /// A pull of `want` messages from `feed`. A consumer that is gone (deleted by an
    /// operator on any replica) ends the member; other failures are retried after a pause.
    async fn pull(&mut self, feed: usize, want: usize) -> Result<pull::Batch, Stop> {
        loop {
            let consumer = &mut self.feeds[feed].consumer;
            let error = match consumer
                .batch()
                .max_messages(want)
                .expires(PULL_EXPIRES)
                .messages()
                .await
            {
                Ok(batch) => return Ok(batch),
                Err(error) => error.to_string(),
            };
            match consumer.info().await {
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
    async fn take(&mut self, message: jetstream::Message, feed: usize) -> bool {
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
                settle(&self.group, &message, AckKind::Term).await;
                self.tally.terminated(&self.group, 1).await;
                return true;
            }
        };
        if !self.filter.matches(&event) {
            // Inside the consumer's subject but outside the group's filter: not its work.
            settle(&self.group, &message, AckKind::Ack).await;
            return true;
        }
        let delivery = MemberMessage::Delivery {
            event: Arc::new(event),
            attempt: u32::try_from(attempt).unwrap_or(u32::MAX).max(1),
        };
        if let Some((_, before)) = self.held.insert(sequence, (message, feed)) {
            // Redelivered while held (its ack_wait passed): counted once.
            self.feeds[before].held -= 1;
        }
        self.feeds[feed].held += 1;
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
        let mut settled = 0;
        for sequence in sequences {
            // Sequences not held by this member are ignored (SPEC §4.3).
            if let Some((message, feed)) = self.held.remove(&sequence) {
                self.feeds[feed].held -= 1;
                settle(&self.group, &message, kind).await;
                settled += 1;
            }
        }
        if matches!(kind, AckKind::Term) && settled > 0 {
            self.tally.terminated(&self.group, settled).await;
        }
    }

    /// The member's end: what it held is redelivered at once.
    async fn release(&mut self) {
        for (_, (message, _)) in std::mem::take(&mut self.held) {
            settle(&self.group, &message, AckKind::Nak(None)).await;
        }
    }
}

async fn settle(group: &GroupName, message: &jetstream::Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        // JetStream redelivers after ack_wait: at-least-once holds.
        tracing::warn!(%group, %error, "cannot answer a NATS delivery");
    }
}

/// With less room than partitions to pull from, those with a message ready (pending,
/// none in flight) go first, so a small member finds work within one pull instead of
/// one rotation: one consumer-info request per candidate.
async fn with_work_first(feeds: &[Feed], candidates: &mut [usize]) {
    let ready = futures_util::future::join_all(candidates.iter().map(|&at| async move {
        let info = feeds[at].consumer.get_info().await;
        info.is_ok_and(|info| info.num_pending > 0 && info.num_ack_pending == 0)
    }))
    .await;
    let ready: std::collections::HashSet<usize> = candidates
        .iter()
        .zip(ready)
        .filter_map(|(&at, ready)| ready.then_some(at))
        .collect();
    // Stable: the rotation's order among equals is kept.
    candidates.sort_by_key(|at| !ready.contains(at));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(users: &[&str], ordering: Ordering) -> GroupConfig {
        let users = users.iter().map(|u| (*u).to_owned()).collect();
        GroupConfig::new(GroupFilter::new(&[], users, vec![]).unwrap(), ordering, 0).unwrap()
    }

    #[test]
    fn a_per_user_group_has_one_consumer_per_partition_and_its_anchor_last() {
        let name = GroupName::parse("a.b").unwrap();
        let sources = plan(&name, &config(&[], Ordering::PerUser), true);
        assert_eq!(sources.len(), PARTITIONS as usize + 1);
        assert_eq!(
            (sources[0].name.as_str(), sources[0].part),
            ("group_a~b@legacy", Part::Legacy)
        );
        let last = sources.last().unwrap();
        assert_eq!(
            (last.name.as_str(), last.part),
            ("group_a~b", Part::Partition(0))
        );
        assert_eq!(sources[1].name, "group_a~b@p1");
        let names: std::collections::HashSet<_> = sources.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), sources.len());

        let one = plan(&name, &config(&["u"], Ordering::PerUser), false);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].part, Part::Partition(partition_of("u")));
        assert_eq!(one[0].name, "group_a~b");
        let unordered = plan(&name, &config(&["u"], Ordering::Unordered), false);
        assert_eq!(
            (
                unordered[0].name.as_str(),
                unordered[0].part,
                unordered.len()
            ),
            ("group_a~b", Part::All, 1)
        );
    }

    #[test]
    fn counters_round_trip() {
        let counts = Tally3 {
            terminated: 3,
            expired: u64::MAX,
            expired_through: 7,
        };
        assert_eq!(Tally3::decode(&counts.encode()), counts);
        assert_eq!(Tally3::decode(b"short"), Tally3::default());
    }
}
