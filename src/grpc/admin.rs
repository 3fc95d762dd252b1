//! `spike.gateway.v1.Admin`: operator actions, behind their own bearer tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::event_stream::log_status;
use crate::{
    deadletters::{self, Selection},
    events::{EventLog, LogError, consumers::Groups},
    metrics::Metrics,
    proto::{
        DeadLetter, DeleteConsumerGroupRequest, DeleteConsumerGroupResponse, EraseUserRequest,
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
/// Letters read from the log at a time while a page is assembled. A merged letter holds a
/// whole request body (up to `GATEWAY_MAX_BODY_BYTES`), so this, not the page size, bounds
/// what a page without raw JSON holds in memory.
const READ_CHUNK: usize = 50;

pub struct AdminService {
    log: Arc<dyn EventLog>,
    metrics: Arc<Metrics>,
    /// The consumer groups the consumer-group RPCs act on; `None` on a store without them.
    groups: Option<Arc<dyn Groups>>,
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
    pub fn with_groups(mut self, groups: Option<Arc<dyn Groups>>) -> Self {
        self.groups = groups;
        self
    }

    /// Up to `page_size` letters after `after_id`, and the `next_after_id` of the next page
    /// (0 when none follows). Read [`READ_CHUNK`] letters at a time, their raw JSON dropped
    /// at once unless asked for, so a page without it never holds a page of request bodies.
    async fn page(
        &self,
        after_id: u64,
        page_size: usize,
        user: Option<&str>,
        include_raw_json: bool,
    ) -> Result<(Vec<DeadLetter>, u64), LogError> {
        let mut page: Vec<DeadLetter> = Vec::new();
        let mut after = after_id;
        loop {
            // One more than the page still needs, to know whether another page follows.
            let wanted = (page_size - page.len() + 1).min(READ_CHUNK);
            let chunk = self.log.dead_letters(after, wanted, user).await?;
            let exhausted = chunk.len() < wanted;
            for mut letter in chunk {
                if page.len() == page_size {
                    return Ok((page, after));
                }
                if !include_raw_json {
                    letter.raw_json = Vec::new();
                }
                after = letter.id;
                page.push(letter);
            }
            if exhausted {
                return Ok((page, 0));
            }
        }
    }
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
        let erased = self.log.erase_user(&user).await.map_err(log_status)?;
        // After the log: a group reading on finds none of the user's events any more.
        let from_groups = match &self.groups {
            Some(groups) => groups.erase_user(&user).await.map_err(log_status)?,
            None => 0,
        };
        deadletters::refresh_gauge(&self.log, &self.metrics).await;
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
        let (dead_letters, next_after_id) = self
            .page(
                request.after_id,
                page_size,
                user.as_deref(),
                request.include_raw_json,
            )
            .await
            .map_err(log_status)?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters,
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
            .map_err(log_status)?;
        deadletters::refresh_gauge(&self.log, &self.metrics).await;
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
