//! Sends a fully-read request to the ranked pods and streams the answer back.
//!
//! One exchange per attempt over Pingora's HTTP/1 connector (pooled connections):
//! request header and the whole body, then the response header, then the body chunk
//! by chunk, each written downstream as soon as it arrives. A client that goes away at
//! any point closes the upstream connection, which is how vLLM learns to abort the
//! request, and the load guard is released on every path.
//!
//! A generation is never sent twice: a request moves on to the next pod (the body is
//! replayable `Bytes`) only while no pod can have received it whole — the connection
//! was refused or timed out, or writing the request failed before its last byte (an
//! HTTP server does not act on a request whose body it has not read). A pooled
//! connection that fails while the request is written was closed by the pod while
//! idle: the request is written again to the same pod over a fresh connection. Once the
//! whole request is out, any failure is answered with 502, never retried: the pod may
//! be prefilling or generating it, and a prompt that crashed one pod must not crash the
//! next.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Version};
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use super::usage::{Usage, UsageTap};
use crate::config::ServerConfig;
use crate::pods::Pod;

/// How long an idle upstream connection stays pooled. Below uvicorn's (and so vLLM's)
/// default keep-alive of 5 s, so the pod never closes a connection we are about to reuse.
const POOL_IDLE: Duration = Duration::from_secs(4);
/// A pooled connection may have been closed by the pod since: a request whose writing
/// fails on one is written again to the same pod, this many times per request, without
/// counting as an attempt.
const STALE_RETRIES: u32 = 2;

/// Response headers that describe one connection, not the message.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The tunables of forwarding, taken from `server` in the config at each request.
#[derive(Clone, Debug)]
pub struct ForwardSettings {
    pub max_attempts: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub eject_after_failures: u32,
    pub eject_for: Duration,
}

impl From<&ServerConfig> for ForwardSettings {
    fn from(s: &ServerConfig) -> Self {
        Self {
            max_attempts: s.max_attempts,
            connect_timeout: Duration::from_millis(s.connect_timeout_ms),
            response_timeout: Duration::from_millis(s.response_timeout_ms),
            eject_after_failures: s.eject_after_failures,
            eject_for: Duration::from_millis(s.eject_ms),
        }
    }
}

/// A pod to try and the uncached prompt tokens it would prefill (its load while in flight).
pub struct Target {
    pub pod: Arc<Pod>,
    pub uncached_tokens: u64,
}

/// The request as it goes upstream.
pub struct Exchange<'a> {
    pub header: &'a RequestHeader,
    pub body: &'a Bytes,
    pub request_id: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no pod can take the request")]
    NoCandidates,
    #[error(
        "{attempts} attempt(s) failed before the request was delivered; last, on {pod}: {last}"
    )]
    AllAttemptsFailed {
        attempts: u32,
        pod: SocketAddr,
        last: Box<pingora::Error>,
    },
    #[error("pod {pod} received the request and failed without a response: {source}")]
    NoResponse {
        pod: SocketAddr,
        source: Box<pingora::Error>,
    },
    #[error("pod {pod} sent no response within {after:?}")]
    ResponseTimeout { pod: SocketAddr, after: Duration },
    #[error("pod {pod} sent an invalid response: {source}")]
    BadUpstreamResponse {
        pod: SocketAddr,
        source: Box<pingora::Error>,
    },
    #[error("the client went away")]
    ClientGone,
    #[error("pod {pod} sent a response longer than the {max_bytes} bytes expected")]
    ResponseTooLarge { pod: SocketAddr, max_bytes: usize },
    #[error("pod {pod} broke off the response: {source}")]
    Interrupted {
        pod: SocketAddr,
        source: Box<pingora::Error>,
    },
}

/// What happened, for the log line and the plugins' outcome.
#[derive(Debug, Default)]
pub struct ForwardReport {
    /// Index in the targets of the pod that answered (or was tried last).
    pub target: Option<usize>,
    pub attempts: u32,
    /// Uncached prompt tokens already in flight on that pod when the request was sent.
    pub queued_uncached_tokens: u64,
    /// Upstream status, once a response header arrived.
    pub status: Option<u16>,
    /// Whether anything of a response was written downstream (no error response possible then).
    pub response_started: bool,
    pub usage: Option<Usage>,
    pub time_to_first_byte: Option<Duration>,
    pub error: Option<ForwardError>,
}

/// A request delivered to a pod, whose response header has arrived.
struct Delivered {
    upstream: HttpSession,
    peer: HttpPeer,
    /// The pod's load, held until the exchange ends.
    load: crate::pods::InFlight,
    sent_at: Instant,
}

/// Why one attempt did not get a response header.
enum AttemptError {
    /// The pod cannot have received the whole request: another pod may serve it (or the
    /// same pod over a fresh connection, when `stale` says a pooled one was closed).
    NotDelivered {
        error: Box<pingora::Error>,
        stale: bool,
    },
    /// The request was delivered, or the client left: the request ends here.
    Fatal(ForwardError),
}

pub struct Forwarder {
    connector: Connector,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Self {
        Self {
            connector: Connector::new(None),
        }
    }

    /// Tries `targets` in order (at most `max_attempts` of them) and streams the first
    /// response to `session`. `on_sent(i)` runs once the whole request is written to
    /// target `i`, which happens for one target at most.
    pub async fn forward(
        &self,
        session: &mut Session,
        exchange: &Exchange<'_>,
        targets: &[Target],
        settings: &ForwardSettings,
        now_ms: &(dyn Fn() -> u64 + Sync),
        on_sent: &mut (dyn FnMut(usize) + Send),
    ) -> ForwardReport {
        let mut report = ForwardReport::default();
        let Some(mut delivered) = self
            .deliver(
                session,
                exchange,
                targets,
                settings,
                now_ms,
                on_sent,
                &mut report,
            )
            .await
        else {
            return report;
        };
        let streamed = self
            .stream_response(
                session,
                &mut delivered.upstream,
                exchange,
                &mut delivered.load,
                delivered.sent_at,
                &mut report,
            )
            .await;
        self.finish(delivered, streamed, &mut report).await;
        report
    }

    /// Like [`forward`](Self::forward), but reads the response whole (at most
    /// `max_bytes` of it) instead of streaming it to the client, which is still watched:
    /// a client that leaves ends the exchange. The prefill leg of a disaggregated request.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch(
        &self,
        session: &mut Session,
        exchange: &Exchange<'_>,
        targets: &[Target],
        settings: &ForwardSettings,
        now_ms: &(dyn Fn() -> u64 + Sync),
        on_sent: &mut (dyn FnMut(usize) + Send),
        max_bytes: usize,
    ) -> (ForwardReport, Bytes) {
        let mut report = ForwardReport::default();
        let Some(mut delivered) = self
            .deliver(
                session,
                exchange,
                targets,
                settings,
                now_ms,
                on_sent,
                &mut report,
            )
            .await
        else {
            return (report, Bytes::new());
        };
        let mut body = bytes::BytesMut::new();
        let read = self
            .read_whole(session, &mut delivered, max_bytes, &mut body, &mut report)
            .await;
        self.finish(delivered, read, &mut report).await;
        let body = body.freeze();
        let mut usage = UsageTap::for_content_type(b"application/json");
        usage.feed(&body);
        report.usage = usage.finish();
        (report, body)
    }

    /// Pools the connection after a complete exchange; closes it otherwise, which is
    /// what tells vLLM to abort.
    async fn finish(
        &self,
        mut delivered: Delivered,
        outcome: Result<(), ForwardError>,
        report: &mut ForwardReport,
    ) {
        match outcome {
            Ok(()) => {
                self.connector
                    .release_http_session(delivered.upstream, &delivered.peer, Some(POOL_IDLE))
                    .await;
            }
            Err(error) => {
                delivered.upstream.shutdown().await;
                report.error = Some(error);
            }
        }
    }

    /// Sends the request to the first target that takes it and waits for its response
    /// header. `None` when the exchange ended (the error is in `report`).
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        session: &mut Session,
        exchange: &Exchange<'_>,
        targets: &[Target],
        settings: &ForwardSettings,
        now_ms: &(dyn Fn() -> u64 + Sync),
        on_sent: &mut (dyn FnMut(usize) + Send),
        report: &mut ForwardReport,
    ) -> Option<Delivered> {
        let mut stale_retries = STALE_RETRIES;
        let mut next = 0;
        let mut last_failure = None;
        while next < targets.len() && (report.attempts as usize) < settings.max_attempts {
            let target = &targets[next];
            let pod = &target.pod;
            report.target = Some(next);
            report.attempts += 1;
            report.queued_uncached_tokens = pod.uncached_tokens_in_flight();
            let load = pod.begin_request(target.uncached_tokens);
            let peer = peer_for(pod.addr(), settings);
            let sent_at = Instant::now();
            let upstream = match self
                .send(session, &peer, pod, exchange, settings, &mut || {
                    on_sent(next)
                })
                .await
            {
                Ok(upstream) => upstream,
                Err(AttemptError::NotDelivered { error, stale }) => {
                    if stale && stale_retries > 0 {
                        stale_retries -= 1;
                        report.attempts -= 1;
                        tracing::debug!(request_id = exchange.request_id, pod = %pod.addr(), error = %error, "pooled connection was closed by the pod; writing the request again over a fresh one");
                        continue;
                    }
                    let ejected = pod.record_failure(
                        now_ms(),
                        settings.eject_after_failures,
                        settings.eject_for,
                    );
                    tracing::warn!(request_id = exchange.request_id, pod = %pod.addr(), error = %error, ejected, "the request could not be delivered to the pod; trying the next one");
                    last_failure = Some((pod.addr(), error));
                    next += 1;
                    continue;
                }
                Err(AttemptError::Fatal(error)) => {
                    if matches!(
                        error,
                        ForwardError::ResponseTimeout { .. }
                            | ForwardError::NoResponse { .. }
                            | ForwardError::BadUpstreamResponse { .. }
                    ) {
                        let ejected = pod.record_failure(
                            now_ms(),
                            settings.eject_after_failures,
                            settings.eject_for,
                        );
                        tracing::warn!(request_id = exchange.request_id, pod = %pod.addr(), %error, ejected, "the pod failed a request it received; not retried elsewhere");
                    }
                    report.error = Some(error);
                    return None;
                }
            };
            let status = upstream.get_status().map_or(0, |s| s.as_u16());
            report.status = Some(status);
            if status >= 500 {
                pod.record_failure(now_ms(), settings.eject_after_failures, settings.eject_for);
            } else {
                pod.record_success();
            }
            return Some(Delivered {
                upstream,
                peer,
                load,
                sent_at,
            });
        }
        report.error = Some(match last_failure {
            Some((pod, last)) => ForwardError::AllAttemptsFailed {
                attempts: report.attempts,
                pod,
                last,
            },
            None => ForwardError::NoCandidates,
        });
        None
    }

    /// Reads the response body whole into `body`, watching the client meanwhile.
    async fn read_whole(
        &self,
        session: &mut Session,
        delivered: &mut Delivered,
        max_bytes: usize,
        body: &mut bytes::BytesMut,
        report: &mut ForwardReport,
    ) -> Result<(), ForwardError> {
        let pod = delivered.load.pod().addr();
        while !delivered.upstream.is_body_done() {
            let chunk = tokio::select! {
                biased;
                chunk = delivered.upstream.read_body_bytes() => chunk,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    return Err(ForwardError::ClientGone);
                }
            };
            match chunk {
                Ok(Some(chunk)) if body.len() + chunk.len() > max_bytes => {
                    return Err(ForwardError::ResponseTooLarge { pod, max_bytes });
                }
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(source) => return Err(ForwardError::Interrupted { pod, source }),
            }
        }
        report.time_to_first_byte = Some(delivered.sent_at.elapsed());
        delivered.load.prefill_finished();
        Ok(())
    }

    /// Connects, sends the request and waits for the final response header, watching the
    /// client meanwhile (prefill of a long prompt can take a while).
    async fn send(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        pod: &Pod,
        exchange: &Exchange<'_>,
        settings: &ForwardSettings,
        on_sent: &mut (dyn FnMut() + Send),
    ) -> Result<HttpSession, AttemptError> {
        let (mut upstream, reused) = match self.connector.get_http_session(peer).await {
            Ok(connected) => connected,
            Err(error) => {
                if error.etype() == &ErrorType::ConnectRefused && pod.connection_refused() {
                    tracing::warn!(pod = %pod.addr(), name = %pod.endpoint.name, "pod refused a connection: its process is gone, and what kvgate knew of its cache with it");
                }
                return Err(AttemptError::NotDelivered {
                    error,
                    stale: false,
                });
            }
        };
        pod.connected();
        upstream.read_timeout = Some(settings.response_timeout);
        upstream.write_timeout = Some(settings.response_timeout);
        // Writing failed before the request was whole: the pod cannot act on it.
        let undelivered = |error| AttemptError::NotDelivered {
            error,
            stale: reused,
        };
        upstream
            .write_request_header(Box::new(exchange.header.clone()))
            .await
            .map_err(undelivered)?;
        if !exchange.body.is_empty() {
            upstream
                .write_body(exchange.body)
                .await
                .map_err(undelivered)?;
        }
        upstream.finish_body().await.map_err(undelivered)?;
        on_sent();
        let pod = pod.addr();
        let header = async {
            loop {
                upstream.read_response().await?;
                match upstream.get_status() {
                    Some(s) if s.is_informational() && s.as_u16() != 101 => continue,
                    _ => return Ok::<_, Box<pingora::Error>>(()),
                }
            }
        };
        let read = tokio::select! {
            read = header => read,
            _ = session.downstream_session.read_body_or_idle(true) => {
                return Err(AttemptError::Fatal(ForwardError::ClientGone));
            }
        };
        match read {
            Ok(()) => Ok(upstream),
            Err(error) => Err(match error.etype() {
                ErrorType::ReadTimedout => AttemptError::Fatal(ForwardError::ResponseTimeout {
                    pod,
                    after: settings.response_timeout,
                }),
                ErrorType::InvalidHTTPHeader | ErrorType::H1Error => {
                    AttemptError::Fatal(ForwardError::BadUpstreamResponse { pod, source: error })
                }
                _ => AttemptError::Fatal(ForwardError::NoResponse { pod, source: error }),
            }),
        }
    }

    /// Writes the response header downstream, then each body chunk as it arrives.
    async fn stream_response(
        &self,
        session: &mut Session,
        upstream: &mut HttpSession,
        exchange: &Exchange<'_>,
        load: &mut crate::pods::InFlight,
        sent_at: Instant,
        report: &mut ForwardReport,
    ) -> Result<(), ForwardError> {
        let pod = load.pod().addr();
        let Some(upstream_header) = upstream.resp_header() else {
            return Err(ForwardError::BadUpstreamResponse {
                pod,
                source: pingora::Error::explain(ErrorType::H1Error, "no response header"),
            });
        };
        let content_type = upstream_header
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let http10 = session.req_header().version == Version::HTTP_10;
        let downstream_header = downstream_header(upstream_header, exchange.request_id, http10)
            .map_err(|source| ForwardError::BadUpstreamResponse { pod, source })?;
        if http10 {
            session.set_keepalive(None);
        }
        let body_done = upstream.is_body_done();
        report.response_started = true;
        session
            .write_response_header(Box::new(downstream_header), body_done)
            .await
            .map_err(|_| ForwardError::ClientGone)?;
        let mut usage = UsageTap::for_content_type(&content_type);
        while !upstream.is_body_done() {
            // Upstream first: a client may close the moment it holds the whole answer, while
            // the upstream's end of body is already readable.
            let chunk = tokio::select! {
                biased;
                chunk = upstream.read_body_bytes() => chunk,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    // Gone after the answer's usage (the end of a JSON body, or an SSE
                    // stream's last event) went out: a finished response, not an abandoned one.
                    return match usage.finish() {
                        Some(complete) => {
                            report.usage = Some(complete);
                            Ok(())
                        }
                        None => Err(ForwardError::ClientGone),
                    };
                }
            };
            let chunk = match chunk {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(source) => {
                    // The framing promised more: break the downstream response off too.
                    // Closing here, before Pingora finishes the response, keeps it from
                    // writing the last chunk, which would make the cut stream look whole
                    // and the connection reusable to the client, whose next request on it
                    // would then be lost unanswered.
                    session.set_keepalive(None);
                    session.downstream_session.shutdown().await;
                    return Err(ForwardError::Interrupted { pod, source });
                }
            };
            if report.time_to_first_byte.is_none() {
                report.time_to_first_byte = Some(sent_at.elapsed());
                load.prefill_finished();
            }
            usage.feed(&chunk);
            session
                .write_response_body(Some(chunk), false)
                .await
                .map_err(|_| ForwardError::ClientGone)?;
        }
        session
            .write_response_body(None, true)
            .await
            .map_err(|_| ForwardError::ClientGone)?;
        if report.time_to_first_byte.is_none() {
            report.time_to_first_byte = Some(sent_at.elapsed());
        }
        report.usage = usage.finish();
        Ok(())
    }
}

fn peer_for(addr: SocketAddr, settings: &ForwardSettings) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(settings.connect_timeout);
    peer.options.idle_timeout = Some(POOL_IDLE);
    peer
}

/// The upstream's response header minus hop-by-hop fields, with kvgate's framing: the
/// upstream's `Content-Length` when it gave one, else chunked (HTTP/1.1) so every upstream
/// chunk is flushed to the client as it comes (close-delimited for HTTP/1.0 clients).
fn downstream_header(
    upstream: &ResponseHeader,
    request_id: &str,
    http10: bool,
) -> pingora::Result<ResponseHeader> {
    let mut out = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 2))?;
    for (name, value) in upstream.headers.iter() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out.append_header(name.clone(), value.clone())?;
        }
    }
    let chunked_upstream = upstream.headers.get(header::TRANSFER_ENCODING).is_some();
    let bodiless = matches!(upstream.status.as_u16(), 204 | 304);
    if chunked_upstream || !upstream.headers.contains_key(header::CONTENT_LENGTH) {
        out.remove_header(&header::CONTENT_LENGTH);
        if !http10 && !bodiless {
            out.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
    }
    if !out.headers.contains_key(super::REQUEST_ID_HEADER) {
        out.insert_header(super::REQUEST_ID_HEADER, request_id)?;
    }
    Ok(out)
}
