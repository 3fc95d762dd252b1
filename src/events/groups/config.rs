//! What defines a group (name, filter, ordering, `ack_wait`), the limits that bound its
//! memory, and the errors of the state machine.

use std::{collections::BTreeSet, fmt};

use crate::{
    events::{subscription::Filter, time::Micros},
    proto::{ConsumeOrdering, EventType},
};

/// Longest group name (SPEC §4.3).
pub const MAX_GROUP_NAME: usize = 64;
/// `max_in_flight` when a member asks for 0 (SPEC §4.3).
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;
/// `ack_wait` when an open asks for 0 (SPEC §4.3): 30 s.
pub const DEFAULT_ACK_WAIT: Micros = 30_000_000;

/// A group name: 1 to [`MAX_GROUP_NAME`] of `[A-Za-z0-9._-]`, so it is safe as a store key,
/// a metric label and a NATS consumer name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(String);

impl GroupName {
    pub fn parse(name: &str) -> Result<Self, GroupError> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if name.is_empty() || name.len() > MAX_GROUP_NAME || !name.bytes().all(allowed) {
            return Err(GroupError::InvalidName(format!(
                "group must be 1 to {MAX_GROUP_NAME} of [A-Za-z0-9._-], got {} bytes{}",
                name.len(),
                if name.is_empty() {
                    ""
                } else {
                    " outside that pattern or too long"
                },
            )));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a group orders what it hands out (`ConsumeOrdering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// First deliveries in sequence order; redeliveries whenever they are due.
    Unordered,
    /// One user's events in sequence order, never two of them in flight or waiting at once.
    PerUser,
}

impl Ordering {
    /// From `ConsumeOpen.ordering`, refusing values the proto does not define.
    pub fn from_proto(value: i32) -> Result<Self, GroupError> {
        match ConsumeOrdering::try_from(value) {
            Ok(ConsumeOrdering::Unspecified) => Ok(Self::Unordered),
            Ok(ConsumeOrdering::PerUser) => Ok(Self::PerUser),
            Err(_) => Err(GroupError::InvalidOrdering(value)),
        }
    }

    pub fn to_proto(self) -> ConsumeOrdering {
        match self {
            Self::Unordered => ConsumeOrdering::Unspecified,
            Self::PerUser => ConsumeOrdering::PerUser,
        }
    }
}

/// A group's filter, kept sorted so two opens compare exactly and the snapshot is
/// deterministic. Matching is [`Filter`]'s, so a group and a `Subscribe` stream with the
/// same lists see the same events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupFilter {
    pub(super) event_types: BTreeSet<i32>,
    pub(super) application_user_ids: BTreeSet<String>,
    pub(super) provider_slugs: BTreeSet<String>,
}

impl GroupFilter {
    /// Validates like `Subscribe` does ([`Filter::new`]: no unknown or unspecified type).
    pub fn new(
        event_types: &[i32],
        application_user_ids: Vec<String>,
        provider_slugs: Vec<String>,
    ) -> Result<Self, GroupError> {
        let filter = Filter::new(event_types, application_user_ids, provider_slugs)
            .map_err(GroupError::InvalidFilter)?;
        Ok(Self {
            event_types: filter.event_types.into_iter().collect(),
            application_user_ids: filter.application_user_ids.into_iter().collect(),
            provider_slugs: filter.provider_slugs.into_iter().collect(),
        })
    }

    /// The matcher a backend applies to the log when it reads candidates.
    pub fn matcher(&self) -> Filter {
        Filter {
            event_types: self.event_types.iter().copied().collect(),
            application_user_ids: self.application_user_ids.iter().cloned().collect(),
            provider_slugs: self.provider_slugs.iter().cloned().collect(),
        }
    }

    /// No list set: the group takes every event.
    pub fn is_everything(&self) -> bool {
        self.event_types.is_empty()
            && self.application_user_ids.is_empty()
            && self.provider_slugs.is_empty()
    }

    pub fn event_types(&self) -> impl Iterator<Item = i32> + '_ {
        self.event_types.iter().copied()
    }

    pub fn application_user_ids(&self) -> impl Iterator<Item = &str> {
        self.application_user_ids.iter().map(String::as_str)
    }

    pub fn provider_slugs(&self) -> impl Iterator<Item = &str> {
        self.provider_slugs.iter().map(String::as_str)
    }

    /// The first list that differs, described for a `FAILED_PRECONDITION` message.
    fn difference(&self, requested: &Self) -> Option<String> {
        let types = |set: &BTreeSet<i32>| {
            list(set.iter().map(|&t| {
                EventType::try_from(t).map_or_else(|_| t.to_string(), |t| t.as_str_name().into())
            }))
        };
        let strings = |set: &BTreeSet<String>| list(set.iter().cloned());
        let describe = |field: &str, existing: String, asked: String| {
            Some(format!("{field} {existing}, this open asks for {asked}"))
        };
        if self.event_types != requested.event_types {
            return describe(
                "event_types",
                types(&self.event_types),
                types(&requested.event_types),
            );
        }
        if self.application_user_ids != requested.application_user_ids {
            return describe(
                "application_user_ids",
                strings(&self.application_user_ids),
                strings(&requested.application_user_ids),
            );
        }
        if self.provider_slugs != requested.provider_slugs {
            return describe(
                "provider_slugs",
                strings(&self.provider_slugs),
                strings(&requested.provider_slugs),
            );
        }
        None
    }
}

/// `[a, b]`, or `[] (all)` for an empty list, which means "every".
fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "[] (all)".to_owned()
    } else {
        format!("[{}]", items.join(", "))
    }
}

/// What the first `open` fixes for the group's lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub filter: GroupFilter,
    pub ordering: Ordering,
    /// How long a delivery stays with its member without an ack; always positive.
    pub ack_wait: Micros,
}

impl GroupConfig {
    /// `ack_wait` 0 means [`DEFAULT_ACK_WAIT`]; a negative one is refused.
    pub fn new(
        filter: GroupFilter,
        ordering: Ordering,
        ack_wait: Micros,
    ) -> Result<Self, GroupError> {
        let ack_wait = match ack_wait {
            0 => DEFAULT_ACK_WAIT,
            wait if wait < 0 => return Err(GroupError::NegativeDuration("ack_wait")),
            wait => wait,
        };
        Ok(Self {
            filter,
            ordering,
            ack_wait,
        })
    }

    /// Why `requested` cannot open a group defined by `self`: the filter or the ordering
    /// differs (SPEC §4.3). `ack_wait` and the start are the creating open's, so a later
    /// open's are ignored, not compared.
    pub fn difference(&self, requested: &Self) -> Option<String> {
        if let Some(difference) = self.filter.difference(&requested.filter) {
            return Some(difference);
        }
        (self.ordering != requested.ordering).then(|| {
            format!(
                "ordering {}, this open asks for {}",
                self.ordering.to_proto().as_str_name(),
                requested.ordering.to_proto().as_str_name()
            )
        })
    }
}

/// Bounds on a group's memory (see the module docs for the resulting bound). Operator
/// settings: `GATEWAY_GROUP_MAX_IN_FLIGHT` and `GATEWAY_GROUP_MAX_WAITING` (`config.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `max_in_flight` a member may ask for.
    pub max_in_flight: u32,
    /// Events read but held back that a group keeps before it stops reading: waiting for
    /// a redelivery (nak delay, `ack_wait` expiry, a member's end) or, under per-user
    /// ordering, for their user's previous event. A full window pauses first deliveries
    /// (redeliveries go on) until the oldest of them are settled. At least 1 is used.
    pub max_waiting: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            max_waiting: 10_000,
        }
    }
}

/// What the state machine refuses. Each variant says which gRPC status it becomes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidName(String),
    /// INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidFilter(String),
    /// INVALID_ARGUMENT.
    #[error("ordering {0} is not a ConsumeOrdering")]
    InvalidOrdering(i32),
    /// INVALID_ARGUMENT.
    #[error("{0} must not be negative")]
    NegativeDuration(&'static str),
    /// INVALID_ARGUMENT.
    #[error("max_in_flight {requested} is over the gateway's limit of {limit}")]
    MaxInFlightTooLarge { requested: u32, limit: u32 },
    /// FAILED_PRECONDITION: the group exists with another definition.
    #[error("consumer group {group} exists with {difference}")]
    Mismatch { group: String, difference: String },
    /// INTERNAL: the backend used a member id after `leave` (a bug, not client input).
    #[error("member {0} is not in the group")]
    UnknownMember(u64),
    /// INTERNAL: the backend's candidates break the contract of [`super::Scan`].
    #[error("invalid scan: {0}")]
    InvalidScan(String),
}
