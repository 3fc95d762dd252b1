//! Consumer groups (SPEC §4.3): the replicas of one service share a group's events, each
//! event going to one member at a time, with acks, redelivery and a position the gateway
//! keeps.
//!
//! This module is the group's state machine, written once for every backend: pure and
//! synchronous, with no I/O, no task, no clock of its own (time comes in as [`Micros`])
//! and no JSON. A backend reads the log and talks to the members; [`Group`] decides who
//! gets what, when it comes back, and what is settled.
//!
//! # The guarantees, and where they are kept
//! - **One member at a time**: an event is in flight to at most one member; it goes out
//!   again only after its `ack_wait` ([`Group::expire_deadlines`]), a [`Group::nak`] by its
//!   member, or its member's [`Group::leave`]. Acked and termed events never come back.
//! - **`max_in_flight`**: [`Group::next_deliveries`] never gives a member more than its room.
//!   A delivery the group takes back while its member may still be working on it (its
//!   `ack_wait` passed, erasure, seek) stays on the member's count until the member
//!   answers, so a member that stops acking stops receiving.
//! - **Order**: redeliveries that are due go first, then first deliveries in sequence
//!   order. With [`Ordering::PerUser`], an event whose user has another event delivered
//!   and unsettled is queued behind it (in sequence order) and goes out once that one is
//!   acked or termed; other users pass the queue.
//! - **Position**: [`Group::acked_through`] is just below the first unsettled event; the
//!   group keeps no set of acked sequences, only its unsettled events, so a stuck event
//!   costs one entry however much traffic passes it.
//! - **Restarts**: [`Group::snapshot`] holds the durable part (definition, read position,
//!   unsettled events with their attempts, counters) and [`Group::restore`] resumes from
//!   it: in-flight state is not durable, so every event unsettled at the snapshot is
//!   delivered again and none is skipped. A snapshot taken in batches (say once a second)
//!   only widens what is redelivered: acks after it are lost, never deliveries.
//! - **Retention and erasure**: [`Group::expire_before`] skips and counts what retention
//!   removed; [`Group::erase_user`] drops a user's unsettled events.
//!
//! # Memory
//! A group holds its unsettled events: those in flight, at most the sum of its members'
//! `max_in_flight` (each at most [`Limits::max_in_flight`]), and those read but held back
//! (waiting for a redelivery, or queued behind their user), at most
//! [`Limits::max_waiting`]: when that window is full the group reads no new events until
//! some are settled, as JetStream's `max_ack_pending` does. So a group never holds more
//! than `max_waiting` + the largest total `max_in_flight` of the members present at once
//! (after a restore, plus the snapshot's unsettled events, themselves within that
//! bound). Its two hot-path indexes (unsettled events by sequence, deadlines in flight;
//! `sorted.rs`) hold at most twice their live entries plus 64. The snapshot is
//! proportional to the same count. Per-user ordering pays for its
//! order here: a user with a long backlog fills the window and pauses new reads for
//! everyone until the user's events are settled.
//!
//! # Driving it: `memory` and `embedded`
//! One task per group owns its [`Group`] (members' streams talk to it over channels, so
//! no lock is held across I/O). It follows the log from [`Group::read_cursor`] with the
//! same history-then-live cursor `Subscribe` uses, applies the group's filter
//! ([`GroupFilter::matcher`]), and buffers a page of candidates. Whenever a member has
//! [`Group::room`], a live append arrives, or the timer set to [`Group::next_wakeup`]
//! fires, it calls [`Group::next_deliveries`] with the buffered page ([`Scan`]; it drops
//! the candidates below the new read cursor) and sends each [`Delivery`], reading
//! redeliveries from the log by sequence ([`Group::discard`] if one is gone). Acks, naks
//! and terms from a member's stream go to [`Group::ack`], [`Group::nak`] and
//! [`Group::term`]; a stream's end, and shutdown, to [`Group::leave`]. Embedded writes
//! [`Group::snapshot`] into its store when [`Group::changes`] moved, in batches (once a
//! second, and at shutdown); memory keeps the group in process. Retention calls
//! [`Group::expire_before`] (counting the matching unread events it removes, from
//! [`Group::unread_from`]), `EraseUser` calls [`Group::erase_user`], and
//! `ListConsumerGroups` calls [`Group::stats`] with the backend's count of matching events
//! from [`Group::unread_from`].
//!
//! # NATS
//! JetStream keeps a group natively, shared by every replica, so the NATS backend
//! ([`crate::events::nats_groups`], whose module docs give the details) uses this module
//! only for the definition ([`GroupName`], [`GroupConfig`] and its `FAILED_PRECONDITION`
//! difference, stored in the consumers' descriptions since nats-server 2.9 has no
//! consumer metadata) and drives the rest through the server: a group is a set of durable
//! pull consumers (explicit ack, the group's `ack_wait`); unordered groups use one with
//! `max_ack_pending` [`Limits::max_waiting`], per-user groups one per user partition of
//! the subject with `max_ack_pending` 1, so one user's events go in order and one at a
//! time across every replica while users of other partitions proceed in parallel. Each
//! member pulls at most its room; ack, `-NAK` with a delay and `+TERM` map one to one; a
//! member's end naks what it held so it is redelivered at once (a replica that dies is
//! covered by `ack_wait`).
//!
//! [`Micros`]: crate::events::time::Micros

mod config;
mod ordering;
mod snapshot;
mod sorted;
mod state;
#[cfg(test)]
mod tests;

pub use config::{
    DEFAULT_ACK_WAIT, DEFAULT_MAX_IN_FLIGHT, GroupConfig, GroupError, GroupFilter, GroupName,
    Limits, MAX_GROUP_NAME, Ordering,
};
pub use snapshot::SnapshotError;
pub use state::{Candidate, Counters, Delivery, Group, GroupStats, MemberId, Scan, Settled};
