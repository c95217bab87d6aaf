//! kvgate's data plane: a Pingora [`ProxyHttp`] service for the OpenAI-compatible API.
//!
//! Every request is answered from `request_filter`: the body is read whole (routing
//! needs the prompt, see `body`), the pod is chosen, and `forward` runs the upstream
//! exchange itself. Pingora's own proxy loop is never entered, so `upstream_peer` is
//! unreachable. This file only dispatches by path and writes the log line.

mod body;
mod disagg;
mod errors;
mod flow;
mod forward;
mod limits;
mod log;
mod pipeline;
mod priority;
mod usage;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use body::BodyBudget;
pub use errors::ApiError;
pub use forward::{ForwardError, ForwardReport, ForwardSettings, Forwarder};
pub use limits::LimitedListener;
pub use log::RequestCtx;
pub use usage::{Usage, UsageTap};

use crate::gateway::Gateway;
use crate::tokenize::Endpoint;
use crate::trace::TraceRecorder;

/// Carries the request id from the client (when it sent one) to the pod and back.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Session-affinity key handed to the scheduler's plugins.
pub const SESSION_HEADER: &str = "x-session-id";

/// The OpenAI-compatible proxy service.
pub struct KvGateProxy {
    gateway: Arc<Gateway>,
    forwarder: Forwarder,
    /// Request bodies held across all connections (`server.maxBufferedBodyBytes`).
    bodies: Arc<BodyBudget>,
    trace: TraceRecorder,
}

impl KvGateProxy {
    pub fn new(gateway: Arc<Gateway>, trace: TraceRecorder) -> Self {
        Self {
            gateway,
            forwarder: Forwarder::new(),
            bodies: Arc::default(),
            trace,
        }
    }

    async fn models(&self, session: &mut Session, ctx: &RequestCtx) -> pingora::Result<()> {
        let body = self.gateway.state().models_json();
        write_json(session, 200, body, &ctx.request_id).await
    }
}

/// What a request path is, for dispatch.
enum PathKind {
    Inference(Endpoint),
    Models,
    Passthrough,
    NotAllowed,
    NotFound,
}

fn classify(method: &Method, path: &str) -> PathKind {
    let inference = match path {
        "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
        "/v1/completions" => Some(Endpoint::Completions),
        _ => None,
    };
    match (inference, path) {
        (Some(endpoint), _) if method == Method::POST => PathKind::Inference(endpoint),
        (Some(_), _) => PathKind::NotAllowed,
        (None, "/v1/models") if method == Method::GET => PathKind::Models,
        (None, "/v1/models") => PathKind::NotAllowed,
        (None, p) if p.starts_with("/v1/") => PathKind::Passthrough,
        _ => PathKind::NotFound,
    }
}

#[async_trait]
impl ProxyHttp for KvGateProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        limits::request_started(session);
        ctx.begin(session.req_header());
        ctx.active = Some(self.gateway.begin_request());
        if self.gateway.is_draining() {
            // This process is going away: the client's next request must open a new
            // connection, which lands on the process that took over the socket.
            session.set_keepalive(None);
        }
        let header_check = {
            let state = self.gateway.state();
            let server = &state.config.server;
            if server.keep_alive_timeout_ms == 0 {
                session.set_keepalive(None);
            }
            limits::check_header(session, server)
        };
        let outcome = if let Err(error) = header_check {
            // A client past the header limits is broken or hostile: no further request
            // on this connection.
            session.set_keepalive(None);
            Err(error)
        } else {
            let header = session.req_header();
            match classify(&header.method, header.uri.path()) {
                PathKind::Inference(endpoint) => self.inference(session, ctx, endpoint).await,
                PathKind::Passthrough => self.passthrough(session, ctx).await,
                PathKind::Models => return self.models(session, ctx).await.map(|()| true),
                PathKind::NotAllowed => Err(ApiError::method_not_allowed(
                    header.method.as_str(),
                    header.uri.path(),
                )),
                PathKind::NotFound => Err(ApiError::path_not_found(header.uri.path())),
            }
        };
        if let Err(error) = outcome {
            if ctx.error.is_none() {
                ctx.error = Some(error.message.clone());
            }
            // The client may still be sending a body we will not read: answer, let it
            // finish sending (unless it was too slow sending it at all), then close.
            let unread_body = !session.is_body_done();
            if unread_body {
                session.set_keepalive(None);
            }
            errors::respond(session, &error, &ctx.request_id).await?;
            if unread_body && error.status != 408 {
                body::discard_rest(session).await;
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::InternalError,
            "kvgate answers every request in request_filter; Pingora's proxy loop is not used",
        )
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        limits::request_finished(session);
        let response = session.response_written();
        let status = response.map_or(0, |h| h.status.as_u16());
        let streamed = response
            .and_then(|h| h.headers.get(http::header::CONTENT_TYPE))
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        ctx.log_handled(status, error);
        ctx.record_metrics(crate::metrics::global(), status, streamed);
        if self.gateway.state().config.trace.is_some() {
            if let Some(entry) = ctx.take_trace_entry() {
                self.trace.record(entry);
            }
        }
    }
}

/// A complete JSON response.
async fn write_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(status, Some(3))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    header.insert_header(REQUEST_ID_HEADER, request_id)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
