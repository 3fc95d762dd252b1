//! How Spike's answers become gRPC statuses: one table, [`code_for_http_status`].

use tonic::{Code, Status};

/// Why a call to Spike failed, after any retries.
#[derive(Debug, thiserror::Error)]
pub enum SpikeError {
    #[error("the proxy RPCs need {0}; set it to call Spike")]
    NotConfigured(&'static str),
    /// Spike answered with an error; `detail` is its problem+json detail when it gave one.
    #[error("Spike answered HTTP {status}{}", detail_suffix(.detail.as_deref()))]
    Http { status: u16, detail: Option<String> },
    #[error("Spike rejected the gateway's credentials{}", detail_suffix(.detail.as_deref()))]
    CredentialsRejected { detail: Option<String> },
    #[error("the call's deadline passed while waiting for Spike")]
    DeadlineExceeded,
    #[error("cannot reach Spike: {0}")]
    Connection(String),
    #[error("Spike's answer could not be understood: {0}")]
    UnexpectedAnswer(String),
}

fn detail_suffix(detail: Option<&str>) -> String {
    detail.map(|d| format!(": {d}")).unwrap_or_default()
}

/// The one mapping of Spike's HTTP statuses to gRPC codes (SPEC §4.2).
pub fn code_for_http_status(status: u16) -> Code {
    match status {
        400 | 422 => Code::InvalidArgument,
        401 | 403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::AlreadyExists,
        413 | 429 => Code::ResourceExhausted,
        408 | 504 => Code::DeadlineExceeded,
        500..=599 => Code::Unavailable,
        // Any other refusal: the request was understood but cannot be done as asked.
        _ => Code::FailedPrecondition,
    }
}

impl From<SpikeError> for Status {
    fn from(error: SpikeError) -> Self {
        let code = match &error {
            SpikeError::NotConfigured(_) => Code::FailedPrecondition,
            SpikeError::Http { status, .. } => code_for_http_status(*status),
            SpikeError::CredentialsRejected { .. } => Code::PermissionDenied,
            SpikeError::DeadlineExceeded => Code::DeadlineExceeded,
            SpikeError::Connection(_) => Code::Unavailable,
            SpikeError::UnexpectedAnswer(_) => Code::Internal,
        };
        // Spike's detail is the most useful text for the caller; fall back to ours.
        let message = match &error {
            SpikeError::Http {
                detail: Some(detail),
                ..
            } => detail.clone(),
            _ => error.to_string(),
        };
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_matches_the_spec() {
        let expected = [
            (400, Code::InvalidArgument),
            (422, Code::InvalidArgument),
            (401, Code::PermissionDenied),
            (403, Code::PermissionDenied),
            (404, Code::NotFound),
            (413, Code::ResourceExhausted),
            (429, Code::ResourceExhausted),
            (500, Code::Unavailable),
            (503, Code::Unavailable),
        ];
        for (status, code) in expected {
            assert_eq!(code_for_http_status(status), code, "{status}");
        }
    }

    #[test]
    fn the_status_message_is_spikes_detail() {
        let status = Status::from(SpikeError::Http {
            status: 422,
            detail: Some("consumed_at is in the future".into()),
        });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "consumed_at is in the future");
        let status = Status::from(SpikeError::CredentialsRejected { detail: None });
        assert_eq!(status.message(), "Spike rejected the gateway's credentials");
    }
}
