//! `grpc.health.v1.Health`, with its unauthenticated `Watch` streams bounded in number
//! across all connections (SPEC §6): health needs no token, so without a bound any client
//! could hold memory with streams that never end.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_server::{Health, HealthServer},
    },
    server::{HealthService, WatchStream},
};

/// tonic-health's service with a cap on open `Watch` streams; `Check` is unbounded (unary).
pub struct BoundedHealth {
    inner: HealthService,
    /// One permit per open `Watch` stream, held by the stream until it is dropped.
    watches: Arc<Semaphore>,
    limit: usize,
}

impl BoundedHealth {
    pub fn server(inner: HealthService, max_watches: usize) -> HealthServer<Self> {
        HealthServer::new(Self {
            inner,
            watches: Arc::new(Semaphore::new(max_watches)),
            limit: max_watches,
        })
    }
}

#[tonic::async_trait]
impl Health for BoundedHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = BoundedWatch;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let slot = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} Health/Watch streams are open, the most this gateway serves \
                 (GATEWAY_GRPC_MAX_HEALTH_WATCHES); use Health/Check or retry later",
                self.limit
            ))
        })?;
        let stream = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(BoundedWatch {
            stream,
            _slot: slot,
        }))
    }
}

/// A `Watch` stream holding its slot under the bound.
pub struct BoundedWatch {
    stream: WatchStream,
    _slot: OwnedSemaphorePermit,
}

impl Stream for BoundedWatch {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.stream).poll_next(cx)
    }
}
