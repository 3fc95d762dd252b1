//! Events after the edge: the durable log, live fan-out and subscription cursors.
//!
//! - [`committed`]: an event as the log committed it, decoded once and encoded once, so
//!   every subscriber is sent the same bytes.
//! - [`admission`]: the admission rule (dedup, tip) and erasure's part in the dedup index,
//!   shared by `memory` and `embedded`.
//! - [`log`]: the narrow [`EventLog`] trait every backend implements, the [`LocalLog`]
//!   capability (history and live reading) of the local backends, and the error type.
//! - [`embedded`]: the default backend, durable on disk (redb) with group commit.
//! - [`nats`]: NATS JetStream, shared by several replicas.
//! - [`memory`]: a bounded in-process backend for tests and throwaway runs.
//! - [`health`]: what a log reports to readiness, and where data was found damaged.
//! - [`groups`]: the consumer-group state machine (SPEC §4.3): pure, driven by a backend.
//! - [`consumers`]: the [`consumers::Groups`] seam `Consume` and the group admin RPCs call,
//!   and its local implementation: the task per group that drives [`groups`] over a local
//!   log (`memory`, `embedded`).
//! - [`nats_groups`]: the same seam on NATS: a group is a JetStream durable pull consumer.
//! - [`fanout`]: the bounded broadcast that carries freshly committed events to subscribers.
//! - [`subscription`]: start positions, filters, the [`subscription::Feed`] a subscriber
//!   reads, and the generic cursor that reads history and then live events without a gap
//!   or a duplicate.
//! - [`time`]: the conversions between wall-clock time and protobuf timestamps.

mod admission;
pub mod committed;
pub mod consumers;
pub mod embedded;
pub mod fanout;
pub mod groups;
pub mod health;
pub mod log;
pub mod memory;
pub mod nats;
pub mod nats_groups;
pub mod subscription;
pub mod time;

pub use committed::CommittedEvent;
pub use health::{CommitObserver, Damage, LogHealth};
use log::place_at_tip;
pub use log::{
    Admission, Admitted, AppendOutcome, Backend, Erased, EventLog, LocalLog, LogBounds, LogError,
    NewEvent, dead_letter_key, names_user,
};
