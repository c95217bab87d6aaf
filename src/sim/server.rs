//! A simulated pod's HTTP face: vLLM's OpenAI-compatible server where a router
//! can see it, plus `/sim/` endpoints for faults.
//!
//! * `POST /v1/chat/completions`, `POST /v1/completions`: the request is parsed,
//!   rendered and tokenized exactly as a vLLM pod does ([`crate::tokenize`]),
//!   hashed with the pods' block hash ([`crate::hash`]) and run by the engine.
//!   Responses have vLLM's shapes, `usage.prompt_tokens_details.cached_tokens`
//!   included; streams send one SSE chunk per token as the engine samples it.
//!   The engine always generates `max_tokens` tokens (`finish_reason: "length"`);
//!   the text is filler words, one per token.
//! * `GET /v1/models`, `GET /health`, `GET /metrics` (vLLM's metric names),
//!   `POST /reset_prefix_cache`.
//! * `/sim/state`, `/sim/faults`, `/sim/pause`, `/sim/resume`, `/sim/restart`,
//!   `/sim/kill` on each pod; [`control_router`] serves the same per pod by
//!   index on a separate port, which also reaches pods that are down.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::engine::{KvTransfer, PodParams, RequestSummary, SubmitError};
use super::pod::{
    EventLora, PodControl, PodError, PodHandle, PodLifecycle, PodRequest, StreamItem, Submission,
    WireForm, TTFT_BUCKETS,
};
use super::publisher::{EventFaults, PublisherCounts, PublisherStats};
use crate::discovery::{Leg, PodRole};
use crate::hash::{BlockHasher, ExtraKeys, LoraKey};
use crate::tokenize::{parse_request, ApiError, Endpoint, ModelTokenizer};
use crate::vllm::VllmRelease;

/// Largest request body accepted (axum's default of 2 MiB is below long-context
/// prompts; vLLM itself sets no limit). Matches kvgate's default `maxBodyBytes`.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// vLLM's `CompletionRequest.max_tokens` default.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// vLLM renamed `gpu_cache_usage_perc` and `gpu_prefix_cache_*` (deprecated in
/// 0.10, hidden from 0.11 on).
const RENAMED_METRICS_HIDDEN_FROM: VllmRelease = VllmRelease::new(0, 11, 0);

/// vLLM 0.10.0–0.11.0 fail a LoRA request whose blocks get cached while KV
/// events are on (their block pool reads a non-existent `lora_request.id`).
const LORA_EVENTS_WORK_FROM: VllmRelease = VllmRelease::new(0, 11, 1);

/// Filler text: output token `i` of a request is one of these words (the
/// first token of a response without its leading space).
const WORDS: [&str; 32] = [
    " the",
    " cache",
    " routes",
    " every",
    " prefix",
    " to",
    " a",
    " warm",
    " pod",
    " and",
    " blocks",
    " stay",
    " hot",
    " while",
    " queues",
    " drain",
    " so",
    " latency",
    " falls",
    " as",
    " tokens",
    " flow",
    " through",
    " paged",
    " memory",
    " with",
    " batches",
    " of",
    " requests",
    " that",
    " share",
    " context",
];

/// The served model, shared by every pod of the simulation.
pub struct SimModel {
    /// vLLM's `--served-model-name`.
    pub name: String,
    pub tokenizer: ModelTokenizer,
    pub hasher: BlockHasher,
    /// LoRA adapters by the name requests use.
    pub adapters: HashMap<String, LoraKey>,
    pub wire: WireForm,
    pub release: VllmRelease,
    pub max_model_len: u32,
    /// `max_tokens` of a chat request that sets none (vLLM would run to the
    /// context limit or EOS; the simulator has no EOS).
    pub default_max_tokens: u32,
    /// Which legs of disaggregated requests the pods take (`both`: either, and plain
    /// requests in every case).
    pub role: PodRole,
}

impl std::fmt::Debug for SimModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimModel")
            .field("name", &self.name)
            .field("release", &self.release)
            .finish_non_exhaustive()
    }
}

/// What one pod incarnation's routes read.
#[derive(Debug)]
pub struct PodContext {
    pub model: Arc<SimModel>,
    pub engine: PodHandle,
    pub faults: Arc<EventFaults>,
    pub publisher: Option<Arc<PublisherStats>>,
    pub index: usize,
    pub topic: String,
    pub params: PodParams,
    pub lifecycle: PodLifecycle,
    pub started_unix_s: u64,
    /// Where a decode pod pulls this pod's KV from (the sim has no NIXL side channel: its
    /// HTTP address stands for it).
    pub http: SocketAddr,
    /// vLLM's per-start engine id, named in the `kv_transfer_params` of prefill legs.
    pub engine_id: String,
}

/// The routes of one pod.
pub fn pod_router(context: Arc<PodContext>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/sim/state", get(sim_state))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .route("/sim/pause", post(pause))
        .route("/sim/resume", post(resume))
        .route("/sim/restart", post(restart))
        .route("/sim/kill", post(kill))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(context)
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// vLLM's error body: `{"error": {"message", "type", "param", "code"}}`.
fn error_response(status: StatusCode, message: String, param: Option<&str>) -> Response {
    let kind = match status {
        StatusCode::BAD_REQUEST => "BadRequestError",
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
        _ => "InternalServerError",
    };
    let body = json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": status.as_u16(),
        }
    });
    (status, Json(body)).into_response()
}

fn api_error_response(error: &ApiError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST);
    error_response(status, error.message.clone(), error.param.as_deref())
}

fn engine_gone() -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine is not running".into(),
        None,
    )
}

fn submit_error_response(error: &SubmitError, max_model_len: u32) -> Response {
    let (message, param) = match error {
        SubmitError::TooLong {
            prompt_tokens,
            max_tokens,
            ..
        } => (
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {} tokens ({prompt_tokens} in the messages, {max_tokens} in the \
                 completion). Please reduce the length of the messages or completion.",
                u64::from(*prompt_tokens) + u64::from(*max_tokens)
            ),
            Some("max_tokens"),
        ),
        SubmitError::EmptyPrompt(_) => ("The decoder prompt cannot be empty".into(), None),
        SubmitError::NoOutput(_) => (
            "max_tokens must be at least 1, got 0.".into(),
            Some("max_tokens"),
        ),
        SubmitError::PriorityNotEnabled { .. } => (error.to_string(), Some("priority")),
        SubmitError::DuplicateId(_) | SubmitError::TooManyBlockKeys { .. } => {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string(), None)
        }
    };
    error_response(StatusCode::BAD_REQUEST, message, param)
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

/// Request fields the routing parser does not keep.
#[derive(Debug, Default, Deserialize)]
struct GenerationOptions {
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// vLLM's scheduling priority (lower first); only with `--scheduling-policy priority`.
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    kv_transfer_params: Option<KvTransferParams>,
}

/// The request's `kv_transfer_params`, as vLLM's NixlConnector reads them (the
/// reference proxy sends nulls for what a leg does not set).
#[derive(Debug, Default, Deserialize)]
struct KvTransferParams {
    #[serde(default)]
    do_remote_decode: Option<bool>,
    #[serde(default)]
    do_remote_prefill: Option<bool>,
    #[serde(default)]
    remote_engine_id: Option<String>,
    #[serde(default)]
    remote_block_ids: Option<Vec<u64>>,
}

/// The leg a request's `kv_transfer_params` make it, refused where the pod's role does
/// not take it or where vLLM's connector could not run it.
fn kv_transfer(
    params: Option<&KvTransferParams>,
    role: PodRole,
) -> Result<KvTransfer, (String, &'static str)> {
    const PARAM: &str = "kv_transfer_params";
    let Some(params) = params else {
        return Ok(KvTransfer::None);
    };
    let transfer = match (
        params.do_remote_decode.unwrap_or(false),
        params.do_remote_prefill.unwrap_or(false),
    ) {
        (false, false) => return Ok(KvTransfer::None),
        (true, true) => {
            return Err((
                "do_remote_decode and do_remote_prefill cannot both be true".into(),
                PARAM,
            ))
        }
        (true, false) => KvTransfer::KeepForRemoteDecode,
        (false, true) => {
            if params.remote_engine_id.is_none() || params.remote_block_ids.is_none() {
                return Err((
                    "do_remote_prefill needs remote_engine_id and remote_block_ids".into(),
                    PARAM,
                ));
            }
            KvTransfer::PullFromRemote
        }
    };
    let leg = match transfer {
        KvTransfer::PullFromRemote => Leg::Decode,
        _ => Leg::Prefill,
    };
    if !role.serves(leg) {
        return Err((
            format!("this pod's role is {role:?}: it takes no {leg:?} legs").to_lowercase(),
            PARAM,
        ));
    }
    Ok(transfer)
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Target of the line each request logs as it arrives (at debug level, off by default).
const REQUESTS_LOG_TARGET: &str = "kvgate::sim::requests";

async fn chat_completions(
    State(pod): State<Arc<PodContext>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    received(&pod, &headers);
    generate(&pod, Endpoint::ChatCompletions, &body).await
}

async fn completions(
    State(pod): State<Arc<PodContext>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    received(&pod, &headers);
    generate(&pod, Endpoint::Completions, &body).await
}

/// vLLM's `Received request <id>` line (its id from `X-Request-Id`): which pod read
/// which request, for checks that no request reached two pods.
fn received(pod: &PodContext, headers: &HeaderMap) {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::debug!(target: REQUESTS_LOG_TARGET, pod = pod.index, request_id, "Received request");
}

async fn generate(pod: &PodContext, endpoint: Endpoint, body: &[u8]) -> Response {
    let model = &pod.model;
    let request = match parse_request(endpoint, body) {
        Ok(request) => request,
        Err(error) => return api_error_response(&error.api_error()),
    };
    let options: GenerationOptions = match serde_json::from_slice(body) {
        Ok(options) => options,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, error.to_string(), None),
    };
    if options.n.is_some_and(|n| n != 1) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "kvgate sim generates one choice per request (n must be 1)".into(),
            Some("n"),
        );
    }
    let kv_transfer = match kv_transfer(options.kv_transfer_params.as_ref(), model.role) {
        Ok(transfer) => transfer,
        Err((message, param)) => {
            return error_response(StatusCode::BAD_REQUEST, message, Some(param))
        }
    };
    if request.prompt_count > 1 {
        return error_response(
            StatusCode::BAD_REQUEST,
            "kvgate sim runs one prompt per request".into(),
            Some("prompt"),
        );
    }
    let lora = if request.model == model.name {
        None
    } else if let Some(adapter) = model.adapters.get(&request.model) {
        if pod.publisher.is_some() && model.release < LORA_EVENTS_WORK_FROM {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "vLLM {} fails LoRA requests while KV-cache events are on",
                    model.release
                ),
                None,
            );
        }
        Some(adapter.clone())
    } else {
        return error_response(
            StatusCode::NOT_FOUND,
            format!("The model `{}` does not exist.", request.model),
            Some("model"),
        );
    };
    let tokens = match model.tokenizer.tokens(&request) {
        Ok(tokens) => tokens,
        Err(error) => return api_error_response(&error.api_error()),
    };
    let extra = ExtraKeys {
        lora: lora.clone(),
        cache_salt: request.cache_salt.clone(),
    };
    let mut hashes = Vec::new();
    model.hasher.hash_prompt(&tokens, &extra, &mut hashes);
    let prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    let max_tokens = request.max_tokens.unwrap_or(match endpoint {
        Endpoint::Completions => COMPLETIONS_DEFAULT_MAX_TOKENS,
        Endpoint::ChatCompletions => model
            .default_max_tokens
            .min(model.max_model_len.saturating_sub(prompt_tokens))
            .max(1),
    });
    let pod_request = PodRequest {
        tokens: tokens.into(),
        hashes: hashes.into(),
        max_tokens,
        lora: lora.map(|lora| EventLora {
            int_id: lora.int_id,
            name: lora.name.into(),
        }),
        cache_salt: request.cache_salt.map(Into::into),
        kv_transfer,
        priority: options.priority,
    };
    let submission = match pod.engine.submit(pod_request).await {
        Ok(submission) => submission,
        Err(PodError::Rejected(error)) => {
            return submit_error_response(&error, model.max_model_len)
        }
        Err(PodError::EngineGone) => return engine_gone(),
    };
    let reply = Reply {
        endpoint,
        id: response_id(endpoint),
        created: unix_now_s(),
        model: request.model,
        max_tokens,
        word_offset: submission.id.0 as usize,
        kv_source: (kv_transfer == KvTransfer::KeepForRemoteDecode).then(|| KvSource {
            engine_id: pod.engine_id.clone(),
            http: pod.http,
        }),
    };
    if request.stream {
        let include_usage = options
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        stream_response(reply, submission, include_usage)
    } else {
        complete_response(reply, submission).await
    }
}

/// What every chunk or body of one response repeats.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    max_tokens: u32,
    word_offset: usize,
    /// A prefill leg's pod: named in its answer's `kv_transfer_params`.
    kv_source: Option<KvSource>,
}

struct KvSource {
    engine_id: String,
    http: SocketAddr,
}

/// A prefill leg's answer's `kv_transfer_params`: where a decode pod pulls the KV, the
/// fields NixlConnector's `request_finished` returns.
#[derive(Serialize)]
struct TransferReply<'a> {
    do_remote_prefill: bool,
    do_remote_decode: bool,
    remote_block_ids: &'a [u32],
    remote_engine_id: &'a str,
    remote_host: String,
    remote_port: u16,
    tp_size: u32,
}

/// `null` in a response, where vLLM has a field it does not fill here.
type Null = Option<()>;

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: C,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChatDeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Null,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Null,
    finish_reason: Option<&'static str>,
    stop_reason: Null,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<Null>,
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    usage: Usage,
    prompt_logprobs: Null,
    kv_transfer_params: Option<TransferReply<'a>>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Null,
    finish_reason: &'static str,
    stop_reason: Null,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Null,
    annotations: Null,
    audio: Null,
    function_call: Null,
    tool_calls: [(); 0],
    reasoning_content: Null,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChoice<'a>; 1],
    usage: Usage,
    kv_transfer_params: Option<TransferReply<'a>>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    total_tokens: u64,
    completion_tokens: u32,
    prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: u32,
}

impl Usage {
    fn of(summary: &RequestSummary) -> Self {
        Self {
            prompt_tokens: summary.prompt_tokens,
            total_tokens: u64::from(summary.prompt_tokens) + u64::from(summary.output_tokens),
            completion_tokens: summary.output_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: summary.cached_tokens,
            },
        }
    }
}

impl Reply {
    fn token_text(&self, index: u32) -> &'static str {
        let word = WORDS[(self.word_offset + index as usize) % WORDS.len()];
        if index == 0 {
            word.trim_start()
        } else {
            word
        }
    }

    fn chunk<C>(&self, choices: C, usage: Option<Usage>) -> Chunk<'_, C> {
        Chunk {
            id: &self.id,
            object: match self.endpoint {
                Endpoint::ChatCompletions => "chat.completion.chunk",
                Endpoint::Completions => "text_completion",
            },
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }

    /// One SSE event: `data: <json>\n\n`.
    fn event(value: &impl Serialize) -> Bytes {
        let mut event = b"data: ".to_vec();
        // Serializing these plain structs into memory cannot fail.
        let _ = serde_json::to_writer(&mut event, value);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }

    /// The first chat chunk, sent before any token: the assistant role.
    fn role_chunk(&self) -> Bytes {
        Self::event(&self.chunk(
            [ChatDeltaChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: "",
                },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        ))
    }

    fn token_chunk(&self, index: u32) -> Bytes {
        let text = self.token_text(index);
        let finish_reason = (index + 1 >= self.max_tokens).then_some("length");
        match self.endpoint {
            Endpoint::ChatCompletions => Self::event(&self.chunk(
                [ChatDeltaChoice {
                    index: 0,
                    delta: Delta {
                        role: None,
                        content: text,
                    },
                    logprobs: None,
                    finish_reason,
                }],
                None,
            )),
            Endpoint::Completions => Self::event(&self.chunk(
                [TextChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason,
                    stop_reason: None,
                    prompt_logprobs: None,
                }],
                None,
            )),
        }
    }

    fn usage_chunk(&self, summary: &RequestSummary) -> Bytes {
        Self::event(&self.chunk([(); 0], Some(Usage::of(summary))))
    }

    fn body(&self, summary: &RequestSummary) -> Response {
        let text: String = (0..summary.output_tokens)
            .map(|index| self.token_text(index))
            .collect();
        let kv_transfer_params = self.kv_source.as_ref().map(|source| TransferReply {
            do_remote_prefill: true,
            do_remote_decode: false,
            remote_block_ids: summary.kept_blocks.as_deref().unwrap_or_default(),
            remote_engine_id: &source.engine_id,
            remote_host: source.http.ip().to_string(),
            remote_port: source.http.port(),
            tp_size: 1,
        });
        match self.endpoint {
            Endpoint::ChatCompletions => Json(ChatCompletion {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: &self.model,
                choices: [ChatChoice {
                    index: 0,
                    message: Message {
                        role: "assistant",
                        content: &text,
                        refusal: None,
                        annotations: None,
                        audio: None,
                        function_call: None,
                        tool_calls: [],
                        reasoning_content: None,
                    },
                    logprobs: None,
                    finish_reason: "length",
                    stop_reason: None,
                }],
                usage: Usage::of(summary),
                prompt_logprobs: None,
                kv_transfer_params,
            })
            .into_response(),
            Endpoint::Completions => Json(TextCompletion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: [TextChoice {
                    index: 0,
                    text: &text,
                    logprobs: None,
                    finish_reason: Some("length"),
                    stop_reason: None,
                    prompt_logprobs: Some(None),
                }],
                usage: Usage::of(summary),
                kv_transfer_params,
            })
            .into_response(),
        }
    }
}

fn response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::ChatCompletions => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

async fn complete_response(reply: Reply, mut submission: Submission) -> Response {
    while let Some(item) = submission.stream.recv().await {
        if let StreamItem::Finished(summary) = item {
            submission.guard.disarm();
            return reply.body(&summary);
        }
    }
    engine_gone()
}

/// The engine stopped before the request finished: the stream is cut, as a
/// dying vLLM process cuts it.
#[derive(Debug, thiserror::Error)]
#[error("the pod's engine stopped before the request finished")]
struct StreamCut;

enum StreamPhase {
    Start,
    Tokens,
    Done,
    End,
}

struct SseStream {
    reply: Reply,
    submission: Submission,
    include_usage: bool,
    phase: StreamPhase,
}

fn stream_response(reply: Reply, submission: Submission, include_usage: bool) -> Response {
    let state = SseStream {
        reply,
        submission,
        include_usage,
        phase: StreamPhase::Start,
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        let item = next_sse(&mut state).await?;
        Some((item, state))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn next_sse(state: &mut SseStream) -> Option<Result<Bytes, StreamCut>> {
    loop {
        match state.phase {
            StreamPhase::Start => {
                state.phase = StreamPhase::Tokens;
                if state.reply.endpoint == Endpoint::ChatCompletions {
                    return Some(Ok(state.reply.role_chunk()));
                }
            }
            StreamPhase::Tokens => match state.submission.stream.recv().await {
                Some(StreamItem::Token { index }) => {
                    return Some(Ok(state.reply.token_chunk(index)))
                }
                Some(StreamItem::Finished(summary)) => {
                    state.submission.guard.disarm();
                    state.phase = StreamPhase::Done;
                    if state.include_usage {
                        return Some(Ok(state.reply.usage_chunk(&summary)));
                    }
                }
                None => {
                    state.phase = StreamPhase::End;
                    return Some(Err(StreamCut));
                }
            },
            StreamPhase::Done => {
                state.phase = StreamPhase::End;
                return Some(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
            }
            StreamPhase::End => return None,
        }
    }
}

// ---------------------------------------------------------------------------
// Models, health, metrics, cache reset
// ---------------------------------------------------------------------------

async fn models(State(pod): State<Arc<PodContext>>) -> Response {
    let model = &pod.model;
    let card = |id: &str, root: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": pod.started_unix_s,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": model.max_model_len,
            "permission": [],
        })
    };
    let mut data = vec![card(&model.name, &model.name, None)];
    let mut adapters: Vec<&LoraKey> = model.adapters.values().collect();
    adapters.sort_by(|a, b| a.name.cmp(&b.name));
    data.extend(
        adapters
            .into_iter()
            .map(|lora| card(&lora.name, &lora.path, Some(&model.name))),
    );
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics(State(pod): State<Arc<PodContext>>) -> Response {
    let snapshot = match pod.engine.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(_) => return engine_gone(),
    };
    let mut text = String::with_capacity(4096);
    let labels = format!(
        "engine=\"0\",model_name=\"{}\"",
        escape_label(&pod.model.name)
    );
    let m = &snapshot.metrics;
    let old_names = pod.model.release < RENAMED_METRICS_HIDDEN_FROM;
    let mut sample = |name: &str, kind: &str, help: &str, extra: &str, value: f64| {
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} {kind}");
        let _ = writeln!(text, "{name}{{{labels}{extra}}} {value:?}");
    };
    sample(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        "",
        f64::from(m.running),
    );
    sample(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        "",
        f64::from(m.waiting),
    );
    sample(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        "",
        m.kv_cache_usage,
    );
    if old_names {
        sample(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            "",
            m.kv_cache_usage,
        );
    }
    let counters = [
        (
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_cache_queries,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_cache_hits,
        ),
        (
            "vllm:num_preemptions_total",
            "Cumulative number of preemption from the engine.",
            m.preemptions,
        ),
        (
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            m.prompt_tokens,
        ),
        (
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            m.generation_tokens,
        ),
    ];
    for (name, help, value) in counters {
        sample(name, "counter", help, "", value as f64);
    }
    if old_names {
        sample(
            "vllm:gpu_prefix_cache_queries_total",
            "counter",
            "GPU prefix cache queries, in terms of number of queried tokens.",
            "",
            m.prefix_cache_queries as f64,
        );
        sample(
            "vllm:gpu_prefix_cache_hits_total",
            "counter",
            "GPU prefix cache hits, in terms of number of cached tokens.",
            "",
            m.prefix_cache_hits as f64,
        );
    }
    sample(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        ",finished_reason=\"length\"",
        m.finished_requests as f64,
    );
    let cache_config = format!(
        ",block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",\
         num_gpu_blocks=\"{}\",prefix_caching_hash_algo=\"{}\"",
        m.block_size,
        m.num_gpu_blocks,
        pod.model.hasher.settings().algo.name()
    );
    sample(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
        &cache_config,
        1.0,
    );
    let name = "vllm:time_to_first_token_seconds";
    let _ = writeln!(
        text,
        "# HELP {name} Histogram of time to first token in seconds."
    );
    let _ = writeln!(text, "# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (bound, count) in TTFT_BUCKETS.iter().zip(&snapshot.ttft_bucket_counts) {
        cumulative += count;
        let _ = writeln!(
            text,
            "{name}_bucket{{{labels},le=\"{bound:?}\"}} {cumulative}.0"
        );
    }
    let total: u64 = snapshot.ttft_bucket_counts.iter().sum();
    let _ = writeln!(text, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}.0");
    let _ = writeln!(text, "{name}_sum{{{labels}}} {:?}", snapshot.ttft_sum_s);
    let _ = writeln!(text, "{name}_count{{{labels}}} {total}.0");
    if let Some((max_loras, series)) = &snapshot.lora {
        // As vLLM's Prometheus logger: no engine or model label, one series per state.
        let name = "vllm:lora_requests_info";
        let _ = writeln!(text, "# HELP {name} Running stats on lora requests.");
        let _ = writeln!(text, "# TYPE {name} gauge");
        for s in series {
            let _ = writeln!(
                text,
                "{name}{{max_lora=\"{max_loras}\",waiting_lora_adapters=\"{}\",running_lora_adapters=\"{}\"}} {:?}",
                escape_label(&s.waiting),
                escape_label(&s.running),
                s.set_at_unix_s
            );
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn reset_prefix_cache(State(pod): State<Arc<PodContext>>) -> Response {
    match pod.engine.reset_prefix_cache().await {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "Failed to reset prefix cache: running requests still hold KV blocks".into(),
            None,
        ),
        Err(_) => engine_gone(),
    }
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

/// The event faults, as `/sim/faults` reads and writes them (absent fields
/// are left as they are).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSettings {
    #[serde(default)]
    pub drop_events_probability: Option<f64>,
    #[serde(default)]
    pub delay_events_ms: Option<u64>,
}

fn apply_faults(faults: &EventFaults, update: FaultSettings) -> FaultSettings {
    if let Some(probability) = update.drop_events_probability {
        faults.set_drop_probability(probability);
    }
    if let Some(ms) = update.delay_events_ms {
        faults.set_delay(Duration::from_millis(ms));
    }
    current_faults(faults)
}

fn current_faults(faults: &EventFaults) -> FaultSettings {
    FaultSettings {
        drop_events_probability: Some(faults.drop_probability()),
        delay_events_ms: Some(u64::try_from(faults.delay().as_millis()).unwrap_or(u64::MAX)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DownParams {
    /// How long the pod stays down before it comes back as a new process.
    #[serde(default)]
    down_ms: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SimState<'a> {
    index: usize,
    topic: &'a str,
    release: String,
    params: &'a PodParams,
    faults: FaultSettings,
    publisher: Option<PublisherCounts>,
    #[serde(flatten)]
    snapshot: super::pod::PodSnapshot,
}

async fn sim_state(State(pod): State<Arc<PodContext>>) -> Response {
    let snapshot = match pod.engine.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(_) => return engine_gone(),
    };
    Json(SimState {
        index: pod.index,
        topic: &pod.topic,
        release: pod.model.release.to_string(),
        params: &pod.params,
        faults: current_faults(&pod.faults),
        publisher: pod.publisher.as_ref().map(|stats| stats.counts()),
        snapshot,
    })
    .into_response()
}

async fn get_faults(State(pod): State<Arc<PodContext>>) -> Json<FaultSettings> {
    Json(current_faults(&pod.faults))
}

async fn set_faults(
    State(pod): State<Arc<PodContext>>,
    Json(update): Json<FaultSettings>,
) -> Json<FaultSettings> {
    Json(apply_faults(&pod.faults, update))
}

fn paused_response(result: Result<(), PodError>, paused: bool) -> Response {
    match result {
        Ok(()) => Json(json!({ "paused": paused })).into_response(),
        Err(_) => engine_gone(),
    }
}

async fn pause(State(pod): State<Arc<PodContext>>) -> Response {
    paused_response(pod.engine.pause(true), true)
}

async fn resume(State(pod): State<Arc<PodContext>>) -> Response {
    paused_response(pod.engine.pause(false), false)
}

fn lifecycle_response(accepted: bool, action: &str) -> Response {
    if accepted {
        (StatusCode::ACCEPTED, Json(json!({ "action": action }))).into_response()
    } else {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the pod's supervisor has stopped".into(),
            None,
        )
    }
}

async fn restart(State(pod): State<Arc<PodContext>>, Query(params): Query<DownParams>) -> Response {
    let down = Duration::from_millis(params.down_ms.unwrap_or(0));
    lifecycle_response(pod.lifecycle.restart(down), "restart")
}

/// Without `downMs` the pod stays down until the control port revives it.
async fn kill(State(pod): State<Arc<PodContext>>, Query(params): Query<DownParams>) -> Response {
    let accepted = match params.down_ms {
        Some(ms) => pod.lifecycle.restart(Duration::from_millis(ms)),
        None => pod.lifecycle.kill(),
    };
    lifecycle_response(accepted, "kill")
}

// ---------------------------------------------------------------------------
// Control port
// ---------------------------------------------------------------------------

/// Routes of the simulation's control port: every pod by index, down or up.
///
/// `GET /sim/pods`; `POST /sim/pods/{index}/{restart,kill,revive,pause,resume}`
/// (`restart` and `kill` take `?downMs=`); `GET`/`POST /sim/pods/{index}/faults`.
pub fn control_router(pods: Arc<Vec<PodControl>>) -> Router {
    Router::new()
        .route("/sim/pods", get(list_pods))
        .route(
            "/sim/pods/{index}/faults",
            get(pod_faults).post(set_pod_faults),
        )
        .route("/sim/pods/{index}/{action}", post(pod_action))
        .with_state(pods)
}

async fn list_pods(State(pods): State<Arc<Vec<PodControl>>>) -> Response {
    let views: Vec<_> = pods.iter().map(|pod| pod.status().view()).collect();
    Json(views).into_response()
}

fn no_such_pod(index: usize) -> Response {
    error_response(StatusCode::NOT_FOUND, format!("no pod {index}"), None)
}

async fn pod_faults(
    State(pods): State<Arc<Vec<PodControl>>>,
    Path(index): Path<usize>,
) -> Response {
    match pods.get(index) {
        Some(pod) => Json(current_faults(pod.faults())).into_response(),
        None => no_such_pod(index),
    }
}

async fn set_pod_faults(
    State(pods): State<Arc<Vec<PodControl>>>,
    Path(index): Path<usize>,
    Json(update): Json<FaultSettings>,
) -> Response {
    match pods.get(index) {
        Some(pod) => Json(apply_faults(pod.faults(), update)).into_response(),
        None => no_such_pod(index),
    }
}

async fn pod_action(
    State(pods): State<Arc<Vec<PodControl>>>,
    Path((index, action)): Path<(usize, String)>,
    Query(params): Query<DownParams>,
) -> Response {
    let Some(pod) = pods.get(index) else {
        return no_such_pod(index);
    };
    let down = Duration::from_millis(params.down_ms.unwrap_or(0));
    match action.as_str() {
        "restart" => pod.restart(down),
        "kill" if params.down_ms.is_some() => pod.restart(down),
        "kill" => pod.kill(),
        "revive" => pod.revive(),
        "pause" | "resume" => {
            let paused = action == "pause";
            return match pod.status().engine() {
                Some(engine) => paused_response(engine.pause(paused), paused),
                None => engine_gone(),
            };
        }
        other => {
            return error_response(
                StatusCode::NOT_FOUND,
                format!("unknown pod action `{other}`"),
                None,
            )
        }
    }
    lifecycle_response(true, &action)
}
