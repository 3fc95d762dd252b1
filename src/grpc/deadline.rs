//! The caller's gRPC deadline, as an `Instant` that bounds a whole call.

use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Status, metadata::MetadataMap};

/// Used when the caller sets no deadline, so no call can wait forever on Spike.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

/// When the caller's deadline passes tonic itself answers CANCELLED; finishing this much
/// earlier lets the call answer DEADLINE_EXCEEDED (or its real result) instead.
const AHEAD_OF_TONIC: Duration = Duration::from_millis(50);

/// The instant by which the call must have answered.
pub fn of<T>(request: &Request<T>) -> Instant {
    let now = Instant::now();
    match grpc_timeout(request.metadata()) {
        Some(timeout) => now + timeout.saturating_sub(AHEAD_OF_TONIC.min(timeout / 10)),
        None => now + DEFAULT_DEADLINE,
    }
}

/// Runs `call`, answering DEADLINE_EXCEEDED if it has not finished by `deadline`.
pub async fn within<T>(
    deadline: Instant,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout_at(deadline, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "the call's deadline passed before Spike answered",
            ))
        })
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&metadata)
    }

    #[test]
    fn parses_every_unit_and_refuses_garbage() {
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout_of("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout_of("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "5", "5x", "123456789S", "-1S"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
    }
}
