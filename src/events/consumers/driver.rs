//! One consumer group's task: it owns the group's [`Group`] state machine, follows the log
//! from the group's read cursor, hands deliveries to its members, applies their answers
//! and the admin commands, and saves the group's state (see the parent module).

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::{
    broadcast::error::TryRecvError,
    mpsc::{self, error::TrySendError},
};
use tokio_util::sync::CancellationToken;

use super::{
    Answer, COMMAND_QUEUE, Command, GroupRow, Handed, JoinError, Member, MemberEnd, MemberMessage,
    Open, RETRY_AFTER, SAVE_EVERY, Sink,
};
use crate::events::{
    CommittedEvent, LocalLog, LogError, fanout,
    groups::{self, Candidate, Delivery, Group, MemberId},
    subscription::{CATCH_UP_PAGE, Filter},
    time::{Micros, now_micros},
};

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
pub(super) struct Driver {
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
    pub(super) fn new(
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

    pub(super) async fn run(
        mut self,
        mut queue: mpsc::Receiver<Command>,
        mut live: fanout::Receiver,
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
        live: &mut fanout::Receiver,
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
            let scan = groups::Scan {
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
