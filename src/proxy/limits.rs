//! Limits of the public listener: concurrent connections, request-header size and
//! field count, and the timeouts that keep idle and slow (slowloris) clients from
//! holding connections.
//!
//! What Pingora 0.9.1 does on its own, and why kvgate adds to it:
//! * A request header is read into a buffer that may not grow past 1 MiB − 1 and parsed
//!   into at most 256 fields; beyond either, Pingora answers a bare 400 and closes. kvgate's
//!   own limits (`server.maxHeaderBytes`, `server.maxHeaderFields`) are validated to lie
//!   below those, so they are the ones that apply, with a 431 in kvgate's JSON shape.
//! * Pingora has no per-connection hook and no connection limit. [`LimitedListener`] is a
//!   [`ServerApp`] around Pingora's HTTP app: it takes a slot for each accepted connection
//!   (refusing with 503 when none is left) and hands Pingora a [`GuardedStream`] that holds
//!   the slot until the connection is dropped.
//! * Pingora's header reads only time out per read (60 s on a new connection), and once
//!   a request has been read an HTTP/1.1 connection is kept alive with no idle timeout at
//!   all: a client that trickles a byte now and then, or opens connections and leaves them
//!   idle, holds them forever. [`GuardedStream`] enforces a deadline on the whole header
//!   and on the idle time between requests; it learns where a connection is in its
//!   request cycle from the proxy ([`request_started`], [`request_finished`]).
//!
//! * With `server.tls`, [`LimitedListener`] runs the TLS handshake itself, once the
//!   connection holds its slot and under its header deadline, so a client that never
//!   finishes a handshake is cut like one that never finishes a header. The guarded stream
//!   wraps the TLS stream, so everything below applies unchanged.
//!
//! The public listener speaks HTTP/1.1 only (ALPN offers nothing else, no h2c): with
//! HTTP/2 several requests would share one stream, and the request cycle below would not
//! describe it.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::errors::ApiError;
use crate::config::ServerConfig;
use crate::gateway::Gateway;
use crate::metrics::{ClientWait, Metrics};
use crate::tls::{HandshakeError, ListenerTls};

/// A refused client gets the time to receive the 503 before the socket closes: closing
/// with its request still unread would send a reset that can destroy the response.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Most of a refused client's request read (and dropped) while lingering.
const REFUSAL_DRAIN_BYTES: usize = 64 << 10;
/// Slots free as soon as any connection closes, so a retry a second later usually succeeds.
const REFUSAL_RETRY_AFTER_SECS: u32 = 1;

/// Pingora's HTTP app behind a connection limit and the header and idle deadlines.
pub struct LimitedListener<A> {
    app: Arc<A>,
    gateway: Arc<Gateway>,
    slots: Arc<Slots>,
    tls: Option<ListenerTls>,
}

impl<A> LimitedListener<A> {
    pub fn new(app: A, gateway: Arc<Gateway>, metrics: Arc<Metrics>) -> Self {
        Self {
            app: Arc::new(app),
            gateway,
            slots: Arc::new(Slots {
                open: AtomicUsize::new(0),
                saturated: AtomicBool::new(false),
                metrics,
            }),
            tls: None,
        }
    }

    /// Serves TLS: every accepted connection is handshaken before Pingora reads it.
    pub fn with_tls(mut self, tls: ListenerTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for LimitedListener<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A stream the app hands back for reuse is already guarded and holds its slot.
        if stream.as_any().is::<GuardedStream>() {
            return self.app.process_new(stream, shutdown).await;
        }
        let accepted = Instant::now();
        // Read per connection, so a reload applies to the connections accepted after it.
        let state = self.gateway.state();
        let server = &state.config.server;
        let Some(slot) = Slots::take(&self.slots, server.max_connections) else {
            self.slots.metrics.connection_refused();
            // Once per episode: a flood of connections must not become a flood of log lines.
            if !self.slots.saturated.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    client = %peer(&stream),
                    max_connections = server.max_connections,
                    "server.maxConnections are open: refusing new connections with 503"
                );
            }
            drop(state);
            // A TLS client reads the 503 only after a handshake, bounded like the answer.
            let stream = match &self.tls {
                Some(tls) => tls.handshake(stream, REFUSAL_LINGER).await.ok()?,
                None => stream,
            };
            refuse(stream).await;
            return None;
        };
        if self.slots.saturated.load(Ordering::Relaxed)
            && self.slots.saturated.swap(false, Ordering::Relaxed)
        {
            tracing::info!("accepting connections again");
        }
        let deadlines = Deadlines::of(server);
        // The connection may outlive this config by far; it keeps only what it copied.
        drop(state);
        let stream = match &self.tls {
            Some(tls) => self.secure(tls, stream, deadlines.header).await?,
            None => stream,
        };
        let guarded = GuardedStream::new(stream, slot, deadlines, accepted);
        self.app.process_new(Box::new(guarded), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

impl<A> LimitedListener<A> {
    /// The handshake of a connection that holds a slot; it shares the header's deadline.
    async fn secure(&self, tls: &ListenerTls, stream: Stream, within: Duration) -> Option<Stream> {
        let client = peer(&stream);
        match tls.handshake(stream, within).await {
            Ok(stream) => Some(stream),
            Err(error) => {
                match error {
                    HandshakeError::TimedOut => {
                        self.slots.metrics.connection_timed_out(ClientWait::Header)
                    }
                    HandshakeError::Failed(_) | HandshakeError::NotTcp => {
                        self.slots.metrics.tls_handshake_failed()
                    }
                }
                tracing::debug!(%client, %error, "client connection closed before a request");
                None
            }
        }
    }
}

fn peer(stream: &Stream) -> String {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().map(|a| a.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Answers 503 on a connection that got no slot, without reading its request first.
async fn refuse(mut stream: Stream) {
    let body = ApiError::too_many_connections().body();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: {REFUSAL_RETRY_AFTER_SECS}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await
    };
    if tokio::time::timeout(REFUSAL_LINGER, answer).await.is_err() {
        return;
    }
    Shutdown::shutdown(&mut *stream).await;
    let mut drained = 0;
    let mut scrap = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut scrap).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// The connections open on the listener.
struct Slots {
    open: AtomicUsize,
    /// Connections have been refused since the last one was accepted.
    saturated: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Slots {
    fn take(slots: &Arc<Self>, max: usize) -> Option<Slot> {
        slots
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        slots.metrics.connection_opened();
        Some(Slot(Arc::clone(slots)))
    }
}

/// One open connection; its slot frees when the connection is dropped.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connection_closed();
    }
}

/// The two waits a client is allowed, fixed when its connection is accepted.
#[derive(Clone, Copy, Debug)]
struct Deadlines {
    header: Duration,
    /// `None`: keep-alive is off, a connection closes after its response.
    idle: Option<Duration>,
}

impl Deadlines {
    fn of(server: &ServerConfig) -> Self {
        Self {
            header: Duration::from_millis(server.header_timeout_ms),
            idle: (server.keep_alive_timeout_ms > 0)
                .then(|| Duration::from_millis(server.keep_alive_timeout_ms)),
        }
    }
}

/// Where a connection is in its request cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Receiving a request header: it must be complete within the header timeout.
    Header,
    /// The header is in; the body, the upstream exchange and the response take their time.
    Request,
    /// The response is out; the next request must begin within the idle timeout.
    Idle,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Header,
            1 => Self::Request,
            _ => Self::Idle,
        }
    }
}

/// A client connection with its listener slot and its read deadlines. Reads that are
/// still waiting at the deadline of the current phase fail with `TimedOut`; Pingora then
/// drops the connection (quietly when nothing of a request had arrived).
pub struct GuardedStream {
    inner: Stream,
    slot: Slot,
    deadlines: Deadlines,
    /// Set by the proxy (`request_started`, `request_finished`) and by reads.
    phase: AtomicU8,
    /// The phase the last read saw, and since when.
    seen: Phase,
    since: Instant,
    timer: Pin<Box<Sleep>>,
}

impl GuardedStream {
    /// `accepted`: when the connection was accepted, where its first header's clock starts.
    fn new(inner: Stream, slot: Slot, deadlines: Deadlines, accepted: Instant) -> Self {
        Self {
            inner,
            slot,
            deadlines,
            phase: AtomicU8::new(Phase::Header as u8),
            seen: Phase::Header,
            since: accepted,
            timer: Box::pin(tokio::time::sleep_until(accepted)),
        }
    }

    fn enter(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Catches up with a phase change made by the proxy; the phase's clock starts at the
    /// first read after it, which Pingora issues at once.
    fn observe(&mut self) -> Phase {
        let phase = Phase::from_u8(self.phase.load(Ordering::Relaxed));
        if phase != self.seen {
            self.seen = phase;
            self.since = Instant::now();
        }
        phase
    }

    fn deadline(&self) -> Option<(Instant, ClientWait)> {
        let (wait, kind) = match self.seen {
            Phase::Header => (self.deadlines.header, ClientWait::Header),
            Phase::Request => return None,
            Phase::Idle => (self.deadlines.idle?, ClientWait::Idle),
        };
        self.since.checked_add(wait).map(|at| (at, kind))
    }
}

/// Marks the end of the request header on the connection `session` came in on: its
/// header deadline no longer applies.
pub fn request_started(session: &Session) {
    if let Some(conn) = guarded(session) {
        conn.enter(Phase::Request);
    }
}

/// Marks the end of the response: the connection waits for the next request.
pub fn request_finished(session: &Session) {
    if let Some(conn) = guarded(session) {
        conn.enter(Phase::Idle);
    }
}

fn guarded(session: &Session) -> Option<&GuardedStream> {
    session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<GuardedStream>())
}

/// Checks the request header against `server.maxHeaderBytes` and `server.maxHeaderFields`.
pub fn check_header(session: &Session, server: &ServerConfig) -> Result<(), ApiError> {
    let header = session.req_header();
    let fields = header.headers.len();
    if fields > server.max_header_fields {
        return Err(ApiError::too_many_header_fields(
            fields,
            server.max_header_fields,
        ));
    }
    let bytes = match session.as_http1() {
        Some(h1) => h1.get_headers_raw_bytes().len(),
        // Without the bytes as received: the request line and fields as HTTP/1.1 would send them.
        None => {
            header.method.as_str().len()
                + header.raw_path().len()
                + " HTTP/1.1\r\n".len()
                + header
                    .headers
                    .iter()
                    .map(|(name, value)| name.as_str().len() + value.len() + 4)
                    .sum::<usize>()
                + 2
        }
    };
    if bytes > server.max_header_bytes {
        return Err(ApiError::header_too_large(bytes, server.max_header_bytes));
    }
    Ok(())
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.observe();
        let filled = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) if phase == Phase::Idle && buf.filled().len() > filled => {
                // The first bytes of the next request: its header clock starts now.
                this.enter(Phase::Header);
                this.observe();
                return Poll::Ready(Ok(()));
            }
            ready => return ready,
        }
        let Some((deadline, waiting_for)) = this.deadline() else {
            return Poll::Pending;
        };
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                this.slot.0.metrics.connection_timed_out(waiting_for);
                tracing::debug!(
                    client = %peer(&this.inner),
                    ?waiting_for,
                    "client connection timed out"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    waiting_for.reason(),
                )))
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("phase", &Phase::from_u8(self.phase.load(Ordering::Relaxed)))
            .field("deadlines", &self.deadlines)
            .finish()
    }
}
