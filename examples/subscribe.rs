//! Prints the gateway's event stream, one line per event, and keeps it going: when the
//! gateway restarts (the stream ends with `UNAVAILABLE`) it reconnects with the
//! `after_sequence` named in the status's `google.rpc.ErrorInfo`, backing off up to 10 s.
//! When the start position is gone (`OUT_OF_RANGE`) it says which sequences were lost and
//! stops, or with `--accept-loss` restarts from the oldest retained event.
//!
//! ```text
//! cargo run --example subscribe -- --from-beginning
//! cargo run --example subscribe -- --after-sequence 42 --type lab_report_completed
//! cargo run --example subscribe -- --after-sequence 42 --accept-loss
//! ```

use std::{collections::HashMap, time::Duration};

use clap::Parser;
use spike_gateway::proto::{
    Event, EventType, SubscribeRequest, event::Payload, event_stream_client::EventStreamClient,
    subscribe_request::Start,
};
use tonic::{Code, Request, Status, metadata::MetadataValue};
use tonic_types::StatusExt;

/// First reconnection delay; doubled after each failed attempt up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Parser)]
struct Args {
    /// Gateway gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Resume after this sequence (the last one you processed).
    #[arg(long, conflicts_with = "from_beginning")]
    after_sequence: Option<u64>,
    /// Everything the log retains.
    #[arg(long)]
    from_beginning: bool,
    /// Only these users (repeatable).
    #[arg(long = "user")]
    users: Vec<String>,
    /// Only these types, e.g. record_change, lab_report_completed (repeatable).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Include each event's raw JSON.
    #[arg(long)]
    raw: bool,
    /// On OUT_OF_RANGE, restart from the oldest retained event instead of stopping. The
    /// events in between are lost to this consumer.
    #[arg(long)]
    accept_loss: bool,
    /// Bearer token, when the gateway has GATEWAY_GRPC_TOKENS.
    #[arg(long, env = "GATEWAY_GRPC_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn summary(event: &Event) -> String {
    match &event.payload {
        Some(Payload::RecordChange(c)) => format!(
            "{} metrics={:?} data_types={:?}",
            c.provider_slug, c.metrics, c.data_types
        ),
        Some(Payload::ProviderIntegration(p)) => p.provider_slug.clone(),
        Some(Payload::LabReportResult(l)) => format!(
            "record={} {:?} sections={}",
            l.record_id,
            l.status(),
            l.sections.len()
        ),
        Some(Payload::NutritionResult(n)) => format!(
            "record={} {:?} dish={:?}",
            n.record_id,
            n.status(),
            n.dish_name
        ),
        None => String::new(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let event_types = args
        .types
        .iter()
        .map(|name| {
            EventType::from_str_name(&format!("EVENT_TYPE_{}", name.to_ascii_uppercase()))
                .map(|t| t as i32)
                .ok_or_else(|| format!("unknown event type {name}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut start = match (args.after_sequence, args.from_beginning) {
        (Some(after), _) => Some(Start::AfterSequence(after)),
        (None, true) => Some(Start::FromBeginning(true)),
        (None, false) => None,
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let request = SubscribeRequest {
            event_types: event_types.clone(),
            application_user_ids: args.users.clone(),
            include_raw_json: args.raw,
            start,
            ..Default::default()
        };
        let mut last = None;
        let status = match stream_once(&args, request, &mut last).await {
            Ok(()) => return Ok(()),
            Err(status) => status,
        };
        if last.is_some() {
            // Events flowed, so the gateway was healthy: the next failure starts afresh.
            backoff = MIN_BACKOFF;
        }
        // What this consumer holds: the last event printed, else where it asked to start.
        let held = last.map(Start::AfterSequence).or(start);
        start = match next_start(&args, &status, held) {
            Some(next) => next,
            None => std::process::exit(1),
        };
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: prints events until the stream ends, recording the last sequence seen.
/// `Ok` only when the gateway closed the stream without an error.
async fn stream_once(
    args: &Args,
    request: SubscribeRequest,
    last: &mut Option<u64>,
) -> Result<(), Status> {
    let mut request = Request::new(request);
    if let Some(token) = &args.token {
        let value: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::invalid_argument("the token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut client = EventStreamClient::connect(args.addr.clone())
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect: {e}")))?;
    let mut stream = client.subscribe(request).await?.into_inner();
    while let Some(event) = stream.message().await? {
        print_event(&event, args.raw);
        *last = Some(event.sequence);
    }
    Ok(())
}

fn print_event(event: &Event, raw: bool) {
    println!(
        "{:>6} {:<40} {:<16} {} {}",
        event.sequence,
        event.r#type().as_str_name(),
        event.application_user_id,
        event.event_id,
        summary(event)
    );
    if raw {
        println!("       {}", String::from_utf8_lossy(&event.raw_json));
    }
}

/// Where to reconnect after `status`, or `None` to stop. `held` is the start that
/// continues what this consumer has already printed.
fn next_start(args: &Args, status: &Status, held: Option<Start>) -> Option<Option<Start>> {
    eprintln!("stream ended: {:?}: {}", status.code(), status.message());
    let details = status.get_details_error_info();
    let metadata = |key: &str| -> Option<u64> { details.as_ref()?.metadata.get(key)?.parse().ok() };
    match status.code() {
        // Shutdown names the last sequence this stream covered (with a filter, past the
        // last event printed); a connection error has no details, so resume from our own.
        Code::Unavailable => {
            let next = metadata("after_sequence")
                .map(Start::AfterSequence)
                .or(held);
            eprintln!("reconnecting with start {next:?}");
            Some(next)
        }
        Code::OutOfRange => {
            let oldest = metadata("oldest_sequence")?;
            let held_after = match held {
                Some(Start::AfterSequence(after)) => Some(after),
                _ => None,
            };
            report_loss(details.as_ref().map(|d| &d.metadata), held_after, oldest);
            if args.accept_loss {
                eprintln!("--accept-loss: restarting from sequence {oldest}");
                Some(Some(Start::AfterSequence(oldest.saturating_sub(1))))
            } else {
                eprintln!("rerun with --accept-loss to continue from sequence {oldest}");
                None
            }
        }
        _ => None,
    }
}

/// Says what an `OUT_OF_RANGE` costs this consumer.
fn report_loss(metadata: Option<&HashMap<String, String>>, held: Option<u64>, oldest: u64) {
    let after = metadata
        .and_then(|m| m.get("after_sequence")?.parse::<u64>().ok())
        .or(held);
    match (metadata.and_then(|m| m.get("last_sequence")), after) {
        (Some(last), Some(after)) => eprintln!(
            "the log ends at sequence {last}, before our position {after}: it was reset or \
             replaced, so sequences from {oldest} on may be new events"
        ),
        (None, Some(after)) if after + 1 < oldest => eprintln!(
            "lost: sequences {}..={} are no longer retained",
            after + 1,
            oldest - 1
        ),
        _ => eprintln!("lost: events before sequence {oldest} are no longer retained"),
    }
}
