//! Prometheus metrics (`GET /metrics`, OpenMetrics text), one registry per gateway.
//!
//! Series (all prefixed `spike_gateway_`):
//! - `webhooks_total{category, outcome}`: every webhook request and how it ended;
//! - `webhook_ack_seconds{category}`: request received → answered;
//! - `events_appended_total{event_type}`, `duplicates_total`, `dead_letters_total{category}`;
//! - `dead_letter_reasons_total{reason}`: newly stored dead letters by their closed reason;
//! - `dead_letters_stored`: dead letters in the log now (all replicas' on NATS);
//! - `subscribers`: open `Subscribe` streams;
//! - `subscriber_lag_events`: at each delivery, how far the event is behind the newest
//!   sequence this replica has seen;
//! - `delivery_seconds`: event received → sent to a subscriber (end to end);
//! - `event_log_commit_seconds`, `event_log_commit_events`: each successful commit of
//!   appends in the `embedded` log (its writes and fsync) and the new events it made
//!   durable; a slow disk shows here first. Empty on the other stores (NATS acknowledges
//!   each publish itself);
//! - `readiness{reason}`: 1 for the current readiness reason, 0 for earlier ones;
//! - `upstream_calls_total{rpc, status}`, `upstream_call_seconds{rpc}`: SpikeRecords calls;
//! - `grpc_server_requests_total{method, kind, code}`, `grpc_server_request_seconds{method,
//!   kind}`: every gRPC call the server handled, counted when it completes with its final
//!   status; the latency runs to that point, so for a stream it is the stream's lifetime
//!   (see [`crate::grpc::metered`]);
//! - `build_info{version, git_commit, rustc_version}`: always 1;
//! - `consumer_group_pending{group}`, `consumer_group_in_flight{group}` (gauges) and
//!   `consumer_group_{acks,naks,redeliveries,terminated,expired}_total{group}`, read from
//!   the groups at each scrape ([`groups`]).
//!
//! Labels are closed sets (categories, types, RPC names, status codes): never user ids.
//! The one open label, `group`, holds operator-chosen names and is capped at
//! [`groups::GROUP_SERIES`] values.

mod batched;
mod groups;

pub use batched::{BatchedHistogram, Tally};
pub use groups::{GROUP_SERIES, GroupSample, GroupSource, OTHER_GROUPS};

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    events::CommitObserver,
    proto::{EventType, WebhookCategory},
    wire::Reason,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    category: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabels {
    category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    event_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcOnly {
    rpc: &'static str,
}

/// A gRPC method as the server's services declare it, and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    kind: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcMethodLabels {
    method: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    git_commit: &'static str,
    rustc_version: &'static str,
}

/// The commit the binary was built from (`build.rs`), or `unknown`.
pub const GIT_COMMIT: &str = env!("SPIKE_GATEWAY_GIT_COMMIT");
/// The version of the compiler that built the binary, or `unknown`.
pub const RUSTC_VERSION: &str = env!("SPIKE_GATEWAY_RUSTC_VERSION");

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from 100 µs to ~50 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// The outcome of a webhook answered `200`.
pub const ACCEPTED: &str = "accepted";

/// `WebhookCategory` values (0 to 3); a value past them is counted without the cache.
const CATEGORIES: usize = 4;
/// `EventType` values (0 to 7); likewise.
const EVENT_TYPES: usize = 8;

/// Handles to the series every accepted webhook touches, resolved on first use: a family
/// lookup hashes the labels and takes a lock, several times per request otherwise. Filled
/// lazily so a series still appears only once something counted in it.
#[derive(Default)]
struct Cached {
    accepted: [OnceLock<Counter>; CATEGORIES],
    ack: [OnceLock<Histogram>; CATEGORIES],
    appended: [OnceLock<Counter>; EVENT_TYPES],
}

/// One subscriber's deliveries not yet added to the series.
#[derive(Debug, Clone)]
pub struct DeliveryTally {
    lag: Tally,
    age: Tally,
}

pub struct Metrics {
    registry: Registry,
    webhooks: Family<WebhookLabels, Counter>,
    webhook_ack: HistogramFamily<CategoryLabels>,
    appended: Family<TypeLabels, Counter>,
    duplicates: Counter,
    dead_letters: Family<CategoryLabels, Counter>,
    dead_letter_reasons: Family<ReasonLabels, Counter>,
    dead_letters_stored: Gauge,
    subscribers: Gauge,
    /// Both delivery histograms are batched: they are observed once per delivery to every
    /// subscriber, the hottest path in the gateway.
    subscriber_lag: BatchedHistogram,
    delivery: BatchedHistogram,
    /// Shared with the log's writer thread, which observes them once per commit.
    commits: Arc<CommitSeries>,
    upstream_calls: Family<RpcLabels, Counter>,
    upstream_latency: HistogramFamily<RpcOnly>,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_latency: HistogramFamily<GrpcMethodLabels>,
    /// Newest sequence this replica has appended or delivered, for the lag histogram.
    head: AtomicU64,
    cached: Cached,
    readiness: Family<ReasonLabels, Gauge>,
    /// The consumer groups' series, refreshed from `group_source` at each scrape.
    groups: Arc<groups::GroupSeries>,
    /// Set once by the service that holds the groups (none on a store without them).
    group_source: OnceLock<Arc<dyn GroupSource>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("spike_gateway");
        let metrics = Self {
            webhooks: Family::default(),
            webhook_ack: Family::new_with_constructor(latency_histogram),
            appended: Family::default(),
            duplicates: Counter::default(),
            dead_letters: Family::default(),
            dead_letter_reasons: Family::default(),
            dead_letters_stored: Gauge::default(),
            subscribers: Gauge::default(),
            subscriber_lag: BatchedHistogram::new(exponential_buckets(1.0, 4.0, 12)),
            delivery: BatchedHistogram::new(exponential_buckets(0.0001, 2.0, 20)),
            commits: Arc::new(CommitSeries {
                latency: latency_histogram(),
                // 0 (a retry's duplicates, or dead letters only), then 1 to 2,048: a commit
                // folds at most 512 requests, of a few events each.
                events: Histogram::new(
                    std::iter::once(0.0).chain(exponential_buckets(1.0, 2.0, 12)),
                ),
            }),
            upstream_calls: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            grpc_requests: Family::default(),
            grpc_latency: Family::new_with_constructor(latency_histogram),
            head: AtomicU64::new(0),
            cached: Cached::default(),
            readiness: Family::default(),
            groups: Arc::default(),
            group_source: OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register(
            "webhooks",
            "Webhook requests by category and outcome",
            metrics.webhooks.clone(),
        );
        registry.register(
            "webhook_ack_seconds",
            "Webhook received to answered",
            metrics.webhook_ack.clone(),
        );
        registry.register(
            "events_appended",
            "Events appended to the log, by type",
            metrics.appended.clone(),
        );
        registry.register(
            "duplicates",
            "Redelivered events acknowledged without a new event",
            metrics.duplicates.clone(),
        );
        registry.register(
            "dead_letters",
            "Signed items kept as dead letters, by path category",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "dead_letter_reasons",
            "Newly stored dead letters, by reason",
            metrics.dead_letter_reasons.clone(),
        );
        registry.register(
            "dead_letters_stored",
            "Dead letters in the log",
            metrics.dead_letters_stored.clone(),
        );
        registry.register(
            "subscribers",
            "Open Subscribe streams",
            metrics.subscribers.clone(),
        );
        registry.register(
            "subscriber_lag_events",
            "At delivery, events between the delivered one and the newest seen",
            metrics.subscriber_lag.clone(),
        );
        registry.register(
            "delivery_seconds",
            "Event received to sent to a subscriber",
            metrics.delivery.clone(),
        );
        registry.register(
            "event_log_commit_seconds",
            "Successful commits of webhook appends in the embedded log, writes and fsync together",
            metrics.commits.latency.clone(),
        );
        registry.register(
            "event_log_commit_events",
            "New events each commit of webhook appends in the embedded log made durable",
            metrics.commits.events.clone(),
        );
        registry.register(
            "upstream_calls",
            "Calls to Spike's API by RPC and resulting gRPC status",
            metrics.upstream_calls.clone(),
        );
        registry.register(
            "upstream_call_seconds",
            "SpikeRecords call latency, retries included",
            metrics.upstream_latency.clone(),
        );
        registry.register(
            "grpc_server_requests",
            "gRPC calls handled, by method and final status, counted when they complete",
            metrics.grpc_requests.clone(),
        );
        registry.register(
            "grpc_server_request_seconds",
            "gRPC call received to final status (a stream's end for streaming RPCs)",
            metrics.grpc_latency.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                git_commit: GIT_COMMIT,
                rustc_version: RUSTC_VERSION,
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the labels say which build this is",
            build_info,
        );
        registry.register(
            "readiness",
            "1 for the current readiness reason (ready, shutting_down, storage_write_failing, \
             storage_damaged, store_unreachable, closed)",
            metrics.readiness.clone(),
        );
        registry.register_collector(Box::new(metrics.groups.clone()));
        Self {
            registry,
            ..metrics
        }
    }
}

/// The commit series alone, for the log to hold: not the whole [`Metrics`], which holds
/// the consumer groups, which hold the log (a cycle that would keep the log open).
/// Observed once per commit (about a thousand a second at most), so the histograms' own
/// lock sees no contention.
struct CommitSeries {
    latency: Histogram,
    events: Histogram,
}

impl CommitObserver for CommitSeries {
    fn committed(&self, events: usize, took: Duration) {
        self.latency.observe(took.as_secs_f64());
        self.events.observe(events as f64);
    }
}

fn category(category: WebhookCategory) -> &'static str {
    match category {
        WebhookCategory::Main => "main",
        WebhookCategory::LabReports => "lab_reports",
        WebhookCategory::NutritionRecords => "nutrition_records",
        WebhookCategory::Unspecified => "unspecified",
    }
}

impl Metrics {
    /// What the `embedded` log reports each commit to.
    pub fn commit_observer(&self) -> Arc<dyn CommitObserver> {
        self.commits.clone()
    }

    /// Where scrapes read the consumer groups from; the first call wins (one gateway
    /// has one group service).
    pub fn set_group_source(&self, source: Arc<dyn GroupSource>) {
        let _ = self.group_source.set(source);
    }

    /// A scrape: reads the consumer groups (if any), then renders everything.
    pub async fn scrape(&self) -> String {
        if let Some(source) = self.group_source.get() {
            self.groups.set(source.samples().await);
        }
        self.render()
    }

    /// The registry in OpenMetrics text, with the groups as the last scrape read them.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    pub fn webhook(&self, path: WebhookCategory, outcome: &'static str, took: Duration) {
        let category = category(path);
        let counter = || {
            self.webhooks
                .get_or_create(&WebhookLabels { category, outcome })
                .clone()
        };
        match self.cached.accepted.get(path as usize) {
            Some(slot) if outcome == ACCEPTED => slot.get_or_init(counter).inc(),
            _ => counter().inc(),
        };
        let histogram = || {
            self.webhook_ack
                .get_or_create(&CategoryLabels { category })
                .clone()
        };
        match self.cached.ack.get(path as usize) {
            Some(slot) => slot.get_or_init(histogram).observe(took.as_secs_f64()),
            None => histogram().observe(took.as_secs_f64()),
        }
    }

    pub fn appended(&self, event_type: i32, sequence: u64) {
        let event_type = EventType::try_from(event_type).unwrap_or(EventType::Unspecified);
        let counter = || {
            self.appended
                .get_or_create(&TypeLabels {
                    event_type: event_type.as_str_name(),
                })
                .clone()
        };
        match self.cached.appended.get(event_type as usize) {
            Some(slot) => slot.get_or_init(counter).inc(),
            None => counter().inc(),
        };
        self.head.fetch_max(sequence, Ordering::Relaxed);
    }

    pub fn duplicates(&self, count: u64) {
        self.duplicates.inc_by(count);
    }

    /// One newly stored dead letter (not a retry's duplicate of one).
    pub fn dead_letter(&self, path: WebhookCategory, reason: Reason) {
        self.dead_letters
            .get_or_create(&CategoryLabels {
                category: category(path),
            })
            .inc();
        self.dead_letter_reasons
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn dead_letters_stored(&self, count: u64) {
        self.dead_letters_stored
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The open-subscriber gauge, shared with the Subscribe service.
    pub fn subscribers(&self) -> Gauge {
        self.subscribers.clone()
    }

    /// A subscriber's own tally of its deliveries, added to the series by
    /// [`Metrics::add_deliveries`] once per batch.
    pub fn delivery_tally(&self) -> DeliveryTally {
        DeliveryTally {
            lag: self.subscriber_lag.tally(),
            age: self.delivery.tally(),
        }
    }

    /// The newest sequence seen, once `sequence` is counted in: the head a batch that
    /// ends at `sequence` measures its lag from.
    pub fn head_through(&self, sequence: u64) -> u64 {
        self.head
            .fetch_max(sequence, Ordering::Relaxed)
            .max(sequence)
    }

    /// One event sent to a subscriber, `age` after the gateway received it, with `head`
    /// from [`Metrics::head_through`]. Counted into `tally` only (no shared write).
    pub fn delivered(&self, tally: &mut DeliveryTally, head: u64, sequence: u64, age: Duration) {
        self.subscriber_lag
            .observe(&mut tally.lag, head.saturating_sub(sequence) as f64);
        self.delivery.observe(&mut tally.age, age.as_secs_f64());
    }

    /// Adds a batch's deliveries to the series and empties `tally`.
    pub fn add_deliveries(&self, tally: &mut DeliveryTally) {
        self.subscriber_lag.add(&mut tally.lag);
        self.delivery.add(&mut tally.age);
    }

    /// Readiness changed from `previous` to `current` (see [`crate::readiness`]).
    pub fn readiness(&self, previous: Option<&'static str>, current: &'static str) {
        if let Some(previous) = previous {
            self.readiness
                .get_or_create(&ReasonLabels { reason: previous })
                .set(0);
        }
        self.readiness
            .get_or_create(&ReasonLabels { reason: current })
            .set(1);
    }

    pub fn upstream(&self, rpc: &'static str, status: tonic::Code, took: Duration) {
        self.upstream_calls
            .get_or_create(&RpcLabels {
                rpc,
                status: code_name(status),
            })
            .inc();
        self.upstream_latency
            .get_or_create(&RpcOnly { rpc })
            .observe(took.as_secs_f64());
    }

    /// One gRPC call the server handled: `method` and `kind` from [`crate::grpc::metered`]'s
    /// closed table, `code` its final status, `took` from request to that status.
    pub fn grpc_request(
        &self,
        method: &'static str,
        kind: &'static str,
        code: tonic::Code,
        took: Duration,
    ) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method,
                kind,
                code: code_name(code),
            })
            .inc();
        self.grpc_latency
            .get_or_create(&GrpcMethodLabels { method, kind })
            .observe(took.as_secs_f64());
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
