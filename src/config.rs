//! Typed configuration: flags with environment fallbacks (SPEC §7 names are contract).
//!
//! [`Cli`] is the raw command line; [`Config::from_cli`] validates it into [`Config`], so the
//! rest of the program never sees an unchecked value. Every secret can come from the
//! variable itself or from a `..._FILE` path, and is held in [`Secret`], whose `Debug`
//! never shows it.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// Command line of the `spike-gateway` binary.
#[derive(Debug, Parser)]
#[command(
    name = "spike-gateway",
    version,
    about = "Spike webhooks in, typed gRPC streams out"
)]
pub struct Cli {
    /// Without a subcommand, the gateway serves.
    #[command(subcommand)]
    pub command: Option<Subcommand>,
    /// Address of the HTTP front (webhooks, /healthz, /readyz).
    #[arg(long, env = "GATEWAY_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Address of the gRPC server.
    #[arg(long, env = "GATEWAY_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Webhook signature key(s), comma-separated during a rotation.
    #[arg(long, env = "SPIKE_WEBHOOK_SIGNATURE_KEY", hide_env_values = true)]
    pub webhook_signature_key: Option<String>,
    /// File holding the webhook signature key(s), comma- or newline-separated.
    #[arg(long, env = "SPIKE_WEBHOOK_SIGNATURE_KEY_FILE")]
    pub webhook_signature_key_file: Option<PathBuf>,
    /// Base URL of Spike's REST API.
    #[arg(
        long,
        env = "SPIKE_API_BASE_URL",
        default_value = "https://app-api.spikeapi.com/v3"
    )]
    pub spike_api_base_url: String,
    /// Spike application id (needed only for the proxy RPCs).
    #[arg(long, env = "SPIKE_APPLICATION_ID")]
    pub spike_application_id: Option<u64>,
    /// Spike HMAC key used to obtain per-user tokens (needed only for the proxy RPCs).
    #[arg(long, env = "SPIKE_HMAC_KEY", hide_env_values = true)]
    pub spike_hmac_key: Option<String>,
    /// File holding the Spike HMAC key.
    #[arg(long, env = "SPIKE_HMAC_KEY_FILE")]
    pub spike_hmac_key_file: Option<PathBuf>,
    /// Event log backend.
    #[arg(long, env = "GATEWAY_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,
    /// Directory of the embedded event log.
    #[arg(long, env = "GATEWAY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// NATS server URL (GATEWAY_STORE=nats).
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// JetStream stream holding the events (dead letters go to `<name>_DEAD_LETTERS`).
    #[arg(long, env = "GATEWAY_NATS_STREAM", default_value = "SPIKE_EVENTS")]
    pub nats_stream: String,
    /// Subject prefix: events on `<prefix>.event.<type>.<user>`, dead letters on `<prefix>.dead.<category>`.
    #[arg(long, env = "GATEWAY_NATS_SUBJECT_PREFIX", default_value = "spike")]
    pub nats_subject_prefix: String,
    /// Bearer tokens accepted on the gRPC API, comma-separated. Unset = no gRPC auth.
    #[arg(long, env = "GATEWAY_GRPC_TOKENS", hide_env_values = true)]
    pub grpc_tokens: Option<String>,
    /// File holding the gRPC bearer tokens, comma- or newline-separated.
    #[arg(long, env = "GATEWAY_GRPC_TOKENS_FILE")]
    pub grpc_tokens_file: Option<PathBuf>,
    /// Bearer tokens for the Admin service (erasure), comma-separated. Unset = Admin disabled.
    #[arg(long, env = "GATEWAY_ADMIN_TOKENS", hide_env_values = true)]
    pub admin_tokens: Option<String>,
    /// File holding the Admin tokens.
    #[arg(long, env = "GATEWAY_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<PathBuf>,
    /// PEM certificate chain for gRPC over TLS (with --grpc-tls-key).
    #[arg(long, env = "GATEWAY_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key for gRPC over TLS.
    #[arg(long, env = "GATEWAY_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    #[arg(long, env = "GATEWAY_GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// Serve gRPC on a non-loopback address without tokens or mTLS anyway.
    #[arg(long, env = "GATEWAY_GRPC_ALLOW_INSECURE")]
    pub grpc_allow_insecure: bool,
    /// How long the HTTP front waits for a request's headers: from the connection's start,
    /// and between requests on a kept-alive connection (slow-loris and idle bound).
    #[arg(long, env = "GATEWAY_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// Open connections the HTTP front serves at once; past it, new ones get 503 and close.
    #[arg(long, env = "GATEWAY_HTTP_MAX_CONNECTIONS", default_value_t = 8192)]
    pub http_max_connections: usize,
    /// Webhook body bytes buffered at once across all requests; past it, 503 before reading more.
    #[arg(long, env = "GATEWAY_HTTP_BODY_BUDGET_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub http_body_budget_bytes: usize,
    /// Open connections the gRPC server serves at once; past it, new ones are closed.
    #[arg(long, env = "GATEWAY_GRPC_MAX_CONNECTIONS", default_value_t = 8192)]
    pub grpc_max_connections: usize,
    /// Concurrent HTTP/2 streams (RPCs) per gRPC connection.
    #[arg(
        long,
        env = "GATEWAY_GRPC_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 256
    )]
    pub grpc_max_streams_per_connection: u32,
    /// A gRPC connection from which nothing was read for this long is closed. Live clients
    /// answer the keepalive pings, so only silent or dead peers reach it.
    #[arg(long, env = "GATEWAY_GRPC_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub grpc_idle_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings on gRPC connections (shorter than the idle timeout).
    #[arg(long, env = "GATEWAY_GRPC_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grpc_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "GATEWAY_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub grpc_keepalive_timeout: Duration,
    /// Open `grpc.health.v1.Health/Watch` streams (unauthenticated) across all connections.
    #[arg(long, env = "GATEWAY_GRPC_MAX_HEALTH_WATCHES", default_value_t = 1024)]
    pub grpc_max_health_watches: usize,
    /// Most entries in each `Subscribe` filter list (event types, user ids, provider slugs).
    #[arg(
        long,
        env = "GATEWAY_SUBSCRIBE_MAX_FILTER_ITEMS",
        default_value_t = 1024
    )]
    pub subscribe_max_filter_items: usize,
    /// Longest user id or provider slug in a `Subscribe` filter, in bytes.
    #[arg(
        long,
        env = "GATEWAY_SUBSCRIBE_MAX_FILTER_ITEM_BYTES",
        default_value_t = 256
    )]
    pub subscribe_max_filter_item_bytes: usize,
    /// Event bytes each subscriber may hold in its catch-up page and, separately, in its
    /// queue to the client (an event larger than this still goes through, alone).
    #[arg(long, env = "GATEWAY_SUBSCRIBER_BUFFER_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub subscriber_buffer_bytes: usize,
    /// Longest a webhook request may take, body included (Spike gives up after 30 s).
    #[arg(long, env = "GATEWAY_HTTP_REQUEST_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub http_request_timeout: Duration,
    /// Largest `max_in_flight` a consumer-group member may ask for.
    #[arg(long, env = "GATEWAY_GROUP_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub group_max_in_flight: u32,
    /// Events a consumer group reads but holds back (redeliveries due later, per-user
    /// queues) before it pauses reading: bounds a group's memory.
    #[arg(long, env = "GATEWAY_GROUP_MAX_WAITING", default_value_t = 10_000)]
    pub group_max_waiting: usize,
    /// Largest accepted webhook body, in bytes.
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How long a delivered event is remembered to drop Spike's redeliveries (e.g. 72h).
    #[arg(long, env = "GATEWAY_DEDUP_WINDOW", default_value = "72h", value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,
    /// How long events are kept in the log (e.g. 7d).
    #[arg(long, env = "GATEWAY_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Verify every page of the embedded log at start-up and refuse a damaged file (about
    /// 2 s for a 150 MB log, measured in a debug build). `false` skips it; damage is then
    /// found only when a read meets it (streams end with DATA_LOSS).
    #[arg(long, env = "GATEWAY_LOG_CHECK_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub log_check_on_start: bool,
    /// Most events the `memory` store keeps before dropping the oldest.
    #[arg(long, env = "GATEWAY_MEMORY_CAPACITY", default_value_t = 100_000)]
    pub memory_capacity: usize,
    /// How long shutdown may take, blocking work included, before the process exits anyway.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Log output format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP collector for traces, all signals (`/v1/traces` is appended for http/protobuf).
    /// Unset (with the traces one): no tracing export at all.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// OTLP collector for traces, used as is; wins over OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otel_exporter_otlp_traces_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (the default, as the OpenTelemetry specification says).
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = "http/protobuf"
    )]
    pub otel_exporter_otlp_protocol: String,
    /// `service.name` of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "spike-gateway")]
    pub otel_service_name: String,
    /// always_on, always_off, traceidratio, parentbased_always_on (default),
    /// parentbased_always_off, parentbased_traceidratio.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub otel_traces_sampler: String,
    /// The ratio of the traceidratio samplers, 0.0 to 1.0 (default 1.0).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otel_traces_sampler_arg: Option<String>,
}

/// Maintenance commands of the binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Subcommand {
    /// Copy every readable event, dedup entry and dead letter of a damaged embedded log
    /// into a new data directory, keeping the sequences, and report what was unreadable.
    Salvage {
        /// Data directory of the damaged log (only read).
        #[arg(long)]
        from: PathBuf,
        /// New data directory to create the salvaged log in.
        #[arg(long)]
        to: PathBuf,
    },
}

/// What the command line asks the binary to do.
#[derive(Debug)]
pub enum Invocation {
    Serve(Box<Config>),
    Salvage { from: PathBuf, to: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Durable on local disk (redb); the default.
    Embedded,
    /// In process memory, bounded; for tests and throwaway runs.
    Memory,
    /// NATS JetStream, for several replicas.
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A secret value: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// Validated configuration of one gateway process.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub webhook: WebhookConfig,
    pub spike: SpikeConfig,
    pub store: StoreConfig,
    pub grpc: GrpcConfig,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// OpenTelemetry trace export; `None` (no endpoint set): no exporter and no layer.
    pub traces: Option<TracesConfig>,
}

/// Where and how spans are exported (the standard `OTEL_*` variables).
#[derive(Debug, Clone, PartialEq)]
pub struct TracesConfig {
    /// The full URL spans are sent to.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub sampler: TraceSampler,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// OTEL_TRACES_SAMPLER: the root decision, and whether a sampled or unsampled remote
/// parent (an incoming `traceparent`) overrides it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampler {
    /// Fraction of new traces kept, 0.0 to 1.0.
    pub ratio: f64,
    pub parent_based: bool,
}

impl TracesConfig {
    fn from_cli(cli: &Cli) -> Result<Option<Self>, ConfigError> {
        let protocol = match cli.otel_exporter_otlp_protocol.as_str() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            other => {
                return Err(ConfigError::Invalid {
                    name: "OTEL_EXPORTER_OTLP_PROTOCOL",
                    reason: format!("{other:?} is not one of grpc, http/protobuf"),
                });
            }
        };
        let endpoint = match (
            non_empty(cli.otel_exporter_otlp_traces_endpoint.as_deref()),
            non_empty(cli.otel_exporter_otlp_endpoint.as_deref()),
        ) {
            (Some(traces), _) => traces.to_owned(),
            (None, Some(base)) if protocol == OtlpProtocol::HttpProtobuf => {
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
            (None, Some(base)) => base.to_owned(),
            (None, None) => return Ok(None),
        };
        Ok(Some(Self {
            endpoint,
            protocol,
            service_name: cli.otel_service_name.clone(),
            sampler: TraceSampler::parse(
                &cli.otel_traces_sampler,
                cli.otel_traces_sampler_arg.as_deref(),
            )?,
        }))
    }
}

impl TraceSampler {
    fn parse(name: &str, arg: Option<&str>) -> Result<Self, ConfigError> {
        let ratio = match arg.filter(|a| !a.is_empty()) {
            None => 1.0,
            Some(arg) => arg
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| ConfigError::Invalid {
                    name: "OTEL_TRACES_SAMPLER_ARG",
                    reason: format!("{arg:?} is not a ratio from 0.0 to 1.0"),
                })?,
        };
        let (ratio, parent_based) = match name {
            "always_on" => (1.0, false),
            "always_off" => (0.0, false),
            "traceidratio" => (ratio, false),
            "parentbased_always_on" => (1.0, true),
            "parentbased_always_off" => (0.0, true),
            "parentbased_traceidratio" => (ratio, true),
            other => {
                return Err(ConfigError::Invalid {
                    name: "OTEL_TRACES_SAMPLER",
                    reason: format!("{other:?} is not a supported sampler"),
                });
            }
        };
        Ok(Self {
            ratio,
            parent_based,
        })
    }
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Every key a valid signature may be made with (more than one during a rotation).
    pub signature_keys: Vec<Secret>,
    pub max_body_bytes: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// Body bytes buffered at once across every webhook request.
    pub body_budget_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct SpikeConfig {
    pub api_base_url: String,
    pub application_id: Option<u64>,
    pub hmac_key: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub data_dir: PathBuf,
    pub nats_url: Option<String>,
    pub nats_stream: String,
    pub nats_subject_prefix: String,
    pub dedup_window: Duration,
    pub retention: Duration,
    pub memory_capacity: usize,
    /// Verify the whole embedded log when opening it.
    pub check_on_start: bool,
}

#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// Accepted bearer tokens; empty means the gRPC API is unauthenticated.
    pub tokens: Vec<Secret>,
    /// Tokens for the Admin service; empty means it refuses every call.
    pub admin_tokens: Vec<Secret>,
    pub tls: Option<TlsFiles>,
    pub limits: GrpcLimits,
    /// Bounds on each consumer group's memory.
    pub group_limits: crate::events::groups::Limits,
}

/// The gRPC server's bounds against hostile or unlucky clients (SPEC §6).
#[derive(Debug, Clone)]
pub struct GrpcLimits {
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_health_watches: usize,
    pub filter: FilterLimits,
    pub subscriber_buffer_bytes: usize,
}

/// Bounds on a `Subscribe` filter: entries per list and bytes per entry.
#[derive(Debug, Clone, Copy)]
pub struct FilterLimits {
    pub max_items: usize,
    pub max_item_bytes: usize,
}

/// Where the gRPC server's TLS material lives; read at start-up.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a client CA, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

/// Why the configuration was refused; printed as one line before a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("set either {0} or {1}, not both")]
    Conflicting(&'static str, &'static str),
    #[error("cannot read {name} from {path}: {source}")]
    UnreadableFile {
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
    /// A flag or variable clap could not parse; its first line, which names the value.
    #[error("{0} (see --help)")]
    Unparsable(String),
}

impl Config {
    /// Parses the process's flags and environment, then validates them. `--help` and
    /// `--version` print and exit here.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_cli(parse_cli()?)
    }

    /// Like [`Config::load`], or a maintenance command, which needs no serving settings.
    pub fn load_invocation() -> Result<Invocation, ConfigError> {
        let cli = parse_cli()?;
        match cli.command.clone() {
            Some(Subcommand::Salvage { from, to }) => Ok(Invocation::Salvage { from, to }),
            None => Self::from_cli(cli).map(|config| Invocation::Serve(Box::new(config))),
        }
    }

    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let traces = TracesConfig::from_cli(&cli)?;
        let signature_keys = secret_list(
            "SPIKE_WEBHOOK_SIGNATURE_KEY",
            cli.webhook_signature_key,
            "SPIKE_WEBHOOK_SIGNATURE_KEY_FILE",
            cli.webhook_signature_key_file,
        )?;
        if signature_keys.is_empty() {
            return Err(ConfigError::Missing(
                "SPIKE_WEBHOOK_SIGNATURE_KEY (or SPIKE_WEBHOOK_SIGNATURE_KEY_FILE)",
            ));
        }
        let hmac_key = secret_value(
            "SPIKE_HMAC_KEY",
            cli.spike_hmac_key,
            "SPIKE_HMAC_KEY_FILE",
            cli.spike_hmac_key_file,
        )?
        .map(Secret::new);
        let tokens = secret_list(
            "GATEWAY_GRPC_TOKENS",
            cli.grpc_tokens,
            "GATEWAY_GRPC_TOKENS_FILE",
            cli.grpc_tokens_file,
        )?;

        if !cli.spike_api_base_url.starts_with("http://")
            && !cli.spike_api_base_url.starts_with("https://")
        {
            return Err(ConfigError::Invalid {
                name: "SPIKE_API_BASE_URL",
                reason: "must start with http:// or https://".into(),
            });
        }
        if cli.max_body_bytes == 0 {
            return Err(invalid("GATEWAY_MAX_BODY_BYTES", "must be at least 1"));
        }
        if cli.group_max_in_flight == 0 {
            return Err(invalid("GATEWAY_GROUP_MAX_IN_FLIGHT", "must be at least 1"));
        }
        if cli.group_max_waiting == 0 {
            return Err(invalid("GATEWAY_GROUP_MAX_WAITING", "must be at least 1"));
        }
        if cli.memory_capacity == 0 {
            return Err(invalid("GATEWAY_MEMORY_CAPACITY", "must be at least 1"));
        }
        for (name, value) in [
            ("GATEWAY_HTTP_MAX_CONNECTIONS", cli.http_max_connections),
            ("GATEWAY_HTTP_BODY_BUDGET_BYTES", cli.http_body_budget_bytes),
            ("GATEWAY_GRPC_MAX_CONNECTIONS", cli.grpc_max_connections),
            (
                "GATEWAY_GRPC_MAX_STREAMS_PER_CONNECTION",
                cli.grpc_max_streams_per_connection as usize,
            ),
            (
                "GATEWAY_GRPC_MAX_HEALTH_WATCHES",
                cli.grpc_max_health_watches,
            ),
            (
                "GATEWAY_SUBSCRIBE_MAX_FILTER_ITEMS",
                cli.subscribe_max_filter_items,
            ),
            (
                "GATEWAY_SUBSCRIBE_MAX_FILTER_ITEM_BYTES",
                cli.subscribe_max_filter_item_bytes,
            ),
            (
                "GATEWAY_SUBSCRIBER_BUFFER_BYTES",
                cli.subscriber_buffer_bytes,
            ),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        if cli.http_body_budget_bytes < cli.max_body_bytes {
            return Err(invalid(
                "GATEWAY_HTTP_BODY_BUDGET_BYTES",
                "must be at least GATEWAY_MAX_BODY_BYTES, or no body of the largest size fits",
            ));
        }
        if cli.grpc_keepalive_interval >= cli.grpc_idle_timeout {
            return Err(invalid(
                "GATEWAY_GRPC_KEEPALIVE_INTERVAL",
                "must be shorter than GATEWAY_GRPC_IDLE_TIMEOUT, or idle but live clients are cut off",
            ));
        }
        for (name, value) in [
            ("GATEWAY_GRPC_IDLE_TIMEOUT", cli.grpc_idle_timeout),
            (
                "GATEWAY_GRPC_KEEPALIVE_INTERVAL",
                cli.grpc_keepalive_interval,
            ),
            ("GATEWAY_GRPC_KEEPALIVE_TIMEOUT", cli.grpc_keepalive_timeout),
            ("GATEWAY_DEDUP_WINDOW", cli.dedup_window),
            ("GATEWAY_RETENTION", cli.retention),
            ("GATEWAY_HTTP_HEADER_TIMEOUT", cli.http_header_timeout),
            ("GATEWAY_HTTP_REQUEST_TIMEOUT", cli.http_request_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(name, "must be longer than zero"));
            }
        }
        // An empty variable is as good as unset (`NATS_URL=` in a unit file, say).
        let nats_url = cli.nats_url.filter(|url| !url.trim().is_empty());
        match cli.store {
            StoreKind::Nats if nats_url.is_none() => {
                return Err(ConfigError::Missing("NATS_URL (GATEWAY_STORE=nats)"));
            }
            StoreKind::Nats | StoreKind::Embedded | StoreKind::Memory => {}
        }
        if cli.nats_stream.is_empty()
            || !cli
                .nats_stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "GATEWAY_NATS_STREAM",
                "must be letters, digits, '_' or '-'",
            ));
        }
        let prefix_ok = !cli.nats_subject_prefix.is_empty()
            && cli.nats_subject_prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if !prefix_ok {
            return Err(invalid(
                "GATEWAY_NATS_SUBJECT_PREFIX",
                "must be dot-separated tokens of letters, digits, '_' or '-'",
            ));
        }

        let admin_tokens = secret_list(
            "GATEWAY_ADMIN_TOKENS",
            cli.admin_tokens,
            "GATEWAY_ADMIN_TOKENS_FILE",
            cli.admin_tokens_file,
        )?;
        let tls = match (cli.grpc_tls_cert, cli.grpc_tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: cli.grpc_tls_client_ca,
            }),
            (None, None) if cli.grpc_tls_client_ca.is_some() => {
                return Err(invalid(
                    "GATEWAY_GRPC_TLS_CLIENT_CA",
                    "needs GATEWAY_GRPC_TLS_CERT and GATEWAY_GRPC_TLS_KEY",
                ));
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "GATEWAY_GRPC_TLS_CERT",
                    "set both GATEWAY_GRPC_TLS_CERT and GATEWAY_GRPC_TLS_KEY",
                ));
            }
        };
        let mutual_tls = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if !cli.grpc_addr.ip().is_loopback()
            && tokens.is_empty()
            && !mutual_tls
            && !cli.grpc_allow_insecure
        {
            return Err(invalid(
                "GATEWAY_GRPC_ADDR",
                &format!(
                    "refusing to serve health data on {} without authentication: set \
                     GATEWAY_GRPC_TOKENS or GATEWAY_GRPC_TLS_CLIENT_CA, or pass \
                     --grpc-allow-insecure",
                    cli.grpc_addr
                ),
            ));
        }

        Ok(Config {
            http_addr: cli.http_addr,
            grpc_addr: cli.grpc_addr,
            webhook: WebhookConfig {
                signature_keys,
                max_body_bytes: cli.max_body_bytes,
                header_timeout: cli.http_header_timeout,
                request_timeout: cli.http_request_timeout,
                max_connections: cli.http_max_connections,
                body_budget_bytes: cli.http_body_budget_bytes,
            },
            spike: SpikeConfig {
                api_base_url: cli.spike_api_base_url.trim_end_matches('/').to_owned(),
                application_id: cli.spike_application_id,
                hmac_key,
            },
            store: StoreConfig {
                kind: cli.store,
                data_dir: cli.data_dir,
                nats_url,
                nats_stream: cli.nats_stream,
                nats_subject_prefix: cli.nats_subject_prefix,
                dedup_window: cli.dedup_window,
                retention: cli.retention,
                memory_capacity: cli.memory_capacity,
                check_on_start: cli.log_check_on_start,
            },
            grpc: GrpcConfig {
                tokens,
                admin_tokens,
                tls,
                limits: GrpcLimits {
                    max_connections: cli.grpc_max_connections,
                    max_streams_per_connection: cli.grpc_max_streams_per_connection,
                    idle_timeout: cli.grpc_idle_timeout,
                    keepalive_interval: cli.grpc_keepalive_interval,
                    keepalive_timeout: cli.grpc_keepalive_timeout,
                    max_health_watches: cli.grpc_max_health_watches,
                    filter: FilterLimits {
                        max_items: cli.subscribe_max_filter_items,
                        max_item_bytes: cli.subscribe_max_filter_item_bytes,
                    },
                    subscriber_buffer_bytes: cli.subscriber_buffer_bytes,
                },
                group_limits: crate::events::groups::Limits {
                    max_in_flight: cli.group_max_in_flight,
                    max_waiting: cli.group_max_waiting,
                },
            },
            shutdown_grace: cli.shutdown_grace,
            log_format: cli.log_format,
            traces,
        })
    }
}

/// Parses the process's flags and environment; `--help` and `--version` print and exit.
fn parse_cli() -> Result<Cli, ConfigError> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            Err(ConfigError::Unparsable(
                first.trim_start_matches("error: ").to_owned(),
            ))
        }
    }
}

fn invalid(name: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.to_owned(),
    }
}

/// A secret given either directly or as a file path (never both).
fn secret_value(
    name: &'static str,
    value: Option<String>,
    file_name: &'static str,
    file: Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(ConfigError::Conflicting(name, file_name)),
        (Some(value), None) => Ok(Some(value.trim().to_owned()).filter(|v| !v.is_empty())),
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_owned()).filter(|v| !v.is_empty())),
            Err(source) => Err(ConfigError::UnreadableFile {
                name: file_name,
                path,
                source,
            }),
        },
        (None, None) => Ok(None),
    }
}

/// A list of secrets separated by commas or newlines, for rotation.
fn secret_list(
    name: &'static str,
    value: Option<String>,
    file_name: &'static str,
    file: Option<PathBuf>,
) -> Result<Vec<Secret>, ConfigError> {
    Ok(secret_value(name, value, file_name, file)?
        .map(|text| {
            text.split([',', '\n'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["spike-gateway"];
        argv.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn signature_key_is_required() {
        let err = parse(&[]).unwrap_err();
        assert!(
            err.to_string().contains("SPIKE_WEBHOOK_SIGNATURE_KEY"),
            "{err}"
        );
    }

    #[test]
    fn rotation_keys_are_split_and_trimmed() {
        let config = parse(&["--webhook-signature-key", " old , new ,"]).unwrap();
        let keys: Vec<_> = config
            .webhook
            .signature_keys
            .iter()
            .map(Secret::expose)
            .collect();
        assert_eq!(keys, ["old", "new"]);
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "k1\nk2\n").unwrap();
        let config = parse(&["--webhook-signature-key-file", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.webhook.signature_keys.len(), 2);

        let missing = dir.path().join("nope");
        let err = parse(&["--webhook-signature-key-file", missing.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read SPIKE_WEBHOOK_SIGNATURE_KEY_FILE")
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let config = parse(&[
            "--webhook-signature-key",
            "topsecret",
            "--grpc-tokens",
            "tok123",
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("topsecret") && !shown.contains("tok123"),
            "{shown}"
        );
    }

    #[test]
    fn zero_durations_and_nats_without_url_are_refused() {
        let err = parse(&["--webhook-signature-key", "k", "--retention", "0s"]).unwrap_err();
        assert!(err.to_string().contains("GATEWAY_RETENTION"));
        // `--nats-url ""` also shields the test from a NATS_URL in the environment (CI sets one).
        let err = parse(&[
            "--webhook-signature-key",
            "k",
            "--store",
            "nats",
            "--nats-url",
            "",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("NATS_URL"));
    }

    #[test]
    fn a_non_loopback_grpc_address_needs_auth_or_an_explicit_opt_out() {
        let open = [
            "--webhook-signature-key",
            "k",
            "--grpc-addr",
            "0.0.0.0:50051",
        ];
        let err = parse(&open).unwrap_err().to_string();
        assert!(
            err.contains("refusing") && err.contains("--grpc-allow-insecure"),
            "{err}"
        );
        assert!(parse(&[&open[..], &["--grpc-tokens", "t"]].concat()).is_ok());
        assert!(parse(&[&open[..], &["--grpc-allow-insecure"]].concat()).is_ok());
        let mtls = [
            "--grpc-tls-cert",
            "c.pem",
            "--grpc-tls-key",
            "k.pem",
            "--grpc-tls-client-ca",
            "ca.pem",
        ];
        assert!(parse(&[&open[..], &mtls[..]].concat()).is_ok());
        // TLS alone authenticates the server, not the client.
        assert!(parse(&[&open[..], &mtls[..4]].concat()).is_err());
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let err = parse(&["--webhook-signature-key", "k", "--grpc-tls-cert", "c.pem"]).unwrap_err();
        assert!(err.to_string().contains("GATEWAY_GRPC_TLS_KEY"), "{err}");
        let err = parse(&[
            "--webhook-signature-key",
            "k",
            "--grpc-tls-client-ca",
            "ca.pem",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("GATEWAY_GRPC_TLS_CERT"), "{err}");
    }

    #[test]
    fn traces_are_off_without_an_endpoint_and_follow_the_otel_variables() {
        let key = ["--webhook-signature-key", "k"];
        assert_eq!(parse(&key).unwrap().traces, None);
        let with = |extra: &[&str]| parse(&[&key[..], extra].concat());
        let http = with(&["--otel-exporter-otlp-endpoint", "http://c:4318/"]).unwrap();
        let http = http.traces.unwrap();
        assert_eq!(http.endpoint, "http://c:4318/v1/traces");
        assert_eq!(http.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(http.service_name, "spike-gateway");
        assert_eq!((http.sampler.ratio, http.sampler.parent_based), (1.0, true));
        let grpc = with(&[
            "--otel-exporter-otlp-endpoint",
            "http://c:4317",
            "--otel-exporter-otlp-traces-endpoint",
            "http://t:4317",
            "--otel-exporter-otlp-protocol",
            "grpc",
            "--otel-traces-sampler",
            "traceidratio",
            "--otel-traces-sampler-arg",
            "0.25",
        ])
        .unwrap()
        .traces
        .unwrap();
        assert_eq!(grpc.endpoint, "http://t:4317");
        assert_eq!(grpc.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            (grpc.sampler.ratio, grpc.sampler.parent_based),
            (0.25, false)
        );
        for bad in [
            ["--otel-exporter-otlp-protocol", "http/json"],
            ["--otel-traces-sampler", "sometimes"],
            ["--otel-traces-sampler-arg", "2"],
        ] {
            let e = with(&[&["--otel-exporter-otlp-endpoint", "http://c"][..], &bad].concat());
            assert!(matches!(e, Err(ConfigError::Invalid { .. })), "{bad:?}");
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = parse(&["--webhook-signature-key", "k"]).unwrap();
        assert_eq!(config.http_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(config.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(config.store.kind, StoreKind::Embedded);
        assert_eq!(config.store.dedup_window, Duration::from_secs(72 * 3600));
        assert_eq!(config.store.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.webhook.max_body_bytes, 2 * 1024 * 1024);
    }

    #[test]
    fn front_limits_default_to_bounded_values() {
        let config = parse(&["--webhook-signature-key", "k"]).unwrap();
        // Idle HTTP connections wait for a request head at most this long (SPEC §6: ≤ 30 s).
        assert_eq!(config.webhook.header_timeout, Duration::from_secs(10));
        assert_eq!(config.webhook.max_connections, 8192);
        assert_eq!(config.webhook.body_budget_bytes, 64 * 1024 * 1024);
        let grpc = &config.grpc.limits;
        assert_eq!(grpc.idle_timeout, Duration::from_secs(30));
        assert!(grpc.keepalive_interval < grpc.idle_timeout);
        assert_eq!(grpc.max_connections, 8192);
        assert_eq!(grpc.max_streams_per_connection, 256);
        assert_eq!(grpc.max_health_watches, 1024);
        assert_eq!(grpc.filter.max_items, 1024);
        assert_eq!(grpc.filter.max_item_bytes, 256);
        assert_eq!(grpc.subscriber_buffer_bytes, 4 * 1024 * 1024);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    }

    #[test]
    fn inconsistent_front_limits_are_refused() {
        let err = parse(&[
            "--webhook-signature-key",
            "k",
            "--http-body-budget-bytes",
            "1000",
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("GATEWAY_HTTP_BODY_BUDGET_BYTES"),
            "{err}"
        );
        let err =
            parse(&["--webhook-signature-key", "k", "--grpc-idle-timeout", "5s"]).unwrap_err();
        assert!(
            err.to_string().contains("GATEWAY_GRPC_KEEPALIVE_INTERVAL"),
            "{err}"
        );
        let err = parse(&[
            "--webhook-signature-key",
            "k",
            "--http-max-connections",
            "0",
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("GATEWAY_HTTP_MAX_CONNECTIONS"),
            "{err}"
        );
    }
}
