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

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use tokio::sync::{
    broadcast::error::TryRecvError,
    mpsc::{self, error::TrySendError},
    oneshot,
};
use tokio_util::sync::CancellationToken;

use super::{
    CommittedEvent, LocalLog, LogError,
    groups::{
        Candidate, Delivery, Group, GroupConfig, GroupError, GroupName, GroupStats, Limits,
        MemberId,
    },
    subscription::{CATCH_UP_PAGE, Filter, Start, SubscriptionError, first_position},
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

/// One member as its group's task sees it.
struct Link {
    /// Capacity `max_in_flight` + 1: the group never gives a member more than
    /// `max_in_flight` unanswered deliveries, and each message carries at least one, so
    /// they always fit, and the one slot left is for its [`MemberMessage::End`].
    /// `try_send` therefore never waits on a slow member.
    sender: mpsc::Sender<MemberMessage>,
    ended: CancellationToken,
}

/// The matching events read from the log up to `end` (exclusive); those from `taken` on
/// are not taken yet. Taking moves `taken` rather than shifting the vectors (a page is
/// taken a few events at a time, once per batch of acks), and hands the event out of
/// `events`, so what is delivered is not held here.
#[derive(Default)]
struct Page {
    candidates: Vec<Candidate>,
    events: Vec<Option<Arc<CommittedEvent>>>,
    end: u64,
    taken: usize,
}

impl Page {
    fn untaken(&self) -> &[Candidate] {
        &self.candidates[self.taken..]
    }
}

/// One group's task.
struct Driver {
    group: Group,
    log: Arc<dyn LocalLog>,
    filter: Filter,
    members: BTreeMap<MemberId, Link>,
    /// Given to each joining member for its answers.
    commands: mpsc::Sender<Command>,
    page: Page,
    /// The last read found nothing after the page: wait for a live append.
    caught_up: bool,
    /// Where the next round of deliveries starts among the members, so work spreads.
    turn: usize,
    /// [`Group::changes`] at the last save.
    saved: u64,
    /// When the next save is due: set by the first change after a save.
    save_at: Option<tokio::time::Instant>,
    /// When to read the log again after a read failed (nothing else may wake the task).
    retry_at: Option<tokio::time::Instant>,
    /// The page after `page`, being read meanwhile: while a group works through a backlog
    /// its next read overlaps the deliveries of this page instead of stalling them (the
    /// read runs on the store's blocking pool). One page ahead at most, read only after
    /// a full page; dropped on seek and erasure, which change what may be delivered.
    ahead: Option<ReadAhead>,
}

/// A read of the page starting at `from`, running in a task of its own.
struct ReadAhead {
    from: u64,
    read: tokio::task::JoinHandle<Result<Vec<Arc<CommittedEvent>>, LogError>>,
}

impl Driver {
    fn new(
        group: Group,
        fresh: bool,
        log: Arc<dyn LocalLog>,
        commands: mpsc::Sender<Command>,
    ) -> Self {
        let changes = group.changes();
        let filter = group.config().filter.matcher();
        let end = group.read_cursor();
        Self {
            group,
            log,
            filter,
            members: BTreeMap::new(),
            commands,
            page: Page {
                end,
                ..Page::default()
            },
            caught_up: false,
            turn: 0,
            // A new group is saved at once, so a restart finds it (and its start);
            // a restored one only once it changes.
            saved: if fresh { u64::MAX } else { changes },
            save_at: fresh.then(tokio::time::Instant::now),
            retry_at: None,
            ahead: None,
        }
    }

    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Command>,
        mut live: super::fanout::Receiver,
        shutdown: CancellationToken,
    ) {
        let mut live_open = true;
        // After a restore, what retention removed meanwhile is skipped before reading.
        if let Ok(bounds) = self.log.bounds().await {
            self.expire_before(bounds.oldest);
        }
        loop {
            let wakeup = self.group.next_wakeup(now_micros()).map(instant_at);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                command = queue.recv() => match command {
                    Some(command) => {
                        if self.commands(command, &mut queue).await.is_break() {
                            return;
                        }
                    }
                    None => break,
                },
                appended = live.recv(), if live_open => live_open = self.appended(appended, &mut live),
                () = sleep_until(wakeup) => {}
                () = sleep_until(self.save_at) => self.save().await,
                () = sleep_until(self.retry_at) => self.retry_at = None,
            }
            if let Err(error) = self.dispatch().await {
                tracing::warn!(group = %self.group.name(), %error, "consumer group could not read the log; retrying in a second");
                self.retry_at = Some(tokio::time::Instant::now() + RETRY_AFTER);
            }
            if self.group.changes() != self.saved && self.save_at.is_none() {
                self.save_at = Some(tokio::time::Instant::now() + SAVE_EVERY);
            }
        }
        self.stop(queue).await;
    }

    /// Handles `first` and every command queued behind it (up to a queue's worth), before
    /// the next dispatch: a burst of answers from every member costs one pass over the
    /// members, not one each. `Break` when the group was deleted: its task ends.
    async fn commands(
        &mut self,
        first: Command,
        queue: &mut mpsc::Receiver<Command>,
    ) -> std::ops::ControlFlow<()> {
        let mut next = Some(first);
        for _ in 0..COMMAND_QUEUE {
            let Some(command) = next.take().or_else(|| queue.try_recv().ok()) else {
                break;
            };
            if let Command::Delete { reply } = command {
                let result = self.delete().await;
                let deleted = result.is_ok();
                let _ = reply.send(result);
                if deleted {
                    return std::ops::ControlFlow::Break(());
                }
            } else {
                self.handle(command);
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    /// Retention removed every event below `oldest`: the group skips them, counting as
    /// expired those it held and, when its filter takes every event, those it had not
    /// read yet (by sequence, so events erased earlier in that range count too). With a
    /// filter the removed events can no longer be told apart, so unread ones go uncounted.
    fn expire_before(&mut self, oldest: u64) {
        let unread = if self.group.config().filter.is_everything() {
            oldest.saturating_sub(self.group.unread_from())
        } else {
            0
        };
        self.group.expire_before(oldest, unread);
    }

    /// A live append (or a lag, or the end of the feed): the log has more to read.
    /// Returns whether the live feed is still open.
    fn appended(
        &mut self,
        appended: Result<Arc<CommittedEvent>, tokio::sync::broadcast::error::RecvError>,
        live: &mut super::fanout::Receiver,
    ) -> bool {
        use tokio::sync::broadcast::error::RecvError;
        self.caught_up = false;
        // Coalesce a burst of appends into one round.
        while !matches!(
            live.try_recv(),
            Err(TryRecvError::Empty | TryRecvError::Closed)
        ) {}
        !matches!(appended, Err(RecvError::Closed))
    }

    /// Shutdown: members end with `UNAVAILABLE`, what they held returns, the state is saved.
    async fn stop(mut self, mut queue: mpsc::Receiver<Command>) {
        // Answers already queued still count: an ack the member sent before the end is
        // saved, not redelivered after the restart. Joins queued now are refused (their
        // reply is dropped: the caller sees the gateway shutting down).
        while let Ok(command) = queue.try_recv() {
            if let Command::Answer { member, answer } = command {
                self.answer(member, answer);
            }
        }
        self.end_all(MemberEnd::ShuttingDown);
        if self.group.changes() != self.saved {
            self.save().await;
        }
    }

    /// Writes the group's snapshot; on failure the next try is a second later, and until
    /// then a crash redelivers more, never less.
    async fn save(&mut self) {
        let changes = self.group.changes();
        let write = vec![(self.group.name().to_string(), Some(self.group.snapshot()))];
        match self.log.save_consumer_groups(write).await {
            Ok(()) => {
                self.saved = changes;
                self.save_at = None;
            }
            Err(error) => {
                tracing::warn!(group = %self.group.name(), %error, "consumer group state not saved; retrying");
                self.save_at = Some(tokio::time::Instant::now() + SAVE_EVERY);
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Join { open, reply } => {
                let _ = reply.send(self.join(open));
            }
            Command::Answer { member, answer } => self.answer(member, answer),
            Command::Describe { reply } => {
                let row = GroupRow {
                    name: self.group.name().clone(),
                    config: self.group.config().clone(),
                    created_at: self.group.created_at(),
                    stats: self.group.stats(0),
                };
                let _ = reply.send((row, self.group.unread_from()));
            }
            Command::Seek { position, reply } => {
                self.group.seek(position);
                // The page was read for the old position.
                self.page = Page {
                    end: position,
                    ..Page::default()
                };
                self.ahead = None;
                self.caught_up = false;
                let _ = reply.send(());
            }
            Command::EraseUser { user, reply } => {
                let erased = self.group.erase_user(&user);
                // Read but not yet taken: they must not go out either. The page read
                // ahead may hold them too: it is read again.
                self.drop_user(&user);
                self.ahead = None;
                let _ = reply.send(erased);
            }
            // Handled by `commands`: it ends the task.
            Command::Delete { .. } => {}
        }
    }

    fn drop_user(&mut self, user: &str) {
        let page = std::mem::take(&mut self.page);
        let (candidates, events) = page
            .candidates
            .into_iter()
            .zip(page.events)
            .skip(page.taken)
            .filter(|(c, _)| &*c.user != user)
            .unzip();
        self.page = Page {
            candidates,
            events,
            end: page.end,
            taken: 0,
        };
    }

    /// `DeleteConsumerGroup`: members end, the saved state goes. `Err` keeps the group.
    async fn delete(&mut self) -> Result<usize, LogError> {
        let write = vec![(self.group.name().to_string(), None)];
        self.log.save_consumer_groups(write).await?;
        let members = self.members.len();
        self.end_all(MemberEnd::Deleted);
        tracing::info!(group = %self.group.name(), members, "consumer group deleted");
        Ok(members)
    }

    fn join(&mut self, open: Open) -> Result<Member, JoinError> {
        self.group.check_open(&open.config)?;
        let id = self.group.join(open.max_in_flight)?;
        let capacity = self.group.room(id)? + 1;
        let (sender, deliveries) = mpsc::channel(capacity);
        let ended = CancellationToken::new();
        self.members.insert(
            id,
            Link {
                sender,
                ended: ended.clone(),
            },
        );
        tracing::info!(group = %self.group.name(), member = id.get(), "consumer group member joined");
        Ok(Member {
            id,
            sink: Sink::Group(self.commands.clone()),
            deliveries,
            ended,
        })
    }

    fn answer(&mut self, member: MemberId, answer: Answer) {
        let now = now_micros();
        // An unknown member is one that already ended: its late answers are ignored.
        let _ = match answer {
            Answer::Ack(sequences) => self.group.ack(member, &sequences).map(drop),
            Answer::Term(sequences) => self.group.term(member, &sequences).map(drop),
            Answer::Nak { sequences, delay } => {
                self.group.nak(member, &sequences, delay, now).map(drop)
            }
            Answer::Violation(why) => {
                self.end(member, MemberEnd::Protocol(why));
                Ok(())
            }
            Answer::Leave => {
                self.leave(member);
                Ok(())
            }
        };
    }

    /// The member is out: what it held is due again at once.
    fn leave(&mut self, member: MemberId) {
        let returned = self.group.leave(member, now_micros());
        if let Some(link) = self.members.remove(&member) {
            link.ended.cancel();
            tracing::info!(group = %self.group.name(), member = member.get(), returned, "consumer group member left");
        }
    }

    fn end(&mut self, member: MemberId, why: MemberEnd) {
        if let Some(link) = self.members.get(&member) {
            // Fits: the last slot of the channel is kept for it (see `Link`).
            let _ = link.sender.try_send(MemberMessage::End(why));
        }
        self.leave(member);
    }

    fn end_all(&mut self, why: MemberEnd) {
        let members: Vec<MemberId> = self.members.keys().copied().collect();
        for member in members {
            self.end(member, why.clone());
        }
    }

    /// Hands out whatever can go now, reading the log as far as members have room.
    async fn dispatch(&mut self) -> Result<(), LogError> {
        self.group.expire_deadlines(now_micros());
        loop {
            let room = !self.members_with_room().is_empty();
            if room && self.needs_page() {
                self.fill_page().await?;
            }
            let handed = self.round().await?;
            // Stop when the group handed out nothing, unless the page was used up (every candidate,
            // or a page of non-matching events) and someone could take from the next one.
            let room = !self.members_with_room().is_empty();
            if handed == 0 && (!room || !self.needs_page()) {
                return Ok(());
            }
        }
    }

    /// The page is used up and the log may have more.
    fn needs_page(&self) -> bool {
        self.group.read_cursor() >= self.page.end && !self.caught_up
    }

    fn members_with_room(&self) -> Vec<MemberId> {
        let mut members: Vec<MemberId> = self
            .members
            .keys()
            .copied()
            .filter(|&m| self.group.room(m).is_ok_and(|room| room > 0))
            .collect();
        if !members.is_empty() {
            let turn = self.turn % members.len();
            members.rotate_left(turn);
        }
        members
    }

    /// One pass over the members with room; returns how many deliveries the group handed
    /// out, sent or not: one whose event retention removed meanwhile is discarded, which
    /// frees its member's room, so another round may send what it could not.
    async fn round(&mut self) -> Result<usize, LogError> {
        let mut handed = 0;
        for member in self.members_with_room() {
            let scan = super::groups::Scan {
                matching: self.page.untaken(),
                end: self.page.end,
            };
            let deliveries = match self.group.next_deliveries(member, now_micros(), scan) {
                Ok(deliveries) => deliveries,
                Err(error) => {
                    tracing::error!(group = %self.group.name(), %error, "consumer group state refused a scan");
                    continue;
                }
            };
            // First deliveries' events are on the page; take them before it moves on.
            let found: Vec<_> = deliveries
                .iter()
                .map(|d| self.take_from_page(d.sequence))
                .collect();
            self.drop_taken();
            handed += deliveries.len();
            let mut batch = Vec::with_capacity(deliveries.len());
            for (delivery, on_page) in deliveries.into_iter().zip(found) {
                if let Some(event) = self.event_of(&delivery, on_page).await? {
                    batch.push(event);
                }
            }
            self.send(member, batch);
        }
        self.turn = self.turn.wrapping_add(1);
        Ok(handed)
    }

    /// Forgets the page's candidates below the group's cursor.
    fn drop_taken(&mut self) {
        let cursor = self.group.read_cursor();
        let taken = self.page.untaken().partition_point(|c| c.sequence < cursor);
        self.page.taken += taken;
    }

    async fn fill_page(&mut self) -> Result<(), LogError> {
        let from = self.group.read_cursor();
        let events = match self.ahead.take() {
            Some(ahead) if ahead.from == from => ahead
                .read
                .await
                .map_err(|e| LogError::Storage(format!("read-ahead task failed: {e}")))??,
            _ => self.log.read(from, CATCH_UP_PAGE).await?,
        };
        if events.len() == CATCH_UP_PAGE {
            self.read_ahead(events.last().map_or(from, |e| e.sequence() + 1));
        }
        if events.first().is_none_or(|e| e.sequence() > from) {
            // A gap at the cursor: retention may have removed what the group had not read.
            let oldest = self.log.bounds().await?.oldest;
            if oldest > from {
                self.expire_before(oldest);
            }
        }
        let Some(last) = events.last() else {
            self.caught_up = true;
            return Ok(());
        };
        let end = last.sequence() + 1;
        let (candidates, events): (Vec<_>, Vec<_>) = events
            .into_iter()
            .filter(|e| self.filter.matches(e))
            .map(|e| {
                let candidate = Candidate {
                    sequence: e.sequence(),
                    user: Arc::from(e.application_user_id()),
                };
                (candidate, Some(e))
            })
            .unzip();
        self.page = Page {
            candidates,
            events,
            end,
            taken: 0,
        };
        Ok(())
    }

    /// Starts reading the page from `from` (see [`Driver::ahead`]).
    fn read_ahead(&mut self, from: u64) {
        let log = self.log.clone();
        let read = tokio::spawn(async move { log.read(from, CATCH_UP_PAGE).await });
        self.ahead = Some(ReadAhead { from, read });
    }

    /// What goes out for one delivery: its event from the page or (a redelivery) the
    /// log; `None`, and the delivery discarded, if retention removed it meanwhile.
    async fn event_of(
        &mut self,
        delivery: &Delivery,
        on_page: Option<Arc<CommittedEvent>>,
    ) -> Result<Option<Handed>, LogError> {
        let event = match on_page {
            Some(event) => Some(event),
            None => self.read_one(delivery.sequence).await?,
        };
        let Some(event) = event else {
            self.group.discard(delivery.sequence);
            return Ok(None);
        };
        Ok(Some(Handed {
            event,
            attempt: delivery.attempt,
        }))
    }

    /// Sends a member what one round handed it.
    fn send(&mut self, member: MemberId, batch: Vec<Handed>) {
        let Some(link) = self.members.get(&member) else {
            return;
        };
        if batch.is_empty() {
            return;
        }
        match link.sender.try_send(MemberMessage::Deliveries(batch)) {
            Ok(()) => {}
            // The client went away (or overran its own window by acking what it had not
            // received): it is out, and what it held goes to the others.
            Err(TrySendError::Closed(_) | TrySendError::Full(_)) => self.leave(member),
        }
    }

    /// A first delivery's event, out of the page.
    fn take_from_page(&mut self, sequence: u64) -> Option<Arc<CommittedEvent>> {
        let index = self
            .page
            .untaken()
            .binary_search_by_key(&sequence, |c| c.sequence)
            .ok()?;
        self.page.events.get_mut(self.page.taken + index)?.take()
    }

    /// A redelivery's event, read back from the log; `None` if it left the log.
    async fn read_one(&self, sequence: u64) -> Result<Option<Arc<CommittedEvent>>, LogError> {
        let page = self.log.read(sequence, 1).await?;
        Ok(page.into_iter().next().filter(|e| e.sequence() == sequence))
    }
}

fn instant_at(at: Micros) -> tokio::time::Instant {
    let wait = at.saturating_sub(now_micros()).max(0) as u64;
    tokio::time::Instant::now() + std::time::Duration::from_micros(wait)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
