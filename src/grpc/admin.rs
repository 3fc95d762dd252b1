//! `spike.gateway.v1.Admin`: operator actions, behind their own bearer tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    deadletters::{self, Selection},
    events::{EventLog, LogError, consumers::ConsumerGroups},
    metrics::Metrics,
    proto::{
        DeleteConsumerGroupRequest, DeleteConsumerGroupResponse, EraseUserRequest,
        EraseUserResponse, ListConsumerGroupsRequest, ListConsumerGroupsResponse,
        ListDeadLettersRequest, ListDeadLettersResponse, RedriveDeadLettersRequest,
        RedriveDeadLettersResponse, SeekConsumerGroupRequest, SeekConsumerGroupResponse,
        admin_server::Admin,
    },
};

/// `ListDeadLetters` page size when the request names none.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest `ListDeadLetters` page: bounds the answer's size (letters carry raw JSON).
const MAX_PAGE_SIZE: u32 = 1000;

pub struct AdminService {
    log: Arc<dyn EventLog>,
    metrics: Arc<Metrics>,
    /// The consumer groups the consumer-group RPCs act on; `None` on a store without them.
    groups: Option<Arc<ConsumerGroups>>,
}

impl AdminService {
    pub fn new(log: Arc<dyn EventLog>, metrics: Arc<Metrics>) -> Self {
        Self {
            log,
            metrics,
            groups: None,
        }
    }

    /// Serves the consumer-group RPCs over `groups`, and erases from them too.
    pub fn with_groups(mut self, groups: Option<Arc<ConsumerGroups>>) -> Self {
        self.groups = groups;
        self
    }
}

fn unavailable(e: LogError) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn erase_user(
        &self,
        request: Request<EraseUserRequest>,
    ) -> Result<Response<EraseUserResponse>, Status> {
        let user = request.into_inner().application_user_id;
        if user.is_empty() {
            return Err(Status::invalid_argument("application_user_id is required"));
        }
        let erased = self.log.erase_user(&user).await.map_err(unavailable)?;
        // After the log: a group reading on finds none of the user's events any more.
        let from_groups = match &self.groups {
            Some(groups) => groups.erase_user(&user).await.map_err(unavailable)?,
            None => 0,
        };
        deadletters::refresh_gauge(self.log.as_ref(), &self.metrics).await;
        // An audit record of who was erased and how much; no health data.
        tracing::info!(
            application_user_id = %user,
            events = erased.events,
            dedup_entries = erased.dedup_entries,
            dead_letters = erased.dead_letters,
            from_consumer_groups = from_groups,
            "user erased"
        );
        Ok(Response::new(EraseUserResponse {
            events_removed: erased.events,
            dedup_entries_removed: erased.dedup_entries,
            dead_letters_removed: erased.dead_letters,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!(
                    "page_size {n} is over the limit of {MAX_PAGE_SIZE}"
                )));
            }
            n => n,
        } as usize;
        let user = request.application_user_id.filter(|u| !u.is_empty());
        // One more than the page, to know whether another page follows.
        let mut letters = self
            .log
            .dead_letters(request.after_id, page_size + 1, user.as_deref())
            .await
            .map_err(unavailable)?;
        let next_after_id = if letters.len() > page_size {
            letters.truncate(page_size);
            letters.last().map_or(0, |l| l.id)
        } else {
            0
        };
        if !request.include_raw_json {
            for letter in &mut letters {
                letter.raw_json.clear();
            }
        }
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: letters,
            next_after_id,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<RedriveDeadLettersRequest>,
    ) -> Result<Response<RedriveDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let selection = match (request.all, request.ids.is_empty()) {
            (true, _) => Selection::All,
            (false, false) => Selection::Ids(request.ids),
            (false, true) => {
                return Err(Status::invalid_argument(
                    "name the letters to redrive in ids, or set all",
                ));
            }
        };
        let redriven = deadletters::redrive(self.log.as_ref(), selection)
            .await
            .map_err(unavailable)?;
        deadletters::refresh_gauge(self.log.as_ref(), &self.metrics).await;
        tracing::info!(
            appended = redriven.appended,
            duplicates = redriven.duplicates,
            still_dead = redriven.still_dead,
            "dead letters redriven"
        );
        Ok(Response::new(RedriveDeadLettersResponse {
            appended: redriven.appended,
            duplicates: redriven.duplicates,
            still_dead: redriven.still_dead,
        }))
    }

    async fn list_consumer_groups(
        &self,
        _request: Request<ListConsumerGroupsRequest>,
    ) -> Result<Response<ListConsumerGroupsResponse>, Status> {
        super::group_admin::list(self.groups.as_ref())
            .await
            .map(Response::new)
    }

    async fn seek_consumer_group(
        &self,
        request: Request<SeekConsumerGroupRequest>,
    ) -> Result<Response<SeekConsumerGroupResponse>, Status> {
        super::group_admin::seek(self.groups.as_ref(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_consumer_group(
        &self,
        request: Request<DeleteConsumerGroupRequest>,
    ) -> Result<Response<DeleteConsumerGroupResponse>, Status> {
        super::group_admin::delete(self.groups.as_ref(), request.into_inner())
            .await
            .map(Response::new)
    }
}
