//! `spike.gateway.v1.Admin`: operator actions, behind their own bearer tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    events::EventLog,
    proto::{EraseUserRequest, EraseUserResponse, admin_server::Admin},
};

pub struct AdminService {
    log: Arc<dyn EventLog>,
}

impl AdminService {
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        Self { log }
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
        let erased = self
            .log
            .erase_user(&user)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // An audit record of who was erased and how much; no health data.
        tracing::info!(
            application_user_id = %user,
            events = erased.events,
            dedup_entries = erased.dedup_entries,
            dead_letters = erased.dead_letters,
            "user erased"
        );
        Ok(Response::new(EraseUserResponse {
            events_removed: erased.events,
            dedup_entries_removed: erased.dedup_entries,
            dead_letters_removed: erased.dead_letters,
        }))
    }
}
