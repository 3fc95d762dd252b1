//! Consumer groups on NATS (SPEC §4.3, §4.4): a group is a set of JetStream durable pull
//! consumers on the events stream, shared by every replica, so members on different
//! replicas split its work natively and its position lives in JetStream, not in any one
//! gateway.
//!
//! - **The consumers** ([`plan`](mod@plan)): `AckPolicy::Explicit`, `ack_wait` as the group's, the
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
//!     [`PARTITIONS`](crate::events::nats::PARTITIONS) at once. A filter naming users needs only their partitions.
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
//!   is covered by `ack_wait`. `attempt` is the message's delivered count, and at least
//!   one past the attempt the member holds it as when it comes back after `ack_wait`.
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
//!
//! Files: [`plan`](mod@plan) (the consumers of a group and the definition kept in them), [`member`]
//! (a member's pulls and answers), [`tally`] (the counters JetStream does not keep); this
//! file is the [`Groups`] seam: join, list, seek, delete.

mod member;
mod plan;
mod tally;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    stream,
};
use futures_util::{StreamExt, stream::SelectAll};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::plan::MAX_DESCRIPTION;
use self::{
    member::{Feed, MemberTask},
    plan::{CONSUMER_PREFIX, Part, Source, anchor_name, definition, describe, plan},
    tally::{Tally, Tally3},
};
use super::{
    LogError,
    consumers::{AdminError, GroupRow, Groups, JoinError, Member, Open},
    groups::{
        Counters, GroupConfig, GroupError, GroupName, GroupStats, Limits, MemberId, Ordering,
    },
    nats::NatsLog,
    subscription::{Start, SubscriptionError},
    time::{Micros, now_micros},
};

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
