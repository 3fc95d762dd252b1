//! Wiring: opens the log, binds both listeners, runs the servers, and shuts down in order.
//!
//! Shutdown order (SIGTERM/SIGINT, or the future given to [`Application::run`]):
//! 1. webhooks answer 503 and health reports NOT_SERVING, so Spike and load balancers back off;
//! 2. open `Subscribe` streams end with `UNAVAILABLE` (clients resume with `after_sequence`);
//! 3. both servers stop accepting and finish in-flight requests (appends complete and are
//!    acknowledged);
//! 4. the log commits what is queued and closes.
//!
//! Steps 2–4 share one grace deadline; past it the process exits anyway, and anything not
//! yet acknowledged is retried by Spike.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, StoreKind},
    deadletters,
    events::{
        EventLog, LogError,
        consumers::{ConsumerGroups, Groups},
        embedded::EmbeddedLog,
        memory::MemoryLog,
        nats::{NatsLog, NatsSettings},
        nats_groups::NatsGroups,
    },
    grpc::{self, GrpcParts, event_stream::SubscriberCount},
    metrics::Metrics,
    spike::{SpikeClient, SpikeError},
    webhook::{self, BodyBudget, WebhookState, server::ServerLimits, signature::Verifier},
};

/// How often retention and dedup expiry run.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the event log: {0}")]
    Log(#[from] LogError),
    #[error("cannot set up the Spike client: {0}")]
    Spike(#[from] SpikeError),
    #[error("gRPC TLS: {0}")]
    Tls(String),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Grpc(tonic::transport::Error),
    /// A server task panicked or was cancelled; `server` names which.
    #[error("{server} server task failed: {reason}")]
    Task {
        server: &'static str,
        reason: String,
    },
}

/// A gateway with its listeners bound and its log open, ready to [`run`](Self::run).
pub struct Application {
    config: Config,
    log: Arc<dyn EventLog>,
    /// The same log when it is NATS: its consumer groups are JetStream's.
    nats: Option<Arc<NatsLog>>,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    spike: Arc<SpikeClient>,
    metrics: Arc<Metrics>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let metrics = Arc::new(Metrics::default());
        let (log, nats) = open_log(&config, &metrics).await?;
        // Letters stored by 0.1 recorded no user ids: find them now, before erasure can run.
        let backfilled = deadletters::backfill_user_ids(log.as_ref()).await?;
        if backfilled > 0 {
            tracing::info!(
                letters = backfilled,
                "recorded the user ids of dead letters stored by 0.1"
            );
        }
        deadletters::refresh_gauge(&log, &metrics).await;
        let spike = Arc::new(SpikeClient::new(&config.spike)?);
        if !config.grpc_addr.ip().is_loopback() && config.grpc.tls.is_none() {
            tracing::warn!(
                grpc = %config.grpc_addr,
                "gRPC without TLS on a non-loopback address: bearer tokens and health data cross \
                 the network in cleartext; set GATEWAY_GRPC_TLS_CERT/KEY or terminate TLS in front"
            );
        }
        let tls = match &config.grpc.tls {
            Some(files) => Some(grpc::tls_config(files).map_err(StartupError::Tls)?),
            None => None,
        };
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartupError::Bind { what, addr, source })
        };
        let http_listener = bind("HTTP", config.http_addr).await?;
        let grpc_listener = bind("gRPC", config.grpc_addr).await?;
        Ok(Self {
            config,
            log,
            nats,
            http_listener,
            grpc_listener,
            spike,
            metrics,
            tls,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The event log, for in-process inspection (tests, embedding).
    pub fn log(&self) -> Arc<dyn EventLog> {
        self.log.clone()
    }

    /// Open `Subscribe` streams; shared, so it stays readable while [`run`](Self::run) runs.
    pub fn subscribers(&self) -> SubscriberCount {
        SubscriberCount::new(self.metrics.subscribers())
    }

    /// Serves until `shutdown` completes, then shuts down in order (see the module docs).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunError> {
        let Self {
            config,
            log,
            nats,
            http_listener,
            grpc_listener,
            spike,
            metrics,
            tls,
        } = self;
        let accepting = Arc::new(AtomicBool::new(true));
        let streams_shutdown = CancellationToken::new();
        let stop_servers = CancellationToken::new();

        let health_reporter = tonic_health::server::HealthReporter::new();
        let health =
            tonic_health::server::HealthService::from_health_reporter(health_reporter.clone());
        // From the first request on, gRPC health says what /readyz says.
        let initial = crate::readiness::status(&accepting, log.as_ref());
        grpc::set_serving(&health_reporter, initial.ready).await;

        tracing::info!(
            http = %http_listener.local_addr().map_err(RunError::Http)?,
            grpc = %grpc_listener.local_addr().map_err(RunError::Http)?,
            store = ?config.store.kind,
            "spike-gateway listening"
        );

        let router = webhook::router(WebhookState {
            log: log.clone(),
            verifier: Verifier::new(&config.webhook.signature_keys),
            max_body_bytes: config.webhook.max_body_bytes,
            body_budget: BodyBudget::new(config.webhook.body_budget_bytes),
            accepting: accepting.clone(),
            metrics: metrics.clone(),
            request_timeout: config.webhook.request_timeout,
        });
        let mut http: JoinHandle<Result<(), RunError>> = tokio::spawn({
            let stop = stop_servers.clone().cancelled_owned();
            let limits = ServerLimits {
                header_timeout: config.webhook.header_timeout,
                max_connections: config.webhook.max_connections,
            };
            async move {
                webhook::server::serve(http_listener, router, limits, stop)
                    .await
                    .map_err(RunError::Http)
            }
        });
        let metrics_for_housekeeping = metrics.clone();
        let readiness_metrics = metrics.clone();
        let mut grpc_task: JoinHandle<Result<(), RunError>> = tokio::spawn({
            let parts = GrpcParts {
                log: log.clone(),
                tokens: config.grpc.tokens.clone(),
                admin_tokens: config.grpc.admin_tokens.clone(),
                groups: consumer_groups(&log, nats, config.grpc.group_limits, &streams_shutdown),
                streams_shutdown: streams_shutdown.clone(),
                spike,
                metrics,
                tls,
                limits: config.grpc.limits.clone(),
            };
            let stop = stop_servers.clone().cancelled_owned();
            async move {
                grpc::serve(grpc_listener, parts, health, stop)
                    .await
                    .map_err(RunError::Grpc)
            }
        });
        let housekeeping = tokio::spawn(housekeep(
            log.clone(),
            metrics_for_housekeeping,
            stop_servers.clone(),
        ));
        let readiness = tokio::spawn(report_readiness(
            ReadinessFeed {
                log: log.clone(),
                accepting: accepting.clone(),
                reporter: health_reporter.clone(),
                metrics: readiness_metrics,
                initial,
            },
            stop_servers.clone(),
        ));

        let mut failure = None;
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested"),
            result = &mut http => failure = Some(joined("HTTP", result)),
            result = &mut grpc_task => failure = Some(joined("gRPC", result)),
        }

        accepting.store(false, std::sync::atomic::Ordering::Release);
        grpc::set_serving(&health_reporter, false).await;
        streams_shutdown.cancel();
        stop_servers.cancel();
        let drain = async {
            if !http.is_finished() {
                let _ = (&mut http).await;
            }
            if !grpc_task.is_finished() {
                let _ = (&mut grpc_task).await;
            }
            let _ = housekeeping.await;
            let _ = readiness.await;
            log.close().await;
        };
        if tokio::time::timeout(config.shutdown_grace, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?config.shutdown_grace,
                "shutdown grace period over; exiting with work unfinished (unacknowledged webhooks are retried by Spike)"
            );
        } else {
            tracing::info!("shutdown complete");
        }
        match failure {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

/// A server task's outcome, a panic attributed to the server that panicked.
fn joined(
    server: &'static str,
    result: Result<Result<(), RunError>, tokio::task::JoinError>,
) -> Result<(), RunError> {
    match result {
        Ok(inner) => inner,
        Err(e) => Err(RunError::Task {
            server,
            reason: if e.is_panic() {
                "panicked".to_owned()
            } else {
                e.to_string()
            },
        }),
    }
}

/// The consumer groups of the log: JetStream's on NATS, the local service otherwise.
fn consumer_groups(
    log: &Arc<dyn EventLog>,
    nats: Option<Arc<NatsLog>>,
    limits: crate::events::groups::Limits,
    shutdown: &CancellationToken,
) -> Option<Arc<dyn Groups>> {
    if let Some(nats) = nats {
        return Some(Arc::new(NatsGroups::new(nats, limits, shutdown.clone())));
    }
    log.clone().backend().local().map(|local| {
        Arc::new(ConsumerGroups::new(local, limits, shutdown.clone())) as Arc<dyn Groups>
    })
}

/// Opens the configured log; the NATS one is also returned as itself, for its groups.
async fn open_log(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<dyn EventLog>, Option<Arc<NatsLog>>), StartupError> {
    let store = &config.store;
    Ok(match store.kind {
        StoreKind::Embedded => {
            let (dir, window, retention, check) = (
                store.data_dir.clone(),
                store.dedup_window,
                store.retention,
                store.check_on_start,
            );
            // Opening checks, and may repair, the file: keep it off the runtime.
            let log = tokio::task::spawn_blocking(move || {
                EmbeddedLog::open_with(&dir, window, retention, check)
            })
            .await
            .map_err(|e| LogError::Storage(format!("log opener failed: {e}")))??;
            log.observe_commits(metrics.commit_observer());
            (Arc::new(log), None)
        }
        StoreKind::Memory => (
            Arc::new(MemoryLog::new(
                store.memory_capacity,
                store.dedup_window,
                store.retention,
            )),
            None,
        ),
        StoreKind::Nats => {
            let log = NatsLog::connect(NatsSettings {
                url: store.nats_url.clone().unwrap_or_default(),
                stream: store.nats_stream.clone(),
                subject_prefix: store.nats_subject_prefix.clone(),
                dedup_window: store.dedup_window,
                retention: store.retention,
            })
            .await?;
            if config.webhook.max_body_bytes > log.max_payload() {
                tracing::warn!(
                    max_body_bytes = config.webhook.max_body_bytes,
                    nats_max_payload = log.max_payload(),
                    "a webhook item larger than NATS's max_payload cannot be stored and will get 503: \
                     lower GATEWAY_MAX_BODY_BYTES or raise max_payload on the NATS server"
                );
            }
            let log = Arc::new(log);
            (log.clone(), Some(log))
        }
    })
}

async fn housekeep(log: Arc<dyn EventLog>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {
                if let Err(e) = log.housekeeping().await {
                    tracing::warn!(error = %e, "event log housekeeping failed; will retry");
                }
                // Retention removes letters too (and on NATS, other replicas store them).
                deadletters::refresh_gauge(&log, &metrics).await;
            }
        }
    }
}

/// What the gRPC health reporter follows, and where it reports changes.
struct ReadinessFeed {
    log: Arc<dyn EventLog>,
    accepting: Arc<AtomicBool>,
    reporter: tonic_health::server::HealthReporter,
    metrics: Arc<Metrics>,
    /// What gRPC health was set to before serving began.
    initial: crate::readiness::ReadyStatus,
}

/// Keeps `grpc.health.v1` in step with [`crate::readiness::status`], the answer `/readyz`
/// gives: NOT_SERVING while the log cannot take writes, with the reason logged and in the
/// `readiness` metric.
async fn report_readiness(feed: ReadinessFeed, stop: CancellationToken) {
    let mut current = feed.initial.clone();
    feed.metrics.readiness(None, current.reason);
    let mut ticks = tokio::time::interval(crate::readiness::CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let status = crate::readiness::status(&feed.accepting, feed.log.as_ref());
        if status.reason == current.reason {
            continue;
        }
        if status.ready {
            tracing::info!(previously = current.reason, "event log ready again");
        } else {
            tracing::warn!(
                reason = status.reason,
                detail = status.detail.as_deref().unwrap_or(""),
                "not ready; reporting NOT_SERVING"
            );
        }
        if status.ready != current.ready {
            grpc::set_serving(&feed.reporter, status.ready).await;
        }
        feed.metrics.readiness(Some(current.reason), status.reason);
        current = status;
    }
}

/// The process's exit deadline: `GATEWAY_SHUTDOWN_GRACE` after shutdown begins (SIGTERM,
/// SIGINT or a server failure). [`Application::run`] drains within it; what is left of it
/// bounds the runtime's shutdown ([`ExitDeadline::remaining`]); and a watchdog thread
/// ends the process [`HARD_EXIT_MARGIN`] past it if anything still holds it, such as a
/// blocking call that never returns.
#[derive(Debug, Clone)]
pub struct ExitDeadline {
    grace: Duration,
    at: Arc<std::sync::OnceLock<std::time::Instant>>,
}

/// How long past the grace the watchdog waits for an orderly exit before forcing one.
pub const HARD_EXIT_MARGIN: Duration = Duration::from_millis(500);

impl ExitDeadline {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            at: Arc::default(),
        }
    }

    /// Completes with `shutdown`, arming the deadline as it does, or when it is dropped:
    /// [`Application::run`] drops it when a server fails, which begins shutdown too.
    pub fn armed_after(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = ()> + Send {
        let armed = ArmOnDrop(self.clone());
        async move {
            let _armed = armed;
            shutdown.await;
        }
    }

    /// Starts the clock (once) and the watchdog that enforces it.
    pub fn arm(&self) {
        let mut armed = false;
        let at = *self.at.get_or_init(|| {
            armed = true;
            std::time::Instant::now() + self.grace
        });
        if !armed {
            return;
        }
        let grace = self.grace;
        let watchdog = std::thread::Builder::new()
            .name("exit-watchdog".into())
            .spawn(move || {
                std::thread::sleep(
                    (at + HARD_EXIT_MARGIN).saturating_duration_since(std::time::Instant::now()),
                );
                tracing::error!(
                    ?grace,
                    "shutdown grace period over and the process still running; exiting now"
                );
                std::process::exit(1);
            });
        if let Err(e) = watchdog {
            tracing::warn!(error = %e, "cannot start the exit watchdog; exit is not bounded");
        }
    }

    /// Time left before the deadline (arming it now if shutdown began otherwise).
    pub fn remaining(&self) -> Duration {
        self.arm();
        let at = *self.at.get().expect("armed above");
        at.saturating_duration_since(std::time::Instant::now())
    }
}

/// Arms its deadline when dropped, however the future holding it ends.
struct ArmOnDrop(ExitDeadline);

impl Drop for ArmOnDrop {
    fn drop(&mut self) {
        self.0.arm();
    }
}

/// Registers SIGTERM and SIGINT handlers now and completes on the first of them.
///
/// Registration happens in this call, not when the future is first polled: a signal that
/// arrives while the gateway is still starting must shut it down cleanly, not kill it.
/// Call it from inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    tracing::warn!("cannot install signal handlers; stop the gateway with SIGKILL");
                    std::future::pending::<()>().await
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_server_task_is_named_as_such() {
        let panicked = tokio::spawn(async { panic!("boom") }).await;
        let Err(e) = joined("gRPC", panicked.map(|()| Ok(()))) else {
            panic!("a panic is a failure");
        };
        assert_eq!(e.to_string(), "gRPC server task failed: panicked");
    }

    #[test]
    fn the_exit_deadline_counts_from_when_it_is_armed() {
        let deadline = ExitDeadline::new(Duration::from_secs(3600));
        let remaining = deadline.remaining();
        assert!(remaining > Duration::from_secs(3590) && remaining <= Duration::from_secs(3600));
        // Arming again does not move it.
        deadline.arm();
        assert!(deadline.remaining() <= remaining);
    }
}
