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
            .and_then(|v| v.strip_prefix("Bearer "))
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
