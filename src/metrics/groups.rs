//! Per consumer group series (SPEC §4.3), read from the groups at each scrape.
//!
//! A group's numbers live in its state machine (its counters are durable, in its
//! snapshot), so the series are not counted here a second time: each scrape asks the
//! [`GroupSource`] for every group's row, as `ListConsumerGroups` shows it, and encodes
//! it. `pending` includes the matching events a group has not read yet, so a scrape costs
//! what that call costs: a read of the log from where each group is.
//!
//! Labels: `group`, the operator's group name. Names are chosen by operators, not by
//! traffic, but nothing else bounds how many exist, so at most [`GROUP_SERIES`] groups
//! (the first in name order) get a series of their own; the rest are summed into one
//! series labelled [`OTHER_GROUPS`], a value no group name can take.

use std::{future::Future, pin::Pin, sync::Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// Groups exported with a series of their own; past it, one `(other)` series sums the rest.
pub const GROUP_SERIES: usize = 64;

/// The label of the series summing the groups past [`GROUP_SERIES`]: parentheses are
/// outside the group-name alphabet, so no group is called this.
pub const OTHER_GROUPS: &str = "(other)";

/// One consumer group's numbers at a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSample {
    pub group: String,
    /// Matching events after `acked_through` not yet acked or termed (read or not).
    pub pending: u64,
    pub in_flight: u64,
    pub acks: u64,
    pub naks: u64,
    pub redeliveries: u64,
    pub terminated: u64,
    pub expired: u64,
}

impl GroupSample {
    fn add(&mut self, other: &GroupSample) {
        self.pending += other.pending;
        self.in_flight += other.in_flight;
        self.acks += other.acks;
        self.naks += other.naks;
        self.redeliveries += other.redeliveries;
        self.terminated += other.terminated;
        self.expired += other.expired;
    }
}

/// Where a scrape reads the groups from: the service that holds them.
pub trait GroupSource: Send + Sync {
    /// Every group's sample; an empty list when the groups cannot be read now (the
    /// series then disappear for that scrape rather than report stale numbers).
    fn samples(&self) -> Pin<Box<dyn Future<Output = Vec<GroupSample>> + Send + '_>>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

/// The samples of the latest scrape, encoded by the registry.
#[derive(Debug, Default)]
pub(super) struct GroupSeries {
    /// A std mutex: held only to replace or encode the list, never across an await.
    samples: Mutex<Vec<GroupSample>>,
}

impl GroupSeries {
    /// Keeps `samples` for the next encoding, capped at [`GROUP_SERIES`] series.
    pub(super) fn set(&self, mut samples: Vec<GroupSample>) {
        samples.sort_by(|a, b| a.group.cmp(&b.group));
        if samples.len() > GROUP_SERIES {
            let mut other = GroupSample {
                group: OTHER_GROUPS.to_owned(),
                ..GroupSample::default()
            };
            for sample in samples.drain(GROUP_SERIES..) {
                other.add(&sample);
            }
            samples.push(other);
        }
        *self.samples.lock().expect("samples lock is never poisoned") = samples;
    }
}

type Field = fn(&GroupSample) -> u64;

const GAUGES: [(&str, &str, Field); 2] = [
    (
        "consumer_group_pending",
        "Matching events of a consumer group not yet acked or termed",
        |s| s.pending,
    ),
    (
        "consumer_group_in_flight",
        "Deliveries of a consumer group awaiting an answer",
        |s| s.in_flight,
    ),
];

const COUNTERS: [(&str, &str, Field); 5] = [
    ("consumer_group_acks", "Deliveries acked", |s| s.acks),
    ("consumer_group_naks", "Deliveries naked", |s| s.naks),
    (
        "consumer_group_redeliveries",
        "Deliveries with an attempt above 1",
        |s| s.redeliveries,
    ),
    (
        "consumer_group_terminated",
        "Deliveries termed: never delivered again",
        |s| s.terminated,
    ),
    (
        "consumer_group_expired",
        "Events removed by retention before the group settled them",
        |s| s.expired,
    ),
];

impl Collector for GroupSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.samples.lock().expect("samples lock is never poisoned");
        if samples.is_empty() {
            return Ok(());
        }
        for (name, help, field) in GAUGES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for sample in samples.iter() {
                let labels = GroupLabels {
                    group: sample.group.clone(),
                };
                let value = i64::try_from(field(sample)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        for (name, help, field) in COUNTERS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for sample in samples.iter() {
                let labels = GroupLabels {
                    group: sample.group.clone(),
                };
                ConstCounter::new(field(sample)).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_past_the_cap_are_summed_into_one_series() {
        let series = GroupSeries::default();
        let samples = (0..GROUP_SERIES + 3)
            .map(|n| GroupSample {
                group: format!("g{n:03}"),
                pending: 1,
                acks: 2,
                ..GroupSample::default()
            })
            .collect();
        series.set(samples);
        let kept = series.samples.lock().unwrap().clone();
        assert_eq!(kept.len(), GROUP_SERIES + 1);
        assert_eq!(kept[0].group, "g000");
        let other = kept.last().unwrap();
        assert_eq!(
            (other.group.as_str(), other.pending, other.acks),
            (OTHER_GROUPS, 3, 6)
        );
    }
}
