//! Prints the gateway's event stream, one line per event; resumable.
//!
//! ```text
//! cargo run --example subscribe -- --from-beginning
//! cargo run --example subscribe -- --after-sequence 42 --type lab_report_completed
//! ```

use clap::Parser;
use spike_gateway::proto::{
    Event, EventType, SubscribeRequest, event::Payload, event_stream_client::EventStreamClient,
    subscribe_request::Start,
};
use tonic::{Request, metadata::MetadataValue};

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
    let start = match (args.after_sequence, args.from_beginning) {
        (Some(after), _) => Some(Start::AfterSequence(after)),
        (None, true) => Some(Start::FromBeginning(true)),
        (None, false) => None,
    };
    let mut request = Request::new(SubscribeRequest {
        event_types,
        application_user_ids: args.users,
        include_raw_json: args.raw,
        start,
        ..Default::default()
    });
    if let Some(token) = &args.token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse()?;
        request.metadata_mut().insert("authorization", value);
    }

    let mut client = EventStreamClient::connect(args.addr).await?;
    let mut stream = client.subscribe(request).await?.into_inner();
    let mut last = args.after_sequence;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                println!(
                    "{:>6} {:<40} {:<16} {} {}",
                    event.sequence,
                    event.r#type().as_str_name(),
                    event.application_user_id,
                    event.event_id,
                    summary(&event)
                );
                if args.raw {
                    println!("       {}", String::from_utf8_lossy(&event.raw_json));
                }
                last = Some(event.sequence);
            }
            Ok(None) => break,
            Err(status) => {
                eprintln!("stream ended: {:?}: {}", status.code(), status.message());
                if let Some(last) = last {
                    eprintln!("resume with: --after-sequence {last}");
                }
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
