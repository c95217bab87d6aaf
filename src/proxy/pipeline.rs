//! The request path: body → parse → model → tokens → block keys → schedule → forward.
//!
//! Routing is best effort: when tokenizing fails the request is still routed, on load
//! alone, and the pod gives the authoritative answer. Only what makes the request
//! unroutable (unreadable body, unknown model, no pod) is answered here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Method};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use serde::Deserialize;

use super::body::{self, BodyError, BodyHold};
use super::disagg::{PrefillInput, PrefillOutcome};
use super::errors::ApiError;
use super::forward::{Exchange, ForwardError, ForwardSettings, Target};
use super::log::RequestCtx;
use super::priority;
use super::{KvGateProxy, REQUEST_ID_HEADER, SESSION_HEADER};
use crate::gateway::{split, GatewayState, Route};
use crate::hash::ExtraKeys;
use crate::metrics::ClientWait;
use crate::plugins::{RequestOutcome, SchedulingRequest};
use crate::scheduler::Pipeline;
use crate::tokenize::{self, Endpoint, RequestError, TokenizeError};

/// Request headers that describe the client connection or that kvgate rewrites.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
    REQUEST_ID_HEADER,
];

/// The prompt as the router sees it.
struct Prompt {
    tokens: usize,
    block_keys: Vec<u64>,
    /// When routing began (the body was read), for the decision latency.
    routing_since: Instant,
}

impl Prompt {
    /// No prompt to route on: the scheduler falls back to load.
    fn unknown(routing_since: Instant) -> Self {
        Self {
            tokens: 0,
            block_keys: Vec::new(),
            routing_since,
        }
    }
}

/// Whether a parse error means the request is malformed (vLLM would refuse it too), as
/// opposed to well-formed input the router cannot read a prompt from.
fn request_is_faulty(error: &RequestError) -> bool {
    !matches!(
        error,
        RequestError::Multimodal { .. } | RequestError::Unsupported { .. }
    )
}

/// Whether a prompt error is the client's (vLLM would answer 400 the same way). The others
/// (no template configured here, a template our engine renders differently, a tokenizer
/// failure) are kvgate's limits: the request still goes out, routed on load.
fn prompt_is_faulty(error: &TokenizeError) -> bool {
    match error {
        TokenizeError::Request(e) => request_is_faulty(e),
        TokenizeError::TemplateRaised { .. }
        | TokenizeError::ContinueFinalMessage { .. }
        | TokenizeError::TokenIdOutOfRange { .. } => true,
        TokenizeError::NoChatTemplate
        | TokenizeError::Template { .. }
        | TokenizeError::Tokenizer { .. } => false,
    }
}

/// The `model` field of a JSON body, read without the rest.
fn model_field(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ModelField {
        model: Option<String>,
    }
    serde_json::from_slice::<ModelField>(body).ok()?.model
}

/// When `model` names a canary split: draws its target, which replaces `model` here and
/// in the body the pod will receive.
fn apply_split(
    state: &GatewayState,
    ctx: &mut RequestCtx,
    model: &mut String,
    body: &mut bytes::Bytes,
) -> Result<(), ApiError> {
    let Some(split) = state.split(model) else {
        return Ok(());
    };
    let chosen = split.choose(rand::random::<f64>());
    *body = split::replace_model(body, chosen).ok_or_else(|| {
        ApiError::invalid_request(
            "invalid_body",
            "The body must be a JSON object with one `model` field.".into(),
        )
    })?;
    *model = chosen.to_string();
    ctx.split_choice = Some(chosen.to_string());
    Ok(())
}

fn resolve<'a>(state: &'a GatewayState, model: &str) -> Result<&'a Route, ApiError> {
    state
        .route(model)
        .ok_or_else(|| ApiError::model_not_found(model))
}

impl KvGateProxy {
    /// `/v1/chat/completions` and `/v1/completions`: routed on the prompt's cached prefix.
    pub(super) async fn inference(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        endpoint: Endpoint,
    ) -> Result<(), ApiError> {
        let state = self.gateway.state();
        let (mut body, mut hold) = self.read_body(session, &state).await?;
        let routing_since = Instant::now();
        let mut request = match tokenize::parse_request(endpoint, &body) {
            Ok(request) => request,
            Err(error) if !request_is_faulty(&error) => {
                // Valid for the pod, only not understood by the router (e.g. images).
                let model = model_field(&body).ok_or_else(|| ApiError::from(&error))?;
                tracing::info!(request_id = %ctx.request_id, %model, %error, "prompt not routable; routing on load alone");
                return self
                    .dispatch_on_load(session, ctx, &state, model, routing_since, &body, &mut hold)
                    .await;
            }
            Err(error) => return Err(ApiError::from(&error)),
        };
        ctx.model = Some(request.model.clone());
        apply_split(&state, ctx, &mut request.model, &mut body)?;
        let route = resolve(&state, &request.model)?;
        let prompt = match route.model.tokenizer.tokens(&request) {
            Ok(tokens) => {
                let mut hashes = Vec::with_capacity(tokens.len() / route.model.block_size.max(1));
                let extra = ExtraKeys {
                    lora: route.lora.clone(),
                    cache_salt: request.cache_salt.clone(),
                };
                route.model.hasher.hash_prompt(&tokens, &extra, &mut hashes);
                Prompt {
                    tokens: tokens.len(),
                    block_keys: hashes.iter().map(|h| h.key).collect(),
                    routing_since,
                }
            }
            Err(error) if prompt_is_faulty(&error) => return Err(ApiError::from(&error)),
            Err(error) => {
                tracing::warn!(request_id = %ctx.request_id, model = %request.model, %error, "cannot tokenize the request; routing it on load alone");
                Prompt::unknown(routing_since)
            }
        };
        let outcome = self
            .dispatch(session, ctx, &state, route, &prompt, &body, &mut hold)
            .await;
        ctx.prompt_blocks = prompt.block_keys;
        outcome
    }

    /// Any other `/v1/*` path: sent to a pod of the model the body names (or the only
    /// model), routed on load.
    pub(super) async fn passthrough(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), ApiError> {
        let state = self.gateway.state();
        let (body, mut hold) = self.read_body(session, &state).await?;
        let routing_since = Instant::now();
        let named = is_json(session.req_header())
            .then(|| model_field(&body))
            .flatten();
        let model = match named {
            Some(model) => model,
            None => state.sole_model().map(str::to_string).ok_or_else(|| {
                ApiError::invalid_request(
                    "model_required",
                    "Several models are served: name one in the JSON body's `model`.".into(),
                )
            })?,
        };
        self.dispatch_on_load(session, ctx, &state, model, routing_since, &body, &mut hold)
            .await
    }

    /// Sends the request to a pod of `model` chosen without a prompt to route on.
    #[allow(clippy::too_many_arguments)]
    async fn dispatch_on_load(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &Arc<GatewayState>,
        mut model: String,
        routing_since: Instant,
        body: &bytes::Bytes,
        hold: &mut BodyHold,
    ) -> Result<(), ApiError> {
        ctx.model = Some(model.clone());
        let mut body = body.clone();
        apply_split(state, ctx, &mut model, &mut body)?;
        let route = resolve(state, &model)?;
        self.dispatch(
            session,
            ctx,
            state,
            route,
            &Prompt::unknown(routing_since),
            &body,
            hold,
        )
        .await
    }

    /// Schedules the request among the model's pods and forwards it. `hold` is the body's
    /// charge to the body budget, which the legs of a disaggregated request add to.
    #[allow(clippy::too_many_arguments)]
    async fn dispatch(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &Arc<GatewayState>,
        route: &Route,
        prompt: &Prompt,
        body: &bytes::Bytes,
        hold: &mut BodyHold,
    ) -> Result<(), ApiError> {
        let runtime = &route.model;
        ctx.target_model = Some(runtime.name.clone());
        ctx.prompt_tokens = Some(prompt.tokens);
        ctx.block_size = runtime.block_size;
        let server = &state.config.server;
        let requested_profile = header_str(session.req_header(), &server.profile_header);
        let profile: &Pipeline = runtime
            .scheduler
            .profile(requested_profile)
            .ok_or_else(|| {
                ApiError::invalid_request(
                    "unknown_profile",
                    format!(
                        "Unknown scheduling profile {:?} in header {} (defined: {}).",
                        requested_profile.unwrap_or_default(),
                        server.profile_header,
                        runtime
                            .scheduler
                            .profile_names()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        ctx.policy = Some(profile.name().to_string());
        let affinity = header_str(session.req_header(), SESSION_HEADER).map(str::to_string);
        // With `flowControl.forwardPriority` the pod orders its own queue by the priority too.
        let prioritized = self
            .gateway
            .flow
            .vllm_priority(&runtime.name, &session.req_header().headers)
            .and_then(|priority| priority::with_priority(body, priority));
        let body = prioritized.as_ref().unwrap_or(body);
        let mut upstream_header =
            upstream_header(session.req_header(), body.len(), &ctx.request_id)
                .map_err(|e| ApiError::invalid_request("invalid_header", e.to_string()))?;

        // Flow control: while the model's pods are saturated the request waits here,
        // and is scored and routed only once dispatched.
        let Some(mut dispatch) = self
            .wait_for_dispatch(session, ctx, &runtime.name, body.len())
            .await?
        else {
            return Ok(());
        };
        let pods = self.gateway.pods.pods(&runtime.name).unwrap_or_default();
        // The prefill leg records itself in `ctx` while the request is still borrowed.
        let request_id = ctx.request_id.clone();
        let request = SchedulingRequest {
            request_id: &request_id,
            model: &runtime.name,
            scope: route.scope,
            adapter: route.lora.as_ref().map(|lora| lora.name.as_str()),
            block_keys: &prompt.block_keys,
            block_size: runtime.block_size,
            prompt_tokens: prompt.tokens,
            session: affinity.as_deref(),
            now: self.gateway.now(),
        };
        let decision = profile.schedule(&request, &pods);
        crate::metrics::global().decision_latency(prompt.routing_since.elapsed());
        ctx.scores = Some(decision.scores_summary());
        if decision.ranked.is_empty() {
            return Err(ApiError::no_healthy_pod(&runtime.name));
        }
        let targets: Vec<Target> = decision
            .ranked
            .iter()
            .map(|c| Target {
                pod: Arc::clone(&c.pod),
                uncached_tokens: c.uncached_tokens(&request) as u64,
            })
            .collect();
        let settings = ForwardSettings::from(server);
        let mut body = body.clone();
        if let Some(stage) = profile.prefill() {
            let exchange = Exchange {
                header: &upstream_header,
                body: &body,
                request_id: &request_id,
            };
            let input = PrefillInput {
                stage,
                request: &request,
                pods: &pods,
                decode_uncached: decision.ranked[0].uncached_tokens(&request),
                exchange: &exchange,
                settings: &settings,
                hold,
            };
            match self.prefill_leg(session, ctx, input).await {
                PrefillOutcome::Decode(decode_body) => body = decode_body,
                PrefillOutcome::ClientGone => {
                    return conclude(session, ctx, ForwardError::ClientGone, false)
                }
            }
            upstream_header
                .insert_header(header::CONTENT_LENGTH, body.len())
                .map_err(|e| ApiError::invalid_request("invalid_header", e.to_string()))?;
        }
        let exchange = Exchange {
            header: &upstream_header,
            body: &body,
            request_id: &request_id,
        };
        let gateway = &self.gateway;
        let now_ms = || gateway.now().as_millis() as u64;
        let report = self
            .forwarder
            .forward(session, &exchange, &targets, &settings, &now_ms, &mut |i| {
                dispatch.placed();
                if let Some(chosen) = decision.ranked.get(i) {
                    profile.routed(&request, chosen);
                }
            })
            .await;

        ctx.attempts = report.attempts;
        ctx.upstream_status = report.status;
        ctx.time_to_first_byte = report.time_to_first_byte;
        ctx.actual_cached_tokens = report.usage.and_then(|u| u.cached_tokens);
        ctx.output_tokens = report.usage.and_then(|u| u.completion_tokens);
        if let Some(i) = report.target {
            let (Some(candidate), Some(target)) = (decision.ranked.get(i), targets.get(i)) else {
                return Ok(());
            };
            let predicted =
                (candidate.cached_blocks as usize * runtime.block_size).min(prompt.tokens);
            ctx.endpoint = Some(target.pod.addr());
            ctx.predicted_cached_tokens = Some(predicted);
            ctx.pod_in_flight = Some(target.pod.in_flight());
            profile.completed(&RequestOutcome {
                pod: Arc::clone(&target.pod),
                prompt_tokens: prompt.tokens,
                queued_uncached_tokens: report.queued_uncached_tokens,
                predicted_cached_tokens: predicted,
                actual_cached_tokens: ctx.actual_cached_tokens.map(|n| n as usize),
                time_to_first_token: report.time_to_first_byte,
                success: report.error.is_none() && report.status.is_some_and(|s| s < 500),
            });
        }
        match report.error {
            None => Ok(()),
            Some(error) => conclude(session, ctx, error, report.response_started),
        }
    }
}

/// How a request whose exchange with a pod failed ends for the client.
fn conclude(
    session: &mut Session,
    ctx: &mut RequestCtx,
    error: ForwardError,
    response_started: bool,
) -> Result<(), ApiError> {
    ctx.error = Some(error.to_string());
    match error {
        ForwardError::ClientGone => {
            session.set_keepalive(None);
            Ok(())
        }
        _ if response_started => Ok(()),
        error => Err(ApiError::from(&error)),
    }
}

impl KvGateProxy {
    /// The request body, and its charge to the body budget, which the caller holds for
    /// as long as the body lives (until the request ends).
    async fn read_body(
        &self,
        session: &mut Session,
        state: &GatewayState,
    ) -> Result<(bytes::Bytes, BodyHold), ApiError> {
        let server = &state.config.server;
        let timeout = Duration::from_millis(server.body_timeout_ms);
        let mut hold = self.bodies.hold(server.max_buffered_body_bytes);
        let body = body::read_body(session, server.max_body_bytes, timeout, &mut hold)
            .await
            .map_err(|e: BodyError| {
                match &e {
                    BodyError::TimedOut { .. } => {
                        crate::metrics::global().connection_timed_out(ClientWait::Body)
                    }
                    BodyError::BufferFull { .. } => crate::metrics::global().body_buffer_full(),
                    BodyError::TooLarge { .. } | BodyError::Read(_) => {}
                }
                ApiError::from(&e)
            })?;
        Ok((body, hold))
    }
}

fn header_str<'a>(header: &'a RequestHeader, name: &str) -> Option<&'a str> {
    header.headers.get(name).and_then(|v| v.to_str().ok())
}

fn is_json(header: &RequestHeader) -> bool {
    header
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
}

/// The client's request header for the pod: same method, path and end-to-end headers,
/// the exact `Content-Length` of the body (which is sent whole, never chunked), and the
/// request id.
fn upstream_header(
    client: &RequestHeader,
    body_len: usize,
    request_id: &str,
) -> pingora::Result<RequestHeader> {
    let mut out = RequestHeader::build(
        client.method.clone(),
        client.raw_path(),
        Some(client.headers.len() + 2),
    )?;
    for (name, value) in client.headers.iter() {
        if !NOT_FORWARDED.contains(&name.as_str()) {
            out.append_header(name.clone(), value.clone())?;
        }
    }
    let body_method = matches!(client.method, Method::POST | Method::PUT | Method::PATCH);
    if body_len > 0 || body_method {
        out.insert_header(header::CONTENT_LENGTH, body_len)?;
    }
    out.insert_header(REQUEST_ID_HEADER, request_id)?;
    Ok(out)
}
