//! The counters JetStream does not keep (`terminated`, `expired`), in a stream of their own.

use std::sync::Arc;

use async_nats::jetstream::stream;
use tokio::sync::OnceCell;

use super::{Listed, storage};
use crate::events::{LogError, groups::GroupName, nats::NatsLog};

/// Compare-and-set attempts for a counter update before it is given up (logged).
const TALLY_ATTEMPTS: usize = 8;

/// A group's counters in its key-value entry: terminated, expired, and the stream
/// sequence through which removals were counted as expired (so none is counted twice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Tally3 {
    pub(super) terminated: u64,
    pub(super) expired: u64,
    pub(super) expired_through: u64,
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
pub(super) struct Tally {
    log: Arc<NatsLog>,
    /// Opened (or created) on first use, then shared by every member and admin call.
    bucket: OnceCell<stream::Stream>,
}

impl Tally {
    pub(super) fn new(log: Arc<NatsLog>) -> Self {
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
    pub(super) async fn update(
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
    pub(super) async fn terminated(&self, group: &GroupName, n: u64) {
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
    pub(super) async fn observe(
        &self,
        group: &GroupName,
        listed: &Listed,
        state: &stream::State,
    ) -> Tally3 {
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
    pub(super) async fn forget(&self, group: &GroupName) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
