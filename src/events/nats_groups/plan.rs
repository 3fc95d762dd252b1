//! A group's consumers ([`plan`]): their names and subjects' last token, and the group's
//! definition kept in each one's description ([`describe`], [`definition`]).

use base64::Engine;
use prost::Message;

use crate::{
    events::{
        groups::{GroupConfig, GroupFilter, GroupName, Ordering},
        nats::{PARTITIONS, partition_of},
        time::{Micros, from_micros, to_micros},
    },
    proto::ConsumerGroupInfo,
};

/// JetStream refuses a consumer description longer than this (4 KiB on 2.9).
pub const MAX_DESCRIPTION: usize = 4096;
/// What a gateway group's description starts with, before its base64 definition.
const DESCRIPTION_TAG: &str = "spike-gateway group v1 ";
/// Consumer names of groups start with it, so other consumers on the stream are not
/// taken for groups.
pub(super) const CONSUMER_PREFIX: &str = "group_";

/// What one of a group's consumers reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// Every partition (unordered groups).
    All,
    Partition(u32),
    /// The pre-partition 4-token subjects.
    Legacy,
}

/// One of a group's consumers: its name and what it reads.
#[derive(Debug, Clone)]
pub(super) struct Source {
    pub(super) name: String,
    pub(super) part: Part,
}

pub(super) fn anchor_name(group: &GroupName) -> String {
    format!("{CONSUMER_PREFIX}{}", group.as_str().replace('.', "~"))
}

/// The group's consumers, the anchor last (it is created last: see the module docs).
pub(super) fn plan(group: &GroupName, config: &GroupConfig, legacy: bool) -> Vec<Source> {
    let anchor = anchor_name(group);
    let mut parts: Vec<Part> = match config.ordering {
        Ordering::Unordered => vec![Part::All],
        Ordering::PerUser => {
            let users: Vec<&str> = config.filter.application_user_ids().collect();
            let mut partitions: Vec<u32> = if users.is_empty() {
                (0..PARTITIONS).collect()
            } else {
                users.iter().map(|user| partition_of(user)).collect()
            };
            partitions.sort_unstable();
            partitions.dedup();
            partitions.into_iter().map(Part::Partition).collect()
        }
    };
    // The anchor is the first of them; it goes to the end of the list.
    parts.rotate_left(1);
    let mut sources: Vec<Source> = parts
        .iter()
        .enumerate()
        .map(|(at, &part)| Source {
            name: match part {
                _ if at + 1 == parts.len() => anchor.clone(),
                Part::Partition(n) => format!("{anchor}@p{n}"),
                Part::All | Part::Legacy => unreachable!("one All, no Legacy yet"),
            },
            part,
        })
        .collect();
    if legacy {
        let name = format!("{anchor}@legacy");
        sources.insert(
            0,
            Source {
                name,
                part: Part::Legacy,
            },
        );
    }
    sources
}

/// A group's definition as its consumer's description.
pub(super) fn describe(name: &GroupName, config: &GroupConfig, created_at: Micros) -> String {
    let filter = &config.filter;
    let definition = ConsumerGroupInfo {
        group: name.to_string(),
        event_types: filter.event_types().collect(),
        application_user_ids: filter.application_user_ids().map(str::to_owned).collect(),
        provider_slugs: filter.provider_slugs().map(str::to_owned).collect(),
        ordering: config.ordering.to_proto() as i32,
        ack_wait: Some(prost_types::Duration {
            seconds: config.ack_wait / 1_000_000,
            nanos: ((config.ack_wait % 1_000_000) * 1_000) as i32,
        }),
        created_at: Some(from_micros(created_at)),
        ..ConsumerGroupInfo::default()
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(definition.encode_to_vec());
    format!("{DESCRIPTION_TAG}{encoded}")
}

/// The definition a description holds; `None` for a consumer that is not a group's.
pub(super) fn definition(description: Option<&str>) -> Option<(GroupName, GroupConfig, Micros)> {
    let encoded = description?.strip_prefix(DESCRIPTION_TAG)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let info = ConsumerGroupInfo::decode(bytes.as_slice()).ok()?;
    let filter = GroupFilter::new(
        &info.event_types,
        info.application_user_ids,
        info.provider_slugs,
    )
    .ok()?;
    let ordering = Ordering::from_proto(info.ordering).ok()?;
    let wait = info
        .ack_wait
        .map_or(0, |d| d.seconds * 1_000_000 + i64::from(d.nanos / 1_000));
    let config = GroupConfig::new(filter, ordering, wait).ok()?;
    let created_at = info.created_at.as_ref().map_or(0, to_micros);
    Some((GroupName::parse(&info.group).ok()?, config, created_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(users: &[&str], ordering: Ordering) -> GroupConfig {
        let users = users.iter().map(|u| (*u).to_owned()).collect();
        GroupConfig::new(GroupFilter::new(&[], users, vec![]).unwrap(), ordering, 0).unwrap()
    }

    #[test]
    fn a_per_user_group_has_one_consumer_per_partition_and_its_anchor_last() {
        let name = GroupName::parse("a.b").unwrap();
        let sources = plan(&name, &config(&[], Ordering::PerUser), true);
        assert_eq!(sources.len(), PARTITIONS as usize + 1);
        assert_eq!(
            (sources[0].name.as_str(), sources[0].part),
            ("group_a~b@legacy", Part::Legacy)
        );
        let last = sources.last().unwrap();
        assert_eq!(
            (last.name.as_str(), last.part),
            ("group_a~b", Part::Partition(0))
        );
        assert_eq!(sources[1].name, "group_a~b@p1");
        let names: std::collections::HashSet<_> = sources.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), sources.len());

        let one = plan(&name, &config(&["u"], Ordering::PerUser), false);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].part, Part::Partition(partition_of("u")));
        assert_eq!(one[0].name, "group_a~b");
        let unordered = plan(&name, &config(&["u"], Ordering::Unordered), false);
        assert_eq!(
            (
                unordered[0].name.as_str(),
                unordered[0].part,
                unordered.len()
            ),
            ("group_a~b", Part::All, 1)
        );
    }
}
