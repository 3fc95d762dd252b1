//! The consumer-group RPCs of `spike.gateway.v1.Admin` (SPEC §4.4), over
//! [`Groups`] (local or NATS). `None` groups (a log without them) answer UNIMPLEMENTED.

use std::{future::Future, pin::Pin, sync::Arc};

use tonic::Status;

use super::event_stream::log_status;
use crate::{
    events::{
        consumers::{AdminError, GroupRow, Groups},
        groups::GroupName,
        subscription::Start,
        time::{from_micros, to_micros},
    },
    metrics::{GroupSample, GroupSource},
    proto::{
        ConsumerGroupInfo, DeleteConsumerGroupRequest, DeleteConsumerGroupResponse,
        ListConsumerGroupsResponse, SeekConsumerGroupRequest, SeekConsumerGroupResponse,
        seek_consumer_group_request,
    },
};

fn groups(groups: Option<&Arc<dyn Groups>>) -> Result<&Arc<dyn Groups>, Status> {
    groups.ok_or_else(|| Status::unimplemented("this event log serves no consumer groups"))
}

fn admin_status(error: AdminError) -> Status {
    match error {
        AdminError::NotFound(_) => Status::not_found(error.to_string()),
        AdminError::Start(error) => Status::out_of_range(error.to_string()),
        AdminError::Log(error) => log_status(error),
    }
}

fn name(group: &str) -> Result<GroupName, Status> {
    GroupName::parse(group).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub async fn list(all: Option<&Arc<dyn Groups>>) -> Result<ListConsumerGroupsResponse, Status> {
    let rows = groups(all)?.list().await.map_err(log_status)?;
    Ok(ListConsumerGroupsResponse {
        groups: rows.into_iter().map(info).collect(),
    })
}

fn info(row: GroupRow) -> ConsumerGroupInfo {
    let filter = &row.config.filter;
    let wait = row.config.ack_wait;
    ConsumerGroupInfo {
        group: row.name.to_string(),
        event_types: filter.event_types().collect(),
        application_user_ids: filter.application_user_ids().map(str::to_owned).collect(),
        provider_slugs: filter.provider_slugs().map(str::to_owned).collect(),
        ordering: row.config.ordering.to_proto() as i32,
        ack_wait: Some(prost_types::Duration {
            seconds: wait / 1_000_000,
            nanos: ((wait % 1_000_000) * 1_000) as i32,
        }),
        created_at: Some(from_micros(row.created_at)),
        acked_through: row.stats.acked_through,
        pending: row.stats.pending,
        in_flight: row.stats.in_flight,
        members: row.stats.members,
        redeliveries: row.stats.counters.redeliveries,
        terminated: row.stats.counters.terminated,
        expired: row.stats.counters.expired,
    }
}

pub async fn seek(
    all: Option<&Arc<dyn Groups>>,
    request: SeekConsumerGroupRequest,
) -> Result<SeekConsumerGroupResponse, Status> {
    use seek_consumer_group_request::Start as S;
    let group = name(&request.group)?;
    let start = match request.start {
        None | Some(S::FromBeginning(false)) => Start::Live,
        Some(S::AfterSequence(after)) => Start::AfterSequence(after),
        Some(S::FromBeginning(true)) => Start::FromBeginning,
        Some(S::Since(since)) => Start::Since(to_micros(&since)),
    };
    let next_sequence = groups(all)?
        .seek(&group, start)
        .await
        .map_err(admin_status)?;
    tracing::info!(%group, next_sequence, "consumer group moved");
    Ok(SeekConsumerGroupResponse { next_sequence })
}

pub async fn delete(
    all: Option<&Arc<dyn Groups>>,
    request: DeleteConsumerGroupRequest,
) -> Result<DeleteConsumerGroupResponse, Status> {
    let group = name(&request.group)?;
    let ended = groups(all)?.delete(&group).await.map_err(admin_status)?;
    Ok(DeleteConsumerGroupResponse {
        members_ended: ended as u64,
    })
}

/// The groups' rows, as `ListConsumerGroups` counts them, for the per-group series of
/// `/metrics` (so the two never disagree).
pub struct GroupMetrics(pub Arc<dyn Groups>);

impl GroupSource for GroupMetrics {
    fn samples(&self) -> Pin<Box<dyn Future<Output = Vec<GroupSample>> + Send + '_>> {
        Box::pin(async move {
            let rows = match self.0.list().await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "consumer groups not read for /metrics");
                    return Vec::new();
                }
            };
            rows.into_iter().map(sample).collect()
        })
    }
}

fn sample(row: GroupRow) -> GroupSample {
    let counters = row.stats.counters;
    GroupSample {
        group: row.name.to_string(),
        pending: row.stats.pending,
        in_flight: row.stats.in_flight,
        acks: counters.acks,
        naks: counters.naks,
        redeliveries: counters.redeliveries,
        terminated: counters.terminated,
        expired: counters.expired,
    }
}
