//! Per-RPC server metrics: a tower layer around every service of the gRPC server.
//!
//! Each call is counted once, when it completes, with its final status:
//! - the `grpc-status` of a trailers-only answer (an error from a handler or an
//!   interceptor, an unknown method), else the one in the trailers after the last message;
//! - `CANCELLED` when the client goes away first (reset, disconnect, deadline on its side);
//! - `UNKNOWN` for an answer that ends without any status.
//!
//! Latency runs from the request's arrival to that same point: for a unary RPC the whole
//! answer, for a streaming RPC the stream's end, so `Subscribe`'s histogram is one of
//! stream lifetimes. Labels form a closed set: `method` is one of the RPCs the compiled-in
//! service descriptors declare (or `unknown`), `kind` its streaming shape, `code` one of
//! gRPC's seventeen codes.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use prost::Message;
use tonic::Code;

use crate::metrics::Metrics;

/// One RPC's labels.
#[derive(Debug, PartialEq, Eq)]
pub struct Rpc {
    /// `package.Service/Method`.
    pub method: String,
    /// `unary`, `server_streaming`, `client_streaming` or `bidi_streaming`.
    pub kind: &'static str,
}

/// Every RPC of the services the server mounts, by HTTP/2 path (`/package.Service/Method`).
/// Built once per process from the same descriptor sets reflection serves.
static RPCS: LazyLock<HashMap<String, Rpc>> = LazyLock::new(|| {
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .flat_map(|encoded| {
        prost_types::FileDescriptorSet::decode(encoded)
            .expect("compiled-in descriptor sets decode")
            .file
    })
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let service_name = format!("{package}.{}", service.name());
            service.method.into_iter().map(move |method| {
                let name = format!("{service_name}/{}", method.name());
                let kind = match (method.client_streaming(), method.server_streaming()) {
                    (false, false) => "unary",
                    (false, true) => "server_streaming",
                    (true, false) => "client_streaming",
                    (true, true) => "bidi_streaming",
                };
                (format!("/{name}"), Rpc { method: name, kind })
            })
        })
    })
    .collect()
});

/// The `method` and `kind` labels of the RPC at `path`; `unknown` for any other path.
pub fn rpc_at(path: &str) -> (&'static str, &'static str) {
    RPCS.get(path).map_or(("unknown", "unknown"), |rpc| {
        (rpc.method.as_str(), rpc.kind)
    })
}

/// Wraps the server's routes in [`Metered`].
#[derive(Clone)]
pub struct MeteredLayer {
    metrics: Arc<Metrics>,
}

impl MeteredLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for MeteredLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Metered<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let (method, kind) = rpc_at(request.uri().path());
        // Counted as CANCELLED if dropped before the answer (the client went away).
        let mut call = Call {
            metrics: self.metrics.clone(),
            method,
            kind,
            started: Instant::now(),
            code: None,
            done: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = match answer.await {
                Ok(response) => response,
                Err(e) => {
                    call.finish(Code::Unknown);
                    return Err(e);
                }
            };
            let (parts, body) = response.into_parts();
            call.code = status_in(&parts.headers);
            Ok(http::Response::from_parts(
                parts,
                MeteredBody { inner: body, call },
            ))
        })
    }
}

/// One call in flight; records itself exactly once.
struct Call {
    metrics: Arc<Metrics>,
    method: &'static str,
    kind: &'static str,
    started: Instant,
    /// The status of a trailers-only answer, read from its headers.
    code: Option<Code>,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            self.metrics
                .grpc_request(self.method, self.kind, code, self.started.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A trailers-only answer may be dropped unpolled (its body is empty): that is its
        // status. Anything else dropped before its trailers was abandoned by the client.
        self.finish(self.code.unwrap_or(Code::Cancelled));
    }
}

fn status_in(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// A response body that records its call when the trailers (or the end) go by.
pub struct MeteredBody<B> {
    inner: B,
    call: Call,
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(Code::Unknown),
            Poll::Ready(None) => this.call.finish(this.call.code.unwrap_or(Code::Unknown)),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_every_mounted_rpc_and_nothing_else() {
        assert_eq!(
            rpc_at("/spike.gateway.v1.SpikeRecords/GetNutritionRecord"),
            ("spike.gateway.v1.SpikeRecords/GetNutritionRecord", "unary")
        );
        assert_eq!(
            rpc_at("/spike.gateway.v1.EventStream/Subscribe"),
            ("spike.gateway.v1.EventStream/Subscribe", "server_streaming")
        );
        assert_eq!(
            rpc_at("/spike.gateway.v1.EventStream/Consume"),
            ("spike.gateway.v1.EventStream/Consume", "bidi_streaming")
        );
        assert_eq!(
            rpc_at("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health/Check", "unary")
        );
        assert_eq!(
            rpc_at("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").1,
            "bidi_streaming"
        );
        assert_eq!(rpc_at("/user-chosen/path"), ("unknown", "unknown"));
        assert_eq!(
            rpc_at("/grpc.health.v1.Health/check"),
            ("unknown", "unknown")
        );
    }
}
