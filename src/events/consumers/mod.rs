//! The consumer-group service of the local backends (`memory`, `embedded`): one task per
//! group drives its [`Group`] state machine over the log, as the design note of
//! [`super::groups`] describes.
//!
//! A group's task owns its `Group`, so no lock is held across I/O: members and admin
//! calls talk to it over one bounded command channel, and it hands each member its
//! deliveries over a bounded channel of its own. It follows the log from the group's read
//! cursor with the sources `Subscribe`'s cursor uses ([`LocalLog::read`], woken by
//! [`LocalLog::live`]), and its timer is [`Group::next_wakeup`]. On shutdown every member
//! ends with [`MemberEnd::ShuttingDown`] and what it held returns to the group.
//!
//! Batching, for the cost per acknowledged delivery: a member's stream merges the acks it
//! has already received into one answer, the task applies every command queued before it
//! hands out deliveries (so one pass over the members serves a burst of acks, and each
//! member's deliveries go out together), a group behind the log reads its next page while
//! it delivers the current one, and the state is saved at most once per [`SAVE_EVERY`].

mod driver;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use driver::Driver;

use super::{
    CommittedEvent, LocalLog, LogError,
    groups::{Group, GroupConfig, GroupError, GroupName, GroupStats, Limits, MemberId},
    subscription::{CATCH_UP_PAGE, Start, SubscriptionError, first_position},
    time::{Micros, now_micros},
};

/// Commands queued per group. Members wait (and so push back on their client) when it is
/// full; a group's task handles a command in microseconds, so a small queue suffices.
const COMMAND_QUEUE: usize = 256;

/// How long a group's changes wait before its snapshot is saved: batches a busy group's
/// acks into one small write a second, which is also what a crash can lose (those acks
/// are redelivered; nothing unacked is skipped, SPEC §4.3).
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a group waits to read the log again after a read failed: the store is
/// recovering (webhooks get 503 meanwhile), and a retry loop would only add load.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a member's stream ended from the gateway's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEnd {
    /// The gateway is shutting down (`UNAVAILABLE`).
    ShuttingDown,
    /// An operator deleted the group (`FAILED_PRECONDITION`).
    Deleted,
    /// The member broke the stream's protocol (`INVALID_ARGUMENT`).
    Protocol(String),
}

/// One event handed to a member, and which attempt this is.
#[derive(Debug)]
pub struct Handed {
    pub event: Arc<CommittedEvent>,
    pub attempt: u32,
}

/// What a member receives.
#[derive(Debug)]
pub enum MemberMessage {
    /// At least one delivery, to go out in this order. A group's task hands a member
    /// everything one of its rounds gave it as one message: one channel operation and
    /// one wake-up of the member's stream per round, not per event.
    Deliveries(Vec<Handed>),
    /// The last message: the member is out of the group.
    End(MemberEnd),
}

/// Why an open could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(transparent)]
    Start(#[from] SubscriptionError),
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

/// A member's `open`, validated.
#[derive(Debug, Clone)]
pub struct Open {
    pub group: GroupName,
    pub config: GroupConfig,
    /// Applies only when this open creates the group.
    pub start: Start,
    /// 0 = the default.
    pub max_in_flight: u32,
}

/// A joined member's side: it sends its answers through it, and watches `ended` to stop
/// reading its client once the group let it go.
pub struct Member {
    pub id: MemberId,
    sink: Sink,
    pub deliveries: mpsc::Receiver<MemberMessage>,
    pub ended: CancellationToken,
}

/// Where a member's answers go: its group's task here, or (NATS) the member's own task.
#[derive(Clone)]
enum Sink {
    Group(mpsc::Sender<Command>),
    Own(mpsc::Sender<Answer>),
}

/// A member's answers and its end, for [`MemberHandle::send`].
#[derive(Debug)]
pub enum Answer {
    Ack(Vec<u64>),
    Nak {
        sequences: Vec<u64>,
        delay: Micros,
    },
    Term(Vec<u64>),
    /// The member broke the protocol: it ends with this reason.
    Violation(String),
    /// Its stream ended (the client went away or closed its side).
    Leave,
}

/// The sending half of a [`Member`], for the task that reads the member's client.
#[derive(Clone)]
pub struct MemberHandle {
    id: MemberId,
    sink: Sink,
}

impl MemberHandle {
    /// Passes an answer to the group; `false` when the group is gone.
    pub async fn send(&self, answer: Answer) -> bool {
        let member = self.id;
        match &self.sink {
            Sink::Group(commands) => commands
                .send(Command::Answer { member, answer })
                .await
                .is_ok(),
            Sink::Own(answers) => answers.send(answer).await.is_ok(),
        }
    }
}

impl Member {
    /// A member whose answers go to a task of its own (the NATS backend's).
    pub(super) fn with_own_task(
        id: MemberId,
        answers: mpsc::Sender<Answer>,
        deliveries: mpsc::Receiver<MemberMessage>,
        ended: CancellationToken,
    ) -> Self {
        Self {
            id,
            sink: Sink::Own(answers),
            deliveries,
            ended,
        }
    }

    /// Splits off the handle for the answers, keeping the deliveries here.
    pub fn handle(&self) -> MemberHandle {
        MemberHandle {
            id: self.id,
            sink: self.sink.clone(),
        }
    }
}

enum Command {
    Join {
        open: Open,
        reply: oneshot::Sender<Result<Member, JoinError>>,
    },
    /// The group's row, and where to count its unread matching events from.
    Describe {
        reply: oneshot::Sender<(GroupRow, u64)>,
    },
    Seek {
        position: u64,
        reply: oneshot::Sender<()>,
    },
    /// Ends the members, deletes the saved state, and ends the task.
    Delete {
        reply: oneshot::Sender<Result<usize, LogError>>,
    },
    EraseUser {
        user: Arc<str>,
        reply: oneshot::Sender<usize>,
    },
    Answer {
        member: MemberId,
        answer: Answer,
    },
}

/// One group as `ListConsumerGroups` shows it.
#[derive(Debug, Clone)]
pub struct GroupRow {
    pub name: GroupName,
    pub config: GroupConfig,
    pub created_at: Micros,
    /// With `pending` counting the matching events not read yet (see [`ConsumerGroups::list`]).
    pub stats: GroupStats,
}

/// Why an admin call on a group failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("consumer group {0} does not exist")]
    NotFound(GroupName),
    #[error(transparent)]
    Start(#[from] SubscriptionError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The consumer-group service `Consume` and the group admin RPCs call: [`ConsumerGroups`]
/// over a local log, [`super::nats_groups::NatsGroups`] over JetStream. The gRPC layer
/// validates and maps errors once, for both.
#[async_trait::async_trait]
pub trait Groups: Send + Sync {
    /// Joins `open.group`, creating it (at `open.start`) if it does not exist.
    async fn join(&self, open: Open) -> Result<Member, JoinError>;
    /// Every group, in name order (`ListConsumerGroups`).
    async fn list(&self) -> Result<Vec<GroupRow>, LogError>;
    /// `SeekConsumerGroup`: returns the first sequence the group reads next.
    async fn seek(&self, name: &GroupName, start: Start) -> Result<u64, AdminError>;
    /// `DeleteConsumerGroup`: returns how many members (of this gateway) were ended.
    async fn delete(&self, name: &GroupName) -> Result<usize, AdminError>;
    /// Erasure: the user's events leave every group's unsettled work. Returns how many
    /// this service dropped itself (a backend whose log erasure removes them says 0).
    async fn erase_user(&self, user: &str) -> Result<usize, LogError>;
    /// Waits until every member and group task has ended (they end on shutdown).
    async fn stopped(&self);
}

#[async_trait::async_trait]
impl Groups for ConsumerGroups {
    async fn join(&self, open: Open) -> Result<Member, JoinError> {
        ConsumerGroups::join(self, open).await
    }
    async fn list(&self) -> Result<Vec<GroupRow>, LogError> {
        ConsumerGroups::list(self).await
    }
    async fn seek(&self, name: &GroupName, start: Start) -> Result<u64, AdminError> {
        ConsumerGroups::seek(self, name, start).await
    }
    async fn delete(&self, name: &GroupName) -> Result<usize, AdminError> {
        ConsumerGroups::delete(self, name).await
    }
    async fn erase_user(&self, user: &str) -> Result<usize, LogError> {
        ConsumerGroups::erase_user(self, user).await
    }
    async fn stopped(&self) {
        ConsumerGroups::stopped(self).await;
    }
}

/// Every consumer group of one local log.
pub struct ConsumerGroups {
    log: Arc<dyn LocalLog>,
    limits: Limits,
    shutdown: CancellationToken,
    /// Each group's command queue, by name. A std mutex: held only to look up or insert,
    /// never across an await.
    groups: Mutex<HashMap<GroupName, mpsc::Sender<Command>>>,
    /// The groups' tasks, so shutdown can wait for them to save their state. A std mutex:
    /// held only to push or take, never across an await.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set once the saved groups are running again (on the first call that needs them).
    restored: tokio::sync::OnceCell<()>,
}

impl ConsumerGroups {
    pub fn new(log: Arc<dyn LocalLog>, limits: Limits, shutdown: CancellationToken) -> Self {
        Self {
            log,
            limits,
            shutdown,
            groups: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            restored: tokio::sync::OnceCell::new(),
        }
    }

    /// Restarts the groups the log saved, once. Lazily, on the first call that needs
    /// them, so a store that cannot be read now is retried by the next call instead of
    /// serving without its groups (which would restart them from their opens' starts).
    async fn restore(&self) -> Result<(), LogError> {
        self.restored
            .get_or_try_init(|| async {
                for snapshot in self.log.load_consumer_groups().await? {
                    let group = Group::restore(&snapshot, self.limits).map_err(|e| {
                        LogError::Storage(format!(
                            "a consumer group's saved state is unreadable: {e}"
                        ))
                    })?;
                    tracing::info!(group = %group.name(), "consumer group restored");
                    let mut groups = self.groups.lock().expect("groups lock is never poisoned");
                    self.spawn(&mut groups, group, false);
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Starts `group`'s task and registers it in `groups` (the caller's guard, so two
    /// opens of a new group cannot both start it).
    fn spawn(
        &self,
        groups: &mut HashMap<GroupName, mpsc::Sender<Command>>,
        group: Group,
        fresh: bool,
    ) -> mpsc::Sender<Command> {
        let name = group.name().clone();
        // Subscribed before the task's first read, so no append after it is missed.
        let live = self.log.live();
        let (commands, queue) = mpsc::channel(COMMAND_QUEUE);
        let driver = Driver::new(group, fresh, self.log.clone(), commands.clone());
        let task = tokio::spawn(driver.run(queue, live, self.shutdown.clone()));
        let mut tasks = self.tasks.lock().expect("tasks lock is never poisoned");
        // Deleted groups' tasks have ended: forget them, so the list stays one per group.
        tasks.retain(|task| !task.is_finished());
        tasks.push(task);
        groups.insert(name, commands.clone());
        commands
    }

    /// Waits until every group's task has ended (they end on shutdown).
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock is never poisoned"));
        for task in tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "a consumer group's task failed");
            }
        }
    }

    fn lookup(&self, name: &GroupName) -> Option<mpsc::Sender<Command>> {
        let groups = self.groups.lock().expect("groups lock is never poisoned");
        groups.get(name).filter(|g| !g.is_closed()).cloned()
    }

    /// Joins `open.group`, creating it (at `open.start`) if it does not exist.
    pub async fn join(&self, open: Open) -> Result<Member, JoinError> {
        if self.shutdown.is_cancelled() {
            return Err(JoinError::ShuttingDown);
        }
        self.restore().await.map_err(SubscriptionError::Log)?;
        let commands = match self.lookup(&open.group) {
            Some(commands) => commands,
            None => self.create(&open).await?,
        };
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::Join { open, reply })
            .await
            .map_err(|_| JoinError::ShuttingDown)?;
        answer.await.map_err(|_| JoinError::ShuttingDown)?
    }

    /// Starts the group's task, unless a concurrent open started it first.
    async fn create(&self, open: &Open) -> Result<mpsc::Sender<Command>, JoinError> {
        let position = resolve_start(self.log.as_ref(), open.start).await?;
        let mut groups = self.groups.lock().expect("groups lock is never poisoned");
        if let Some(existing) = groups.get(&open.group).filter(|g| !g.is_closed()) {
            return Ok(existing.clone());
        }
        let group = Group::create(
            open.group.clone(),
            open.config.clone(),
            now_micros(),
            position,
            self.limits,
        );
        Ok(self.spawn(&mut groups, group, true))
    }
}

impl ConsumerGroups {
    fn all(&self) -> Vec<mpsc::Sender<Command>> {
        let groups = self.groups.lock().expect("groups lock is never poisoned");
        groups.values().cloned().collect()
    }

    /// Every group, in name order. `pending` includes the matching events a group has
    /// not read yet, counted by reading the log from where it stopped (an admin call's
    /// cost, proportional to how far behind the group is).
    pub async fn list(&self) -> Result<Vec<GroupRow>, LogError> {
        self.restore().await?;
        let mut rows = Vec::new();
        for commands in self.all() {
            let (reply, answer) = oneshot::channel();
            if commands.send(Command::Describe { reply }).await.is_err() {
                continue; // deleted meanwhile
            }
            let Ok((mut row, unread_from)) = answer.await else {
                continue;
            };
            row.stats.pending += self.count_matching(&row.config, unread_from).await?;
            rows.push(row);
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(rows)
    }

    async fn count_matching(&self, config: &GroupConfig, from: u64) -> Result<u64, LogError> {
        let filter = config.filter.matcher();
        let (mut next, mut count) = (from, 0);
        loop {
            let page = self.log.read(next, CATCH_UP_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(count);
            };
            next = last.sequence() + 1;
            count += page.iter().filter(|e| filter.matches(e)).count() as u64;
        }
    }

    fn existing(&self, name: &GroupName) -> Result<mpsc::Sender<Command>, AdminError> {
        self.lookup(name)
            .ok_or_else(|| AdminError::NotFound(name.clone()))
    }

    /// `SeekConsumerGroup`: returns the first sequence the group reads next.
    pub async fn seek(&self, name: &GroupName, start: Start) -> Result<u64, AdminError> {
        self.restore().await?;
        let commands = self.existing(name)?;
        let position = resolve_start(self.log.as_ref(), start).await?;
        let (reply, answer) = oneshot::channel();
        let gone = || AdminError::NotFound(name.clone());
        commands
            .send(Command::Seek { position, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?;
        Ok(position)
    }

    /// `DeleteConsumerGroup`: returns how many members were ended.
    pub async fn delete(&self, name: &GroupName) -> Result<usize, AdminError> {
        self.restore().await?;
        let commands = self.existing(name)?;
        let (reply, answer) = oneshot::channel();
        let gone = || AdminError::NotFound(name.clone());
        commands
            .send(Command::Delete { reply })
            .await
            .map_err(|_| gone())?;
        let ended = answer.await.map_err(|_| gone())??;
        let mut groups = self.groups.lock().expect("groups lock is never poisoned");
        if groups.get(name).is_some_and(|g| g.same_channel(&commands)) {
            groups.remove(name);
        }
        Ok(ended)
    }

    /// Erasure: the user's events leave every group's unsettled work. Returns how many.
    pub async fn erase_user(&self, user: &str) -> Result<usize, LogError> {
        self.restore().await?;
        let user: Arc<str> = Arc::from(user);
        let mut erased = 0;
        for commands in self.all() {
            let (reply, answer) = oneshot::channel();
            let user = user.clone();
            if commands
                .send(Command::EraseUser { user, reply })
                .await
                .is_ok()
            {
                erased += answer.await.unwrap_or(0);
            }
        }
        Ok(erased)
    }
}

/// The first sequence a new group reads.
async fn resolve_start(log: &dyn LocalLog, start: Start) -> Result<u64, SubscriptionError> {
    let bounds = log.bounds().await?;
    match (first_position(start, &bounds)?, start) {
        (Some(position), _) => Ok(position),
        (None, Start::Since(since)) => Ok(log.position_at(since).await?),
        (None, _) => unreachable!("only `since` needs a search"),
    }
}
