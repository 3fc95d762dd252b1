//! A worker of a consumer group (`EventStream/Consume`, SPEC §4.3): it joins `--group`,
//! "processes" each delivery (prints it, then waits `--work`), and acks it. Run it twice
//! with one group and the events are split between the two; stop one and the other gets
//! what it held, with a higher `attempt`. When the gateway restarts (the stream ends with
//! `UNAVAILABLE`) it joins again, backing off up to 10 s; the group resumes after what was
//! acked.
//!
//! Switches that show redelivery:
//! - `--nak-every N`: every Nth delivery is naked instead (back after `--nak-delay`);
//! - `--die-after N`: the process exits at once on its Nth delivery, before acking it
//!   (like a crash: everything it holds goes to the other members).
//!
//! One line per delivery on stdout:
//! `sequence=12 attempt=1 user=u-1 type=EVENT_TYPE_RECORD_CHANGE acked`.
//!
//! ```text
//! cargo run --example consume -- --group billing --from-beginning
//! cargo run --example consume -- --group billing --nak-every 5 --work 200ms
//! cargo run --example consume -- --group billing --die-after 10
//! ```

use std::time::Duration;

use clap::Parser;
use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeOrdering, ConsumeRequest, Delivery, Nak, consume_open,
    consume_request::Request as Message, event_stream_client::EventStreamClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, metadata::MetadataValue};

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Parser)]
struct Args {
    /// Gateway gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The group to join (1 to 64 of A-Z a-z 0-9 . _ -).
    #[arg(long, default_value = "example")]
    group: String,
    /// Where the group starts if this open creates it: everything retained (else only
    /// events appended from now). Ignored for an existing group.
    #[arg(long)]
    from_beginning: bool,
    /// One user's events in order and never two at once (must match the group's).
    #[arg(long)]
    per_user: bool,
    /// Unacked deliveries this worker holds at most.
    #[arg(long, default_value_t = 16)]
    max_in_flight: u32,
    /// How long "processing" one delivery takes.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    work: Duration,
    /// Nak every Nth delivery instead of acking it (0: never).
    #[arg(long, default_value_t = 0)]
    nak_every: u64,
    /// How long a naked delivery waits before it goes out again.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    nak_delay: Duration,
    /// Exit at once on the Nth delivery, without acking it (0: never).
    #[arg(long, default_value_t = 0)]
    die_after: u64,
    /// Exit (status 0) once no delivery has come for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    exit_when_idle: Option<Duration>,
    /// Bearer token, when the gateway has GATEWAY_GRPC_TOKENS.
    #[arg(long, env = "GATEWAY_GRPC_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Why one connection ended.
enum End {
    /// `--exit-when-idle` passed with nothing delivered.
    Idle,
    /// The stream or the connection failed.
    Failed(Status),
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Deliveries received over every connection, for --nak-every and --die-after.
    let mut received = 0u64;
    let mut backoff = MIN_BACKOFF;
    loop {
        let before = received;
        let status = match consume_once(&args, &mut received).await {
            End::Idle => return Ok(()),
            End::Failed(status) => status,
        };
        if received > before {
            backoff = MIN_BACKOFF;
        }
        match status.code() {
            // Shutdown or a restart (or a connection that failed): join again.
            Code::Unavailable | Code::Unknown => {
                eprintln!("{}; joining again in {backoff:?}", status.message());
            }
            _ => {
                eprintln!("the group refused this worker: {status}");
                std::process::exit(1);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn open(args: &Args) -> ConsumeRequest {
    let ordering = if args.per_user {
        ConsumeOrdering::PerUser
    } else {
        ConsumeOrdering::Unspecified
    };
    let open = ConsumeOpen {
        group: args.group.clone(),
        start: args
            .from_beginning
            .then_some(consume_open::Start::FromBeginning(true)),
        max_in_flight: args.max_in_flight,
        ordering: ordering as i32,
        ..ConsumeOpen::default()
    };
    ConsumeRequest {
        request: Some(Message::Open(open)),
    }
}

/// One membership: joins, then handles deliveries until the stream ends.
async fn consume_once(args: &Args, received: &mut u64) -> End {
    let mut client = match EventStreamClient::connect(args.addr.clone()).await {
        Ok(client) => client,
        Err(error) => return End::Failed(Status::unavailable(error.to_string())),
    };
    // The answers to the gateway: one per delivery, and this worker handles one delivery
    // at a time, so a few slots are plenty.
    let (answers, outgoing) = mpsc::channel(16);
    answers
        .send(open(args))
        .await
        .expect("the receiver is here");
    let mut request = Request::new(ReceiverStream::new(outgoing));
    if let Some(token) = &args.token {
        let value = MetadataValue::try_from(format!("Bearer {token}"));
        match value {
            Ok(value) => request.metadata_mut().insert("authorization", value),
            Err(_) => return End::Failed(Status::invalid_argument("bad token")),
        };
    }
    let mut deliveries = match client.consume(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return End::Failed(status),
    };
    loop {
        let next = match args.exit_when_idle {
            Some(idle) => match tokio::time::timeout(idle, deliveries.message()).await {
                Ok(next) => next,
                Err(_) => return End::Idle,
            },
            None => deliveries.message().await,
        };
        let delivery = match next {
            Ok(Some(delivery)) => delivery,
            Ok(None) => return End::Failed(Status::unavailable("the gateway ended the stream")),
            Err(status) => return End::Failed(status),
        };
        *received += 1;
        let answer = handle(args, &delivery, *received).await;
        if answers.send(answer).await.is_err() {
            return End::Failed(Status::unavailable("the stream closed"));
        }
    }
}

/// "Processes" one delivery and says how it went.
async fn handle(args: &Args, delivery: &Delivery, received: u64) -> ConsumeRequest {
    let event = delivery.event.clone().unwrap_or_default();
    let line = format!(
        "sequence={} attempt={} user={} type={}",
        event.sequence,
        delivery.attempt,
        event.application_user_id,
        event.r#type().as_str_name()
    );
    if args.die_after > 0 && received >= args.die_after {
        println!("{line} died");
        eprintln!("--die-after {}: exiting without acking", args.die_after);
        std::process::exit(2);
    }
    tokio::time::sleep(args.work).await;
    let sequences = vec![event.sequence];
    let message = if args.nak_every > 0 && received.is_multiple_of(args.nak_every) {
        println!("{line} naked");
        let delay = prost_types::Duration::try_from(args.nak_delay).unwrap_or_default();
        Message::Nak(Nak {
            sequences,
            delay: Some(delay),
        })
    } else {
        println!("{line} acked");
        Message::Ack(Ack { sequences })
    };
    ConsumeRequest {
        request: Some(message),
    }
}
