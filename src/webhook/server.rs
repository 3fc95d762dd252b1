//! The HTTP server loop for the webhook front, with the connection limits `axum::serve`
//! does not expose (SPEC §6):
//! - **HTTP/1.1 only.** Spike delivers webhooks over HTTP/1.1, and health checkers and
//!   Prometheus speak it too. HTTP/2 (h2c prior knowledge) would let one connection carry
//!   hundreds of concurrent bodies, each buffered before its signature can be checked; an
//!   HTTP/2 preface is refused and the connection closed.
//! - **Bounded connections.** Past `max_connections`, a new connection is accepted, told
//!   `503` and closed at once. Accepting keeps the kernel's backlog empty, so a client learns
//!   of the overload in one round trip (Spike retries a 503 later) instead of hanging in a
//!   SYN queue, and the file descriptor is released immediately.
//! - **Idle connections closed.** The header-read timeout runs from the moment the server
//!   waits for a request head: from the connection's start, and again between requests on a
//!   kept-alive connection. A connection that never sends a byte, or idles between
//!   requests, is closed when it expires. Whole requests are bounded by the router's timeout.
//! - A bounded header buffer; bigger request heads are refused.
//! - **Unambiguous framing.** A request head with both `Content-Length` and
//!   `Transfer-Encoding` gets `400` and the connection is closed (RFC 9112 §6.1: such a
//!   message is a request-smuggling vector). hyper would silently prefer
//!   `Transfer-Encoding` and drop `Content-Length` before the router could see it, so the
//!   check reads the bytes as they arrive ([`FramingGuard`]).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// hyper's read buffer, which holds a request head while it is parsed. Heads larger than
/// [`super::MAX_HEAD_BYTES`] but within this buffer get a JSON 431 from the router; only
/// heads past this buffer get hyper's own (bodiless) 431. It also caps the read-ahead of a
/// body, so it bounds per-connection memory outside the body budget.
pub const READ_BUFFER_BYTES: usize = 32 * 1024;

/// Most header fields in one request (hyper's default is 100; Spike sends about ten).
const MAX_HEADERS: usize = 64;

/// The answer to a connection past the limit: the request is never read.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
content-length: 65\r\n\
connection: close\r\n\
retry-after: 1\r\n\
\r\n\
{\"error\":\"too many open connections to the gateway; retry later\"}";

/// The answer to a request head with both `Content-Length` and `Transfer-Encoding`.
const AMBIGUOUS_FRAMING: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: application/json\r\n\
content-length: 71\r\n\
connection: close\r\n\
\r\n\
{\"error\":\"Content-Length together with Transfer-Encoding is ambiguous\"}";

/// How the HTTP front bounds its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `router` until `stop` completes, then waits for in-flight requests to finish
/// (idle keep-alive connections are closed at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(READ_BUFFER_BYTES)
        .max_headers(MAX_HEADERS);
    let service = TowerToHyperService::new(router);
    let graceful = GracefulShutdown::new();
    // One permit per open connection; a connection task holds its permit until it ends.
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically out of file descriptors: pause instead of spinning.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        // Small responses must not wait on delayed ACKs (Nagle).
        let _ = stream.set_nodelay(true);
        let connection = graceful.watch(
            builder.serve_connection(TokioIo::new(FramingGuard::new(stream)), service.clone()),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers a connection past the limit with a 503 and closes it, without reading from it
/// or waiting on it: the accept loop must never block on a client.
fn refuse(stream: TcpStream) {
    tracing::debug!("HTTP connection limit reached; refusing a connection");
    // A fresh socket's send buffer always has room for these few bytes.
    let _ = stream.try_write(OVERLOADED);
}

/// A connection's byte stream as hyper reads it, refusing ambiguous framing: when a head
/// with both `Content-Length` and `Transfer-Encoding` arrives, it answers `400` itself and
/// ends the stream, so hyper never dispatches that request.
struct FramingGuard {
    stream: TcpStream,
    scan: HeadScan,
    refused: bool,
}

impl FramingGuard {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            scan: HeadScan::default(),
            refused: false,
        }
    }
}

impl AsyncRead for FramingGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.refused {
            return Poll::Ready(Ok(())); // end of stream
        }
        let before = buf.filled().len();
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if this.scan.feed(&buf.filled()[before..]) {
            tracing::debug!("refusing a request with both Content-Length and Transfer-Encoding");
            // The request is never dispatched, so nothing else writes to this socket (short of
            // a client pipelining behind an unanswered request, which then gets both).
            let _ = this.stream.try_write(AMBIGUOUS_FRAMING);
            this.refused = true;
            buf.set_filled(before);
        }
        Poll::Ready(Ok(()))
    }
}

crate::net::forward_async_write!(FramingGuard, stream);

/// Finds header blocks naming both `Content-Length` and `Transfer-Encoding`, across reads.
///
/// It does not track body lengths: every blank line ends a block, and header names count
/// only at the start of a line. A request head is always such a block, so none is missed.
/// A body could only look like one with raw lines naming both headers, which no JSON body
/// has; such a body's request is refused, which harms only its own sender.
#[derive(Debug, Default)]
struct HeadScan {
    /// The current line's first bytes, lower-cased (enough for the longer name).
    line: [u8; 18],
    line_len: usize,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    /// Feeds received bytes; true once a block naming both headers has ended.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        loop {
            if self.line_len >= self.line.len() {
                // The rest of a long line cannot change what it names: skip to its end in
                // one scan. Bodies are mostly such lines (a JSON body is often one), and
                // this loop sees every byte a client sends.
                match bytes.iter().position(|&b| b == b'\n') {
                    Some(end) => bytes = &bytes[end..],
                    None => return false,
                }
            }
            let Some((&byte, rest)) = bytes.split_first() else {
                return false;
            };
            bytes = rest;
            match byte {
                b'\r' => {}
                b'\n' => {
                    if self.line_len == 0 {
                        if self.content_length && self.transfer_encoding {
                            return true;
                        }
                        self.content_length = false;
                        self.transfer_encoding = false;
                    } else {
                        let line = &self.line[..self.line_len.min(self.line.len())];
                        self.content_length |= line.starts_with(b"content-length:");
                        self.transfer_encoding |= line.starts_with(b"transfer-encoding:");
                    }
                    self.line_len = 0;
                }
                other => {
                    if let Some(slot) = self.line.get_mut(self.line_len) {
                        *slot = other.to_ascii_lowercase();
                    }
                    self.line_len = self.line_len.saturating_add(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    #[test]
    fn ambiguous_framing_is_found_across_reads_and_nowhere_else() {
        let ambiguous =
            b"POST /webhooks/spike HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTRANSFER-ENCODING: chunked\r\n\r\n";
        for split in 0..ambiguous.len() {
            let mut scan = HeadScan::default();
            let found = scan.feed(&ambiguous[..split]) | scan.feed(&ambiguous[split..]);
            assert!(found, "split at {split}");
        }
        let mut scan = HeadScan::default();
        // Each alone, in consecutive requests, and a body that names one of them.
        assert!(
            !scan.feed(
                b"POST / HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"a\":\"content-length: 1\"}"
            )
        );
        assert!(!scan.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"));
        assert!(
            !scan.feed(
                b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
        );
    }

    #[test]
    fn the_canned_answers_are_well_framed() {
        for canned in [super::OVERLOADED, super::AMBIGUOUS_FRAMING] {
            well_framed(canned);
        }
    }

    fn well_framed(canned: &[u8]) {
        let text = std::str::from_utf8(canned).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(parsed["error"].is_string());
    }
}
