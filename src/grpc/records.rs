//! `spike.gateway.v1.SpikeRecords`: unary proxies to Spike's REST API (SPEC §4.2).
//!
//! Every request is validated before anything leaves the gateway. With `await_result`, an
//! upload subscribes to the gateway's own log *before* uploading (so a webhook faster than
//! Spike's HTTP answer is not missed), uploads without waiting, and answers with the
//! completed/failed webhook for the new record; near the deadline it falls back to one
//! look-up instead.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{
    deadline::{self, within},
    validate::{
        LAB_MIME_TYPES, encode_upload, validate_nutrition_fields, validate_range,
        validate_record_id, validate_user_id,
    },
};
use crate::{
    events::{
        EventLog,
        subscription::{self, Feed, Filter, Start},
    },
    metrics::Metrics,
    proto::{
        Event, EventType, GetLabReportRequest, GetNutritionRecordRequest, LabReportResult,
        ListLabReportsRequest, ListLabReportsResponse, ListNutritionRecordsRequest,
        ListNutritionRecordsResponse, NutritionResult, RecordStatus, UploadLabReportRequest,
        UploadNutritionImageRequest, event::Payload, spike_records_server::SpikeRecords,
    },
    spike::{LabReportUpload, NutritionImageUpload, SpikeClient, SpikeError, SpikeRecord, rfc3339},
};
use prost_types::Timestamp;

/// gRPC message limit for this service: a 10 MiB encoded upload is ~7.5 MiB raw, plus room.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

pub struct RecordsService {
    spike: Arc<SpikeClient>,
    log: Arc<dyn EventLog>,
    metrics: Arc<Metrics>,
}

impl RecordsService {
    pub fn new(spike: Arc<SpikeClient>, log: Arc<dyn EventLog>, metrics: Arc<Metrics>) -> Self {
        Self {
            spike,
            log,
            metrics,
        }
    }

    /// Runs one RPC and records its status and latency.
    async fn observe<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let result = call.await;
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.metrics.upstream(rpc, code, started.elapsed());
        result
    }
}

#[tonic::async_trait]
impl SpikeRecords for RecordsService {
    async fn upload_nutrition_image(
        &self,
        request: Request<UploadNutritionImageRequest>,
    ) -> Result<Response<NutritionResult>, Status> {
        self.observe(
            "UploadNutritionImage",
            self.upload_nutrition_image_call(request),
        )
        .await
    }

    async fn get_nutrition_record(
        &self,
        request: Request<GetNutritionRecordRequest>,
    ) -> Result<Response<NutritionResult>, Status> {
        self.observe(
            "GetNutritionRecord",
            self.get_call::<NutritionResult>(request),
        )
        .await
    }

    async fn list_nutrition_records(
        &self,
        request: Request<ListNutritionRecordsRequest>,
    ) -> Result<Response<ListNutritionRecordsResponse>, Status> {
        self.observe(
            "ListNutritionRecords",
            self.list_call::<NutritionResult>(request),
        )
        .await
    }

    async fn upload_lab_report(
        &self,
        request: Request<UploadLabReportRequest>,
    ) -> Result<Response<LabReportResult>, Status> {
        self.observe("UploadLabReport", self.upload_lab_report_call(request))
            .await
    }

    async fn get_lab_report(
        &self,
        request: Request<GetLabReportRequest>,
    ) -> Result<Response<LabReportResult>, Status> {
        self.observe("GetLabReport", self.get_call::<LabReportResult>(request))
            .await
    }

    async fn list_lab_reports(
        &self,
        request: Request<ListLabReportsRequest>,
    ) -> Result<Response<ListLabReportsResponse>, Status> {
        self.observe("ListLabReports", self.list_call::<LabReportResult>(request))
            .await
    }
}

/// The RPCs' bodies; [`SpikeRecords`] wraps each to record its metrics.
impl RecordsService {
    async fn upload_nutrition_image_call(
        &self,
        request: Request<UploadNutritionImageRequest>,
    ) -> Result<Response<NutritionResult>, Status> {
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        let user = r.application_user_id.as_str();
        validate_user_id(user)?;
        let body = encode_upload("image", &r.image)?;
        validate_nutrition_fields(&r.include_nutrition_fields)?;
        let wait_on_process = async_when_awaiting(r.await_result, r.wait_on_process)?;
        let upload = NutritionImageUpload {
            body,
            include_ingredients: r.include_ingredients,
            include_nutri_score: r.include_nutri_score,
            include_dish_description: r.include_dish_description,
            include_nutrition_fields: r.include_nutrition_fields,
            analysis_mode: non_empty(r.analysis_mode),
            country_code: non_empty(r.country_code),
            language_code: non_empty(r.language_code),
            consumed_at: r.consumed_at.as_ref().map(rfc3339),
            wait_on_process,
        };
        within(deadline, async {
            let result = self
                .upload_and_await(
                    r.await_result,
                    user,
                    deadline,
                    self.spike
                        .upload::<NutritionResult>(user, &upload, deadline),
                    |id| async move { self.spike.record(user, &id, deadline).await },
                )
                .await?;
            Ok(Response::new(result))
        })
        .await
    }

    async fn upload_lab_report_call(
        &self,
        request: Request<UploadLabReportRequest>,
    ) -> Result<Response<LabReportResult>, Status> {
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        let user = r.application_user_id.as_str();
        validate_user_id(user)?;
        if !LAB_MIME_TYPES.contains(&r.mime_type.as_str()) {
            return Err(Status::invalid_argument(format!(
                "mime_type must be one of {}",
                LAB_MIME_TYPES.join(", ")
            )));
        }
        let body = encode_upload("document", &r.document)?;
        let upload = LabReportUpload {
            mime_type: r.mime_type.clone(),
            body,
            filename: non_empty(r.filename.clone()),
            wait_on_process: async_when_awaiting(r.await_result, r.wait_on_process)?,
        };
        within(deadline, async {
            let result = self
                .upload_and_await(
                    r.await_result,
                    user,
                    deadline,
                    self.spike
                        .upload::<LabReportResult>(user, &upload, deadline),
                    |id| async move { self.spike.record(user, &id, deadline).await },
                )
                .await?;
            Ok(Response::new(result))
        })
        .await
    }

    /// `Get…`: one record by id, for either kind.
    async fn get_call<R: Proxied>(&self, request: Request<R::Get>) -> Result<Response<R>, Status> {
        let deadline = deadline::of(&request);
        let (user, record_id) = R::get_args(request.into_inner());
        validate_user_id(&user)?;
        validate_record_id(&record_id)?;
        within(deadline, async {
            let record = self.spike.record(&user, &record_id, deadline).await?;
            Ok(Response::new(record))
        })
        .await
    }

    /// `List…`: the user's records in a time range, for either kind.
    async fn list_call<R: Proxied>(
        &self,
        request: Request<R::List>,
    ) -> Result<Response<R::Listed>, Status> {
        let deadline = deadline::of(&request);
        let (user, from, to) = R::list_args(request.into_inner());
        validate_user_id(&user)?;
        let (from, to) = validate_range(from, to)?;
        within(deadline, async {
            let records = self.spike.records(&user, &from, &to, deadline).await?;
            Ok(Response::new(R::listed(records)))
        })
        .await
    }
}

impl RecordsService {
    /// Sends `upload`; with `await_result`, answers with the completed/failed webhook for the
    /// new record, or, if none has come near the deadline, with one `look_up`.
    ///
    /// `upload` is a future that has not run yet: the watch is opened first, so a webhook
    /// that beats Spike's HTTP answer is still seen.
    async fn upload_and_await<R, G>(
        &self,
        await_result: bool,
        user: &str,
        deadline: Instant,
        upload: impl Future<Output = Result<R, SpikeError>>,
        look_up: impl FnOnce(String) -> G,
    ) -> Result<R, Status>
    where
        R: Awaited,
        G: Future<Output = Result<R, SpikeError>>,
    {
        let mut watch = self.watch(await_result, user, R::EVENT_TYPES).await?;
        let uploaded = upload.await?;
        let Some(watch) = watch
            .as_mut()
            .filter(|_| !is_final(uploaded.record_status()))
        else {
            return Ok(uploaded);
        };
        let id = uploaded.id().to_owned();
        let delivered = watch
            .wait(fallback_at(deadline), |event| {
                R::in_event(event).filter(|r| r.id() == id).cloned()
            })
            .await?;
        match delivered {
            Some(result) => Ok(result),
            None => Ok(look_up(id).await?),
        }
    }

    /// With `await_result`, a live feed of the user's results of `types`, opened *before*
    /// the upload is sent.
    async fn watch(
        &self,
        await_result: bool,
        user: &str,
        types: [EventType; 2],
    ) -> Result<Option<ResultWatch>, Status> {
        if !await_result {
            return Ok(None);
        }
        let filter = Filter::new(&types.map(|t| t as i32), vec![user.to_owned()], Vec::new())
            .map_err(Status::internal)?;
        let feed = subscription::open(self.log.clone(), Start::Live, &filter)
            .await
            .map_err(|e| Status::unavailable(format!("cannot watch the event log: {e}")))?;
        Ok(Some(ResultWatch { feed }))
    }
}

/// A result an upload can wait for: its id, its status, and where events carry it.
trait Awaited: Clone {
    /// The event types that end the wait (completed, failed).
    const EVENT_TYPES: [EventType; 2];
    fn id(&self) -> &str;
    fn record_status(&self) -> RecordStatus;
    fn in_event(event: &Event) -> Option<&Self>;
}

impl Awaited for NutritionResult {
    const EVENT_TYPES: [EventType; 2] = [
        EventType::NutritionRecordCompleted,
        EventType::NutritionRecordFailed,
    ];

    fn id(&self) -> &str {
        &self.record_id
    }

    fn record_status(&self) -> RecordStatus {
        self.status()
    }

    fn in_event(event: &Event) -> Option<&Self> {
        match &event.payload {
            Some(Payload::NutritionResult(result)) => Some(result),
            _ => None,
        }
    }
}

impl Awaited for LabReportResult {
    const EVENT_TYPES: [EventType; 2] = [EventType::LabReportCompleted, EventType::LabReportFailed];

    fn id(&self) -> &str {
        &self.record_id
    }

    fn record_status(&self) -> RecordStatus {
        self.status()
    }

    fn in_event(event: &Event) -> Option<&Self> {
        match &event.payload {
            Some(Payload::LabReportResult(result)) => Some(result),
            _ => None,
        }
    }
}

/// A record kind's `Get…` and `List…` messages, so that one implementation of each RPC
/// serves both kinds.
trait Proxied: SpikeRecord + Send + 'static {
    type Get: Send;
    type List: Send;
    type Listed;
    /// `(application_user_id, record_id)`.
    fn get_args(request: Self::Get) -> (String, String);
    /// `(application_user_id, from_timestamp, to_timestamp)`.
    fn list_args(request: Self::List) -> (String, Option<Timestamp>, Option<Timestamp>);
    fn listed(records: Vec<Self>) -> Self::Listed;
}

impl Proxied for NutritionResult {
    type Get = GetNutritionRecordRequest;
    type List = ListNutritionRecordsRequest;
    type Listed = ListNutritionRecordsResponse;

    fn get_args(r: Self::Get) -> (String, String) {
        (r.application_user_id, r.record_id)
    }

    fn list_args(r: Self::List) -> (String, Option<Timestamp>, Option<Timestamp>) {
        (r.application_user_id, r.from_timestamp, r.to_timestamp)
    }

    fn listed(records: Vec<Self>) -> Self::Listed {
        ListNutritionRecordsResponse { records }
    }
}

impl Proxied for LabReportResult {
    type Get = GetLabReportRequest;
    type List = ListLabReportsRequest;
    type Listed = ListLabReportsResponse;

    fn get_args(r: Self::Get) -> (String, String) {
        (r.application_user_id, r.record_id)
    }

    fn list_args(r: Self::List) -> (String, Option<Timestamp>, Option<Timestamp>) {
        (r.application_user_id, r.from_timestamp, r.to_timestamp)
    }

    fn listed(records: Vec<Self>) -> Self::Listed {
        ListLabReportsResponse { records }
    }
}

/// Follows the gateway's log for one record's completed/failed webhook.
struct ResultWatch {
    feed: Box<dyn Feed>,
}

impl ResultWatch {
    /// The first event `pick` accepts, or `None` once `until` passes.
    async fn wait<T>(
        &mut self,
        until: Instant,
        pick: impl Fn(&Event) -> Option<T>,
    ) -> Result<Option<T>, Status> {
        loop {
            let batch = match tokio::time::timeout_at(until, self.feed.next_batch()).await {
                Err(_) => return Ok(None),
                Ok(batch) => batch.map_err(|e| {
                    Status::unavailable(format!("lost the event log while waiting: {e}"))
                })?,
            };
            if let Some(found) = batch.iter().find_map(|event| pick(event.event())) {
                return Ok(Some(found));
            }
        }
    }
}

/// When to stop waiting for the webhook and look the record up instead: leaves a quarter
/// of the remaining time (between 250 ms and 3 s) for that one look-up.
fn fallback_at(deadline: Instant) -> Instant {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let reserve = (remaining / 4).clamp(Duration::from_millis(250), Duration::from_secs(3));
    deadline.checked_sub(reserve).unwrap_or(deadline)
}

fn is_final(status: RecordStatus) -> bool {
    matches!(status, RecordStatus::Completed | RecordStatus::Failed)
}

/// `await_result` uploads asynchronously; asking Spike to hold the answer as well makes
/// no sense, so the combination is refused rather than silently changed.
fn async_when_awaiting(
    await_result: bool,
    wait_on_process: Option<bool>,
) -> Result<Option<bool>, Status> {
    match (await_result, wait_on_process) {
        (true, Some(true)) => Err(Status::invalid_argument(
            "await_result and wait_on_process cannot both be set: await_result already waits for the result",
        )),
        (true, _) => Ok(Some(false)),
        (false, wait) => Ok(wait),
    }
}

fn non_empty(value: String) -> Option<String> {
    Some(value).filter(|v| !v.is_empty())
}
