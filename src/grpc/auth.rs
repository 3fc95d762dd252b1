//! Bearer-token check for the gRPC API (`GATEWAY_GRPC_TOKENS`). Health is never wrapped.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use crate::config::Secret;

/// Accepts a request whose `authorization` is `Bearer <one of the tokens>`.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Arc<Vec<Secret>>,
    /// Why every request is refused when no token is configured; `None` lets them pass.
    closed_without_tokens: Option<&'static str>,
}

impl BearerAuth {
    /// With no tokens configured every request passes.
    pub fn new(tokens: Vec<Secret>) -> Self {
        Self {
            tokens: Arc::new(tokens),
            closed_without_tokens: None,
        }
    }

    /// With no tokens configured every request is refused with `why`.
    pub fn required(tokens: Vec<Secret>, why: &'static str) -> Self {
        Self {
            tokens: Arc::new(tokens),
            closed_without_tokens: Some(why),
        }
    }
}

/// The token of an `authorization` value `Bearer <token>`. The scheme is matched without
/// regard to case and may be followed by several spaces (RFC 9110 §11.1, RFC 6750 §2.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_empty() {
            return match self.closed_without_tokens {
                None => Ok(request),
                Some(why) => Err(Status::permission_denied(why)),
            };
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
        // Compare against every token, so timing tells nothing about which (if any) matched.
        let matched = self.tokens.iter().fold(0u8, |acc, t| {
            acc | presented
                .as_bytes()
                .ct_eq(t.expose().as_bytes())
                .unwrap_u8()
        });
        if matched == 1 {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_exact() {
        for (value, token) in [
            ("Bearer abc", "abc"),
            ("bearer abc", "abc"),
            ("BEARER abc", "abc"),
            ("bEaReR  abc", "abc"),
            ("Bearer AbC", "AbC"),
        ] {
            assert_eq!(bearer_token(value), Some(token), "{value:?}");
        }
        for value in [
            "",
            "Bearer",
            "Bearer ",
            "Bearerabc",
            "Basic abc",
            " Bearer abc",
            "Bear abc",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
