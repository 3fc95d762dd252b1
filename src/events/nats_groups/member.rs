//! A member on this replica: its pulls from the group's consumers, the messages it holds,
//! and its answers (see the parent module's docs, "A member").

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, atomic::Ordering as AtomicOrdering},
    time::Duration,
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{PullConsumer, pull},
};
use futures_util::{
    Stream, StreamExt,
    stream::{self as streams, SelectAll},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    LocalGroup, not_found,
    plan::{Part, Source},
    tally::Tally,
};
use crate::events::{
    consumers::{Answer, Handed, MemberEnd, MemberMessage},
    groups::GroupName,
    nats::decode,
    subscription::Filter,
};

/// How long one pull waits for messages before the member pulls again: also how long a
/// member that gained room (by acking) may wait for a pull sized to it, and how long a
/// member with less room than partitions stays on one set of partitions.
const PULL_EXPIRES: Duration = Duration::from_millis(500);
/// How long past its `expires` a pull may stay unanswered before the member pulls anew.
const PULL_GRACE: Duration = Duration::from_millis(500);
/// Pause after a failed pull before the next (NATS unreachable, a consumer being
/// recreated by a seek): a retry loop would only add load.
const PULL_RETRY: Duration = Duration::from_millis(200);

/// One pull's messages, tagged with its feed; `None` once the pull is over.
type Pulled = Pin<Box<dyn Stream<Item = (usize, Option<PullItem>)> + Send>>;
type PullItem = Result<jetstream::Message, async_nats::Error>;

/// One of the group's consumers as a member reads it.
pub(super) struct Feed {
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
    pub(super) fn new((source, consumer): (Source, PullConsumer)) -> Self {
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
pub(super) struct MemberTask {
    pub(super) feeds: Vec<Feed>,
    pub(super) per_user: bool,
    /// The legacy consumer (if any) has nothing pending or in flight: read the others.
    pub(super) legacy_drained: bool,
    /// Where the next round of pulls starts among the feeds, so a member with less room
    /// than partitions reaches every one in turn.
    pub(super) rotation: usize,
    /// The open pulls, one per feed at most.
    pub(super) pulls: SelectAll<Pulled>,
    pub(super) tally: Arc<Tally>,
    pub(super) group: GroupName,
    pub(super) filter: Filter,
    pub(super) max_in_flight: usize,
    /// The messages delivered to the member and not answered yet, by stream sequence.
    pub(super) held: BTreeMap<u64, Held>,
    /// To the member's stream; room for `max_in_flight` deliveries and the end.
    pub(super) out: mpsc::Sender<MemberMessage>,
    pub(super) answers: mpsc::Receiver<Answer>,
    pub(super) ended: CancellationToken,
    pub(super) shutdown: CancellationToken,
    pub(super) local: LocalGroup,
}

/// A message delivered to the member and not answered yet.
pub(super) struct Held {
    message: jetstream::Message,
    /// The feed it came from.
    feed: usize,
    /// The attempt it was delivered as.
    attempt: u32,
}

/// What ends a member's loop.
enum Stop {
    /// Its stream is gone: nothing to tell it.
    Left,
    End(MemberEnd),
}

impl MemberTask {
    pub(super) async fn run(mut self) {
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
        let mut attempt = u32::try_from(attempt).unwrap_or(u32::MAX).max(1);
        if let Some(before) = self.held.remove(&sequence) {
            // Redelivered while held (its ack_wait passed): counted once. JetStream's
            // delivered count can fall back when one of its deliveries found no pull
            // listening, so the attempt is at least one past the one this member saw.
            self.feeds[before.feed].held -= 1;
            attempt = attempt.max(before.attempt.saturating_add(1));
        }
        let delivery = MemberMessage::Deliveries(vec![Handed {
            event: Arc::new(event),
            attempt,
        }]);
        let held = Held {
            message,
            feed,
            attempt,
        };
        self.held.insert(sequence, held);
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
            if let Some(held) = self.held.remove(&sequence) {
                self.feeds[held.feed].held -= 1;
                settle(&self.group, &held.message, kind).await;
                settled += 1;
            }
        }
        if matches!(kind, AckKind::Term) && settled > 0 {
            self.tally.terminated(&self.group, settled).await;
        }
    }

    /// The member's end: what it held is redelivered at once.
    async fn release(&mut self) {
        for (_, held) in std::mem::take(&mut self.held) {
            settle(&self.group, &held.message, AckKind::Nak(None)).await;
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
