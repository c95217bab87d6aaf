//! The simulated pod's engine: vLLM v1's scheduler and KV cache manager as a
//! pure, deterministic state machine.
//!
//! The engine owns no clock. A driver submits requests with their arrival
//! time and calls [`PodEngine::step`] with the time the step starts; the
//! engine plans the batch exactly as vLLM v1 would, applies it, and returns
//! when the step ends (from the calibrated step-time model in
//! `docs/evaluation.md` §1). Everything the step produced (tokens, finished
//! requests, KV events) is reported in a reused [`StepOutput`] and is meant to
//! be delivered at that end time, the way vLLM publishes a step's KV events
//! after its forward pass.
//!
//! Modelled where routing can see it: paged KV with automatic prefix caching
//! (LRU over free blocks, pinned blocks for running requests, the last-token
//! rule), continuous batching under `max_num_seqs` and a shared token
//! budget with chunked prefill, recompute preemption, and vLLM's block-pool
//! events.
//!
//! Scheduling policy (vLLM's `--scheduling-policy`): `fcfs` serves the waiting
//! queue in arrival order and preempts the newest running request when KV runs
//! out. `priority` orders the waiting queue by (priority, arrival), lower
//! priority values first, and preempts the running request with the largest
//! (priority, arrival) instead, as vLLM v1's scheduler does; a request that a
//! preemption hits this step gives back the tokens it was scheduled. Like vLLM
//! v1, a waiting request is admitted only into free KV: it does not preempt
//! running ones (vLLM v0's priority scheduler did), so a high-priority request
//! overtakes queued work at once and running work as soon as blocks free up.
//! Under `fcfs` a request with a non-zero priority is refused, as vLLM refuses it.
//!
//! Prefill/decode disaggregation, as vLLM's NixlConnector runs it: a request marked
//! [`KvTransfer::KeepForRemoteDecode`] (a prefill leg) runs as usual and its summary lists
//! the blocks holding its prompt's KV; one marked [`KvTransfer::PullFromRemote`] (a decode
//! leg) is admitted by allocating blocks for its whole prompt, pulls the part it does not
//! hold from the prefill pod instead of computing it (waiting, outside the batch, for
//! `kvBytesPerToken` × tokens over `kvTransferGbps`, one transfer at a time on the pod's
//! link), caches the pulled blocks, then recomputes only the prompt's last token.
//!
//! LoRA adapters, when `maxLoras` is set: the GPU holds at most `maxLoras` adapters, kept
//! as an LRU; a step whose batch uses an adapter not loaded first swaps it in
//! (`loraLoadMs` each, stalling the whole step, as vLLM's worker loads adapters before the
//! forward pass). Like vLLM v1's scheduler, a waiting request whose adapter would make the
//! running batch use more than `maxLoras` distinct adapters is skipped, not blocking the
//! requests behind it. One LRU stands for vLLM's GPU slots; its CPU adapter cache
//! (`--max-cpu-loras`) is folded into `loraLoadMs`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::kv_cache::BlockPool;

/// Identifies a request inside one pod engine. The driver chooses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Every constant of the simulated pod. Defaults describe the evaluation's pod:
/// Qwen3-32B, TP=2 on two H100s, vLLM v1 with `--block-size 64`.
///
/// Step time (see [`BatchStats`] for P, A, K, B):
///
/// ```text
/// step_ms = step_base_ms + prefill_ms_per_token * P + attention_ms_per_pair * A
///         + decode_ms_per_million_context_tokens * K / 1e6 + decode_ms_per_seq * B
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PodParams {
    /// KV blocks in the GPU pool (vLLM's `num_gpu_blocks`).
    pub kv_blocks: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Most requests running at once.
    pub max_num_seqs: u32,
    /// Token budget of one step, shared by decodes and prefill chunks.
    pub max_num_batched_tokens: u32,
    /// Longest prompt + output accepted.
    pub max_model_len: u32,
    /// Fixed cost of a step (c0).
    pub step_base_ms: f64,
    /// Cost per prefill token computed (c_p).
    pub prefill_ms_per_token: f64,
    /// Cost per attention pair of prefill tokens (c_a).
    pub attention_ms_per_pair: f64,
    /// Cost per million context tokens of decoding sequences (c_k).
    pub decode_ms_per_million_context_tokens: f64,
    /// Cost per decoding sequence (c_b).
    pub decode_ms_per_seq: f64,
    /// HTTP, tokenization and scheduling before a request reaches the queue.
    pub request_overhead_ms: f64,
    /// Adapter slots on the GPU (vLLM's `--max-loras`); 0: adapter slots are not modelled
    /// (every adapter is always loaded).
    pub max_loras: u32,
    /// Time to swap in an adapter that is not loaded, added to the step that needs it.
    pub lora_load_ms: f64,
    /// KV-cache bytes of one token, all layers (what a decode pod pulls per prompt token):
    /// 2 (K and V) × layers × KV heads × head size × bytes per value.
    pub kv_bytes_per_token: f64,
    /// Gigabits per second a decode pod pulls KV at from prefill pods (NIXL over RDMA).
    pub kv_transfer_gbps: f64,
    /// vLLM's `--scheduling-policy`.
    pub scheduling_policy: SchedulingPolicy,
}

/// vLLM's `--scheduling-policy`: the order of the waiting queue and who is preempted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// Arrival order; the newest running request is preempted.
    #[default]
    Fcfs,
    /// (priority, arrival) order, lower values first; the running request with the largest
    /// (priority, arrival) is preempted.
    Priority,
}

impl Default for PodParams {
    fn default() -> Self {
        Self {
            kv_blocks: 4_802,
            block_size: 64,
            max_num_seqs: 256,
            max_num_batched_tokens: 8_192,
            max_model_len: 40_960,
            step_base_ms: 14.0,
            prefill_ms_per_token: 0.05,
            attention_ms_per_pair: 2.3e-6,
            decode_ms_per_million_context_tokens: 42.0,
            decode_ms_per_seq: 0.02,
            request_overhead_ms: 80.0,
            max_loras: 0,
            lora_load_ms: 200.0,
            // Qwen3-32B: 2 × 64 layers × 8 KV heads × 128 × 2 bytes (bf16).
            kv_bytes_per_token: 262_144.0,
            kv_transfer_gbps: 200.0,
            scheduling_policy: SchedulingPolicy::Fcfs,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ParamsError {
    #[error("pod parameter {field} must be at least 1")]
    Zero { field: &'static str },
    #[error("pod parameter kvBlocks = {0} is too large (at most {max})", max = u32::MAX - 1)]
    TooManyBlocks(u32),
    #[error("pod parameter {field} = {value} must be a finite number >= 0")]
    BadCost { field: &'static str, value: f64 },
    #[error("pod parameter stepBaseMs = {0} must be > 0 so that every step takes time")]
    ZeroStepBase(f64),
    #[error("pod parameter kvTransferGbps = {0} must be a finite number > 0")]
    BadBandwidth(f64),
    #[error("maxModelLen {max_model_len} exceeds the KV pool ({kv_tokens} tokens): such a request could never run")]
    ModelLenExceedsKv { max_model_len: u32, kv_tokens: u64 },
}

impl PodParams {
    pub fn validate(&self) -> Result<(), ParamsError> {
        for (field, value) in [
            ("kvBlocks", self.kv_blocks),
            ("blockSize", self.block_size),
            ("maxNumSeqs", self.max_num_seqs),
            ("maxNumBatchedTokens", self.max_num_batched_tokens),
            ("maxModelLen", self.max_model_len),
        ] {
            if value == 0 {
                return Err(ParamsError::Zero { field });
            }
        }
        if self.kv_blocks == u32::MAX {
            return Err(ParamsError::TooManyBlocks(self.kv_blocks));
        }
        for (field, value) in [
            ("stepBaseMs", self.step_base_ms),
            ("prefillMsPerToken", self.prefill_ms_per_token),
            ("attentionMsPerPair", self.attention_ms_per_pair),
            (
                "decodeMsPerMillionContextTokens",
                self.decode_ms_per_million_context_tokens,
            ),
            ("decodeMsPerSeq", self.decode_ms_per_seq),
            ("requestOverheadMs", self.request_overhead_ms),
            ("loraLoadMs", self.lora_load_ms),
            ("kvBytesPerToken", self.kv_bytes_per_token),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ParamsError::BadCost { field, value });
            }
        }
        if self.step_base_ms <= 0.0 {
            return Err(ParamsError::ZeroStepBase(self.step_base_ms));
        }
        if !(self.kv_transfer_gbps.is_finite() && self.kv_transfer_gbps > 0.0) {
            return Err(ParamsError::BadBandwidth(self.kv_transfer_gbps));
        }
        let kv_tokens = u64::from(self.kv_blocks) * u64::from(self.block_size);
        if u64::from(self.max_model_len) > kv_tokens {
            return Err(ParamsError::ModelLenExceedsKv {
                max_model_len: self.max_model_len,
                kv_tokens,
            });
        }
        Ok(())
    }
}

/// A request as the pod sees it after tokenization.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub id: RequestId,
    /// vLLM block hashes of the prompt's full blocks, in order (computed by
    /// the caller with the real hash). Fewer than the prompt's full blocks is
    /// allowed: blocks without a key are computed but never cached.
    pub block_keys: Arc<[u64]>,
    pub prompt_tokens: u32,
    /// Output tokens to generate (the request always runs to this length).
    pub max_tokens: u32,
    /// The LoRA adapter it runs with, by name.
    pub lora: Option<Arc<str>>,
    /// vLLM's request `priority`: lower is served first (0 unless the client set one).
    pub priority: i32,
    /// Its part in a disaggregated request, if any.
    pub kv_transfer: KvTransfer,
}

/// A request's part in prefill/decode disaggregation (vLLM's `kv_transfer_params`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvTransfer {
    /// An ordinary request.
    #[default]
    None,
    /// A prefill leg (`do_remote_decode`): computed as usual; its summary names the
    /// blocks a decode pod pulls.
    KeepForRemoteDecode,
    /// A decode leg (`do_remote_prefill`): the prompt's KV the pod lacks is pulled, not
    /// computed.
    PullFromRemote,
}

#[derive(Debug, Error, PartialEq)]
pub enum SubmitError {
    #[error("request {0} is already in the pod")]
    DuplicateId(RequestId),
    #[error("request {0} has an empty prompt")]
    EmptyPrompt(RequestId),
    #[error("request {0} asks for 0 output tokens")]
    NoOutput(RequestId),
    #[error("request {id}: {prompt_tokens} prompt + {max_tokens} output tokens exceed maxModelLen {max_model_len}")]
    TooLong {
        id: RequestId,
        prompt_tokens: u32,
        max_tokens: u32,
        max_model_len: u32,
    },
    #[error("Got priority {priority} but Priority scheduling is not enabled.")]
    PriorityNotEnabled { id: RequestId, priority: i32 },
    #[error("request {id}: {keys} block keys but its {prompt_tokens}-token prompt has only {full_blocks} full blocks")]
    TooManyBlockKeys {
        id: RequestId,
        keys: usize,
        prompt_tokens: u32,
        full_blocks: u32,
    },
}

/// What happened to a request during a step; it takes effect at the step's end.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// Output token number `index` (0 = first token) was sampled.
    Token { id: RequestId, index: u32 },
    /// The request lost its KV blocks and went back to the front of the
    /// waiting queue; it will recompute its prompt and outputs so far.
    Preempted { id: RequestId },
    /// The request produced its last token and left the pod.
    Finished(RequestSummary),
}

/// A change to the pod's prefix cache, as vLLM's block pool reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum KvChange {
    /// Blocks `first_block..first_block + blocks` of the request became
    /// computed and cached. Their keys are `block_keys[first_block..][..blocks]`;
    /// the parent is `block_keys[first_block - 1]`, or none when `first_block`
    /// is 0. Like vLLM, a run may include a block whose key was already cached
    /// by a concurrent request: stores are idempotent.
    BlockStored {
        request: RequestId,
        block_keys: Arc<[u64]>,
        first_block: usize,
        blocks: usize,
    },
    /// A cached block was evicted to make room.
    BlockRemoved { key: u64 },
    /// The whole prefix cache was reset.
    AllCleared,
}

/// A finished request's timings and accounting. Times are the driver's
/// milliseconds; arrival is the submit time, before the request overhead.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestSummary {
    pub id: RequestId,
    pub arrival_ms: f64,
    pub first_token_ms: f64,
    pub finish_ms: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Prompt tokens served from the prefix cache at first admission
    /// (vLLM's `usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u32,
    pub preemptions: u32,
    /// Prompt tokens whose KV was pulled from a prefill pod (a decode leg).
    pub pulled_tokens: u32,
    /// A prefill leg's full prompt blocks, in order: vLLM's `remote_block_ids`.
    pub kept_blocks: Option<Arc<[u32]>>,
}

impl RequestSummary {
    pub fn ttft_ms(&self) -> f64 {
        self.first_token_ms - self.arrival_ms
    }

    pub fn e2e_ms(&self) -> f64 {
        self.finish_ms - self.arrival_ms
    }

    /// Mean time per output token after the first; none for one token.
    pub fn tpot_ms(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.finish_ms - self.first_token_ms) / f64::from(self.output_tokens - 1))
    }
}

/// The composition and cost of one step (the step-time model's inputs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchStats {
    /// P: prompt tokens computed (cache hits excluded).
    pub prefill_tokens: u32,
    /// A: attention pairs of the prefill chunks, sum of (end² − start²) / 2.
    pub attention_pairs: f64,
    /// B: sequences decoding one token.
    pub decode_seqs: u32,
    /// K: context tokens of the decoding sequences, the new token included.
    pub decode_context_tokens: u64,
    pub duration_ms: f64,
}

/// Everything one step produced. Reuse one across steps: `step` clears it.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub start_ms: f64,
    pub end_ms: f64,
    pub batch: BatchStats,
    /// Per-request outcomes, in the order vLLM would emit them.
    pub events: Vec<EngineEvent>,
    /// Prefix-cache changes, in order: apply them in order.
    pub kv_events: Vec<KvChange>,
}

impl StepOutput {
    fn clear(&mut self) {
        self.start_ms = 0.0;
        self.end_ms = 0.0;
        self.batch = BatchStats::default();
        self.events.clear();
        self.kv_events.clear();
    }
}

/// A snapshot of the counters vLLM exposes on `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMetrics {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// Requests still in the HTTP/tokenization overhead (not visible to vLLM's
    /// scheduler).
    pub arriving: u32,
    /// `vllm:kv_cache_usage_perc` as a fraction: 1 − free blocks / all blocks
    /// (cached but unreferenced blocks count as free).
    pub kv_cache_usage: f64,
    /// Full blocks currently held in the prefix cache.
    pub cached_blocks: u64,
    /// `vllm:prefix_cache_queries_total` (tokens).
    pub prefix_cache_queries: u64,
    /// `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_cache_hits: u64,
    /// `vllm:num_preemptions_total`.
    pub preemptions: u64,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens: u64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: u64,
    /// `vllm:request_success_total`.
    pub finished_requests: u64,
    /// `vllm:cache_config_info` `block_size`.
    pub block_size: u32,
    /// `vllm:cache_config_info` `num_gpu_blocks`.
    pub num_gpu_blocks: u32,
    /// Adapter swap-ins so far.
    pub lora_loads: u64,
}

/// The adapters of the pod's requests, as `vllm:lora_requests_info` labels them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoraInfo {
    /// Distinct adapters of running requests, sorted.
    pub running: Vec<Arc<str>>,
    /// Distinct adapters of waiting requests, sorted.
    pub waiting: Vec<Arc<str>>,
    pub max_loras: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
    preemptions: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
    finished_requests: u64,
    lora_loads: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In the request overhead, not yet visible to the scheduler.
    Arriving,
    Waiting,
    /// Holding blocks while its prompt's KV is pulled from a prefill pod (vLLM's
    /// `WAITING_FOR_REMOTE_KVS`); `ready_ms` is when the pull ends.
    Pulling,
    Running,
    /// Slot free for reuse.
    Vacant,
}

#[derive(Debug)]
struct Request {
    id: RequestId,
    phase: Phase,
    block_keys: Arc<[u64]>,
    /// Leading prompt blocks that may be cached: the keys given, at most the
    /// prompt's full blocks.
    cacheable_blocks: u32,
    prompt_tokens: u32,
    max_tokens: u32,
    arrival_ms: f64,
    ready_ms: f64,
    output_tokens: u32,
    computed_tokens: u32,
    /// Tokens to prefill since the last admission: the prompt, or after a
    /// preemption the prompt plus the outputs so far (vLLM recomputes both).
    prefill_end: u32,
    /// Physical blocks in order; block `i` holds tokens `i*block_size..`.
    blocks: Vec<u32>,
    /// Leading blocks already in the prefix cache and announced.
    cached_blocks: u32,
    first_token_ms: Option<f64>,
    cached_tokens: Option<u32>,
    preemptions: u32,
    lora: Option<Arc<str>>,
    kv_transfer: KvTransfer,
    /// Its prompt's KV was pulled: the next admission schedules what is left, with the
    /// blocks it holds.
    kv_pulled: bool,
    pulled_tokens: u32,
    priority: i32,
}

impl Request {
    fn total_tokens(&self) -> u32 {
        self.prompt_tokens + self.output_tokens
    }
}

#[derive(Clone, Copy, Debug)]
struct Scheduled {
    slot: u32,
    start: u32,
    tokens: u32,
}

/// One simulated vLLM pod. See the module docs for the driving contract.
#[derive(Debug)]
pub struct PodEngine {
    params: PodParams,
    pool: BlockPool,
    requests: Vec<Request>,
    vacant: Vec<u32>,
    by_id: HashMap<RequestId, u32>,
    /// Sorted by `ready_ms`, ties in submit order.
    arriving: VecDeque<u32>,
    waiting: VecDeque<u32>,
    /// In admission order: the last one is the first to be preempted.
    running: Vec<u32>,
    /// Pulling their prompt's KV, in pull order (which is end order: one link).
    pulling: VecDeque<u32>,
    /// When the pod's link finishes the pulls already started.
    link_free_ms: f64,
    scheduled: Vec<Scheduled>,
    hit_scratch: Vec<u32>,
    spare_block_lists: Vec<Vec<u32>>,
    no_keys: Arc<[u64]>,
    busy_until_ms: f64,
    counters: Counters,
    /// Adapters on the GPU, least recently used first (only with `max_loras` > 0).
    loaded_loras: Vec<Arc<str>>,
    /// Scratch: distinct adapters of the running batch while scheduling.
    batch_loras: Vec<Arc<str>>,
}

impl PodEngine {
    pub fn new(params: PodParams) -> Result<Self, ParamsError> {
        params.validate()?;
        Ok(Self {
            pool: BlockPool::new(params.kv_blocks),
            params,
            requests: Vec::new(),
            vacant: Vec::new(),
            by_id: HashMap::new(),
            arriving: VecDeque::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pulling: VecDeque::new(),
            link_free_ms: f64::NEG_INFINITY,
            scheduled: Vec::new(),
            hit_scratch: Vec::new(),
            spare_block_lists: Vec::new(),
            no_keys: Arc::from(Vec::new()),
            busy_until_ms: f64::NEG_INFINITY,
            counters: Counters::default(),
            loaded_loras: Vec::new(),
            batch_loras: Vec::new(),
        })
    }

    pub fn params(&self) -> &PodParams {
        &self.params
    }

    /// Accepts a request arriving at `now_ms`; it reaches the waiting queue
    /// after the request overhead.
    pub fn submit(&mut self, now_ms: f64, req: SimRequest) -> Result<(), SubmitError> {
        let SimRequest {
            id,
            block_keys,
            prompt_tokens,
            max_tokens,
            lora,
            kv_transfer,
            priority,
        } = req;
        if self.by_id.contains_key(&id) {
            return Err(SubmitError::DuplicateId(id));
        }
        if priority != 0 && self.params.scheduling_policy == SchedulingPolicy::Fcfs {
            return Err(SubmitError::PriorityNotEnabled { id, priority });
        }
        if prompt_tokens == 0 {
            return Err(SubmitError::EmptyPrompt(id));
        }
        if max_tokens == 0 {
            return Err(SubmitError::NoOutput(id));
        }
        if u64::from(prompt_tokens) + u64::from(max_tokens) > u64::from(self.params.max_model_len) {
            return Err(SubmitError::TooLong {
                id,
                prompt_tokens,
                max_tokens,
                max_model_len: self.params.max_model_len,
            });
        }
        let full_blocks = prompt_tokens / self.params.block_size;
        let cacheable_blocks = match u32::try_from(block_keys.len()) {
            Ok(keys) if keys <= full_blocks => keys,
            _ => {
                return Err(SubmitError::TooManyBlockKeys {
                    id,
                    keys: block_keys.len(),
                    prompt_tokens,
                    full_blocks,
                })
            }
        };
        let ready_ms = now_ms + self.params.request_overhead_ms;
        let request = Request {
            id,
            phase: Phase::Arriving,
            block_keys,
            cacheable_blocks,
            prompt_tokens,
            max_tokens,
            arrival_ms: now_ms,
            ready_ms,
            output_tokens: 0,
            computed_tokens: 0,
            prefill_end: prompt_tokens,
            blocks: self.spare_block_lists.pop().unwrap_or_default(),
            cached_blocks: 0,
            first_token_ms: None,
            cached_tokens: None,
            preemptions: 0,
            lora,
            kv_transfer,
            kv_pulled: false,
            pulled_tokens: 0,
            priority,
        };
        let slot = match self.vacant.pop() {
            Some(slot) => {
                self.requests[slot as usize] = request;
                slot
            }
            None => {
                self.requests.push(request);
                count_u32(self.requests.len() - 1)
            }
        };
        self.by_id.insert(id, slot);
        // Arrivals come in time order, so this scan almost never moves.
        let position = self
            .arriving
            .iter()
            .rposition(|&other| self.requests[other as usize].ready_ms <= ready_ms)
            .map_or(0, |p| p + 1);
        self.arriving.insert(position, slot);
        Ok(())
    }

    /// Drops a request wherever it is (the client went away). Its blocks are
    /// released; cached ones stay cached. Returns whether it was in the pod.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(&slot) = self.by_id.get(&id) else {
            return false;
        };
        match self.requests[slot as usize].phase {
            Phase::Arriving => self.arriving.retain(|&s| s != slot),
            Phase::Waiting => self.waiting.retain(|&s| s != slot),
            Phase::Pulling => self.pulling.retain(|&s| s != slot),
            Phase::Running => self.running.retain(|&s| s != slot),
            Phase::Vacant => {}
        }
        self.vacate(slot);
        true
    }

    /// Plans and applies the next step, starting at `now_ms` or when the
    /// previous step ends, whichever is later. Returns the end time, or none
    /// when nothing is schedulable (see [`PodEngine::next_wakeup`]). The
    /// outcomes in `out` belong to the end time.
    pub fn step(&mut self, now_ms: f64, out: &mut StepOutput) -> Option<f64> {
        out.clear();
        let start_ms = now_ms.max(self.busy_until_ms);
        self.admit_arrivals(start_ms);
        self.admit_pulled(start_ms, out);
        if self.running.is_empty() && self.waiting.is_empty() {
            return None;
        }
        let pulls_before = self.pulling.len();
        loop {
            self.scheduled.clear();
            let mut budget = self.params.max_num_batched_tokens;
            // As vLLM v1: a step that had to preempt admits nobody new.
            let preempted = self.schedule_running(&mut budget, out);
            if !preempted {
                self.schedule_waiting(start_ms, &mut budget, out);
            }
            // Under `priority` the first running request can be its own victim: vLLM's
            // scheduler then returns an empty step and plans again at once. Each such pass
            // takes one request out of `running`, so this ends.
            if !self.scheduled.is_empty() || !preempted {
                break;
            }
        }
        if self.scheduled.is_empty() {
            if out.kv_events.is_empty() && self.pulling.len() == pulls_before {
                return None;
            }
            // Pulls started or ended, but nothing computes: the scheduler ran without a
            // forward pass. Its cache changes still belong to this instant.
            self.busy_until_ms = start_ms;
            out.start_ms = start_ms;
            out.end_ms = start_ms;
            return Some(start_ms);
        }
        let lora_loads = self.load_batch_loras();
        let mut batch = self.batch_stats();
        batch.duration_ms += f64::from(lora_loads) * self.params.lora_load_ms;
        let end_ms = start_ms + batch.duration_ms;
        self.busy_until_ms = end_ms;
        out.start_ms = start_ms;
        out.end_ms = end_ms;
        out.batch = batch;
        self.finish_step(end_ms, out);
        Some(end_ms)
    }

    /// When `step` next has work: right after the current step if requests
    /// are queued or running, else when the next arrival clears its overhead.
    pub fn next_wakeup(&self) -> Option<f64> {
        // With nothing running, requests still waiting after a step wait for the blocks
        // that pulls hold: they can go on when a pull ends.
        if !self.running.is_empty() || (!self.waiting.is_empty() && self.pulling.is_empty()) {
            return Some(self.busy_until_ms);
        }
        let ready = |queue: &VecDeque<u32>| {
            queue
                .front()
                .map(|&slot| self.requests[slot as usize].ready_ms)
        };
        match (ready(&self.arriving), ready(&self.pulling)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn metrics(&self) -> PodMetrics {
        let num_blocks = self.pool.num_blocks();
        PodMetrics {
            running: count_u32(self.running.len()),
            // vLLM keeps requests pulling KV in its waiting queue.
            waiting: count_u32(self.waiting.len() + self.pulling.len()),
            arriving: count_u32(self.arriving.len()),
            kv_cache_usage: 1.0 - f64::from(self.pool.num_free()) / f64::from(num_blocks),
            cached_blocks: self.pool.num_cached() as u64,
            prefix_cache_queries: self.counters.prefix_cache_queries,
            prefix_cache_hits: self.counters.prefix_cache_hits,
            preemptions: self.counters.preemptions,
            prompt_tokens: self.counters.prompt_tokens,
            generation_tokens: self.counters.generation_tokens,
            finished_requests: self.counters.finished_requests,
            block_size: self.params.block_size,
            num_gpu_blocks: num_blocks,
            lora_loads: self.counters.lora_loads,
        }
    }

    /// The adapters of running and waiting requests; `None` when adapter slots are not
    /// modelled (`max_loras` 0).
    pub fn lora_info(&self) -> Option<LoraInfo> {
        if self.params.max_loras == 0 {
            return None;
        }
        let names = |queue: &mut dyn Iterator<Item = &u32>| {
            let mut names: Vec<Arc<str>> = queue
                .filter_map(|&slot| self.requests[slot as usize].lora.clone())
                .collect();
            names.sort_unstable();
            names.dedup();
            names
        };
        Some(LoraInfo {
            running: names(&mut self.running.iter()),
            waiting: names(&mut self.waiting.iter()),
            max_loras: self.params.max_loras,
        })
    }

    /// Swaps in the adapters of the running requests that are not loaded, evicting the
    /// least recently used ones no running request needs, and marks theirs used.
    /// Returns how many were swapped in.
    fn load_batch_loras(&mut self) -> u32 {
        if self.params.max_loras == 0 {
            return 0;
        }
        let mut loads = 0;
        // Every running request's adapter stays on the GPU, scheduled this step or not.
        for &slot in &self.running {
            let Some(lora) = &self.requests[slot as usize].lora else {
                continue;
            };
            match self.loaded_loras.iter().position(|l| l == lora) {
                Some(at) => {
                    let used = self.loaded_loras.remove(at);
                    self.loaded_loras.push(used);
                }
                None => {
                    loads += 1;
                    self.loaded_loras.push(Arc::clone(lora));
                }
            }
        }
        // The running requests use at most `max_loras` adapters (the scheduler skips the
        // rest), and those were just moved to the back: evicting from the front spares them.
        let excess = self
            .loaded_loras
            .len()
            .saturating_sub(self.params.max_loras as usize);
        self.loaded_loras.drain(..excess);
        self.counters.lora_loads += u64::from(loads);
        loads
    }

    /// How many leading `keys` are in the prefix cache right now (the oracle
    /// router's view). Not capped by the last-token rule: a request whose
    /// whole prompt is cached still recomputes its last block's worth, see
    /// [`PodEngine::step`].
    pub fn cached_prefix_blocks(&self, keys: &[u64]) -> usize {
        keys.iter()
            .take_while(|&&key| self.pool.lookup(key).is_some())
            .count()
    }

    /// Every key in the prefix cache, in no particular order.
    pub fn cached_block_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.pool.cached_keys()
    }

    /// Empties the prefix cache, as vLLM's `/reset_prefix_cache`: it only
    /// succeeds while no request holds blocks, and then reports `AllCleared`.
    pub fn reset_prefix_cache(&mut self, kv_events: &mut Vec<KvChange>) -> bool {
        let cleared = self.pool.clear_cache();
        if cleared {
            kv_events.push(KvChange::AllCleared);
        }
        cleared
    }

    fn admit_arrivals(&mut self, now_ms: f64) {
        while let Some(&slot) = self.arriving.front() {
            let request = &mut self.requests[slot as usize];
            if request.ready_ms > now_ms {
                break;
            }
            request.phase = Phase::Waiting;
            self.arriving.pop_front();
            enqueue_waiting(
                self.params.scheduling_policy,
                &self.requests,
                &mut self.waiting,
                slot,
                false,
            );
        }
    }

    /// Pulls that ended by `now_ms`: the pulled blocks are cached (vLLM caches them when
    /// the pull ends) and the request waits at the front, to recompute its last token.
    fn admit_pulled(&mut self, now_ms: f64, out: &mut StepOutput) {
        let block_size = self.params.block_size;
        let ended = self
            .pulling
            .iter()
            .take_while(|&&slot| self.requests[slot as usize].ready_ms <= now_ms)
            .count();
        for slot in self.pulling.drain(..ended).rev() {
            let request = &mut self.requests[slot as usize];
            let computed = request.total_tokens() - 1;
            request.computed_tokens = computed;
            request.kv_pulled = true;
            request.phase = Phase::Waiting;
            cache_computed_blocks(
                request,
                computed,
                block_size,
                &mut self.pool,
                &mut out.kv_events,
            );
            self.waiting.push_front(slot);
        }
    }

    /// Schedules running requests in order: the rest of their prefill (within
    /// the budget) or one decode token, preempting from the back when KV runs
    /// out. Returns whether anything was preempted.
    fn schedule_running(&mut self, budget: &mut u32, out: &mut StepOutput) -> bool {
        let Self {
            params,
            pool,
            requests,
            running,
            waiting,
            scheduled,
            counters,
            ..
        } = self;
        let block_size = params.block_size;
        let mut preempted = false;
        let mut index = 0;
        while *budget > 0 {
            let Some(&slot) = running.get(index) else {
                break;
            };
            let request = &requests[slot as usize];
            let start = request.computed_tokens;
            let tokens = (request.total_tokens() - start).min(*budget);
            let needed = blocks_for(start + tokens, block_size)
                .saturating_sub(count_u32(request.blocks.len()));
            let fits = loop {
                if needed <= pool.num_free() {
                    break true;
                }
                let Some(at) = victim(params.scheduling_policy, requests, running) else {
                    break false;
                };
                let victim = running.remove(at);
                // A victim already scheduled this step gives its tokens back.
                if let Some(done) = scheduled.iter().position(|s| s.slot == victim) {
                    *budget += scheduled.remove(done).tokens;
                    index -= 1;
                }
                let victim_request = &mut requests[victim as usize];
                preempt(victim_request, pool);
                counters.preemptions += 1;
                out.events.push(EngineEvent::Preempted {
                    id: victim_request.id,
                });
                enqueue_waiting(params.scheduling_policy, requests, waiting, victim, true);
                preempted = true;
                if victim == slot {
                    break false;
                }
            };
            if !fits {
                break;
            }
            let request = &mut requests[slot as usize];
            allocate(pool, &mut request.blocks, needed, &mut out.kv_events);
            cache_computed_blocks(
                request,
                start + tokens,
                block_size,
                pool,
                &mut out.kv_events,
            );
            scheduled.push(Scheduled {
                slot,
                start,
                tokens,
            });
            *budget -= tokens;
            index += 1;
        }
        preempted
    }

    /// Admits waiting requests in queue order while the budget, `max_num_seqs`
    /// and free KV allow; the first that does not fit blocks the rest. A request
    /// whose adapter would exceed `max_loras` distinct adapters in the batch is
    /// skipped and keeps its place.
    fn schedule_waiting(&mut self, now_ms: f64, budget: &mut u32, out: &mut StepOutput) {
        let Self {
            params,
            pool,
            requests,
            running,
            waiting,
            pulling,
            link_free_ms,
            scheduled,
            hit_scratch,
            counters,
            batch_loras,
            ..
        } = self;
        let block_size = params.block_size;
        let max_loras = params.max_loras as usize;
        batch_loras.clear();
        if max_loras > 0 {
            for &slot in running.iter() {
                if let Some(lora) = &requests[slot as usize].lora {
                    if !batch_loras.contains(lora) {
                        batch_loras.push(Arc::clone(lora));
                    }
                }
            }
        }
        let mut position = 0;
        while *budget > 0 && count_u32(running.len()) < params.max_num_seqs {
            let Some(&slot) = waiting.get(position) else {
                break;
            };
            let request = &mut requests[slot as usize];
            let (start, tokens) = if request.kv_pulled {
                // Its blocks are allocated and its KV pulled: only the rest is computed.
                let start = request.computed_tokens;
                let tokens = (request.total_tokens() - start).min(*budget);
                let needed = blocks_for(start + tokens, block_size)
                    .saturating_sub(count_u32(request.blocks.len()));
                if needed > pool.num_free() {
                    break;
                }
                allocate(pool, &mut request.blocks, needed, &mut out.kv_events);
                request.kv_pulled = false;
                (start, tokens)
            } else {
                if max_loras > 0 && request.kv_transfer != KvTransfer::PullFromRemote {
                    if let Some(lora) = &request.lora {
                        if !batch_loras.contains(lora) {
                            if batch_loras.len() >= max_loras {
                                position += 1;
                                continue;
                            }
                            batch_loras.push(Arc::clone(lora));
                        }
                    }
                }
                let total = request.total_tokens();
                // vLLM always computes the last token: a fully cached prompt
                // still recomputes its last block.
                let max_hit_blocks = ((total - 1) / block_size).min(request.cacheable_blocks);
                hit_scratch.clear();
                hit_scratch.extend(
                    request
                        .block_keys
                        .iter()
                        .take(max_hit_blocks as usize)
                        .map_while(|&key| pool.lookup(key)),
                );
                let hit_blocks = count_u32(hit_scratch.len());
                let hit_tokens = hit_blocks * block_size;
                let tokens = (total - hit_tokens).min(*budget);
                let needed = blocks_for(hit_tokens + tokens, block_size) - hit_blocks;
                let revived = count_u32(
                    hit_scratch
                        .iter()
                        .filter(|&&block| pool.is_free(block))
                        .count(),
                );
                let pull = request.kv_transfer == KvTransfer::PullFromRemote;
                // A pull takes blocks for the whole prompt at once (NixlConnector).
                let needed = if pull {
                    blocks_for(total, block_size) - hit_blocks
                } else {
                    needed
                };
                if needed + revived > pool.num_free() {
                    break;
                }
                for &block in hit_scratch.iter() {
                    pool.touch(block);
                    request.blocks.push(block);
                }
                allocate(pool, &mut request.blocks, needed, &mut out.kv_events);
                request.computed_tokens = hit_tokens;
                request.cached_blocks = hit_blocks;
                request.prefill_end = total;
                counters.prefix_cache_queries += u64::from(total);
                counters.prefix_cache_hits += u64::from(hit_tokens);
                if pull {
                    // The pod's own prefix is kept; the rest comes over its link, which
                    // carries one pull at a time.
                    let pulled = total - hit_tokens;
                    let bits = f64::from(pulled) * params.kv_bytes_per_token * 8.0;
                    let start = now_ms.max(*link_free_ms);
                    request.ready_ms = start + bits / (params.kv_transfer_gbps * 1e6);
                    *link_free_ms = request.ready_ms;
                    request.pulled_tokens = pulled;
                    request.phase = Phase::Pulling;
                    waiting.remove(position);
                    pulling.push_back(slot);
                    continue;
                }
                (hit_tokens, tokens)
            };
            request.cached_tokens.get_or_insert(start);
            request.phase = Phase::Running;
            cache_computed_blocks(
                request,
                start + tokens,
                block_size,
                pool,
                &mut out.kv_events,
            );
            waiting.remove(position);
            running.push(slot);
            scheduled.push(Scheduled {
                slot,
                start,
                tokens,
            });
            *budget -= tokens;
        }
    }

    fn batch_stats(&self) -> BatchStats {
        let mut batch = BatchStats::default();
        for s in &self.scheduled {
            let request = &self.requests[s.slot as usize];
            let end = s.start + s.tokens;
            if s.start < request.prefill_end {
                batch.prefill_tokens += s.tokens;
                let (start, end) = (f64::from(s.start), f64::from(end));
                batch.attention_pairs += (end * end - start * start) / 2.0;
            } else {
                batch.decode_seqs += 1;
                batch.decode_context_tokens += u64::from(end);
            }
        }
        let p = &self.params;
        batch.duration_ms = p.step_base_ms
            + p.prefill_ms_per_token * f64::from(batch.prefill_tokens)
            + p.attention_ms_per_pair * batch.attention_pairs
            + p.decode_ms_per_million_context_tokens * batch.decode_context_tokens as f64 / 1e6
            + p.decode_ms_per_seq * f64::from(batch.decode_seqs);
        batch
    }

    /// Applies the step's results: computed tokens advance, sequences whose
    /// pending tokens are all computed sample one token, finished ones leave.
    fn finish_step(&mut self, end_ms: f64, out: &mut StepOutput) {
        let mut any_finished = false;
        for index in 0..self.scheduled.len() {
            let s = self.scheduled[index];
            let request = &mut self.requests[s.slot as usize];
            request.computed_tokens = s.start + s.tokens;
            if request.computed_tokens < request.total_tokens() {
                continue;
            }
            if request.first_token_ms.is_none() {
                request.first_token_ms = Some(end_ms);
                self.counters.prompt_tokens += u64::from(request.prompt_tokens);
            }
            out.events.push(EngineEvent::Token {
                id: request.id,
                index: request.output_tokens,
            });
            request.output_tokens += 1;
            self.counters.generation_tokens += 1;
            if request.output_tokens < request.max_tokens {
                continue;
            }
            let kept_blocks = (request.kv_transfer == KvTransfer::KeepForRemoteDecode).then(|| {
                let full = (request.prompt_tokens / self.params.block_size) as usize;
                Arc::from(&request.blocks[..full.min(request.blocks.len())])
            });
            out.events.push(EngineEvent::Finished(RequestSummary {
                id: request.id,
                arrival_ms: request.arrival_ms,
                first_token_ms: request.first_token_ms.unwrap_or(end_ms),
                finish_ms: end_ms,
                prompt_tokens: request.prompt_tokens,
                output_tokens: request.output_tokens,
                cached_tokens: request.cached_tokens.unwrap_or(0),
                preemptions: request.preemptions,
                pulled_tokens: request.pulled_tokens,
                kept_blocks,
            }));
            self.counters.finished_requests += 1;
            self.vacate(s.slot);
            any_finished = true;
        }
        if any_finished {
            let requests = &self.requests;
            self.running
                .retain(|&slot| requests[slot as usize].phase == Phase::Running);
        }
    }

    /// Releases a request's blocks and frees its slot. The caller removes it
    /// from its queue.
    fn vacate(&mut self, slot: u32) {
        let request = &mut self.requests[slot as usize];
        release_blocks(&mut request.blocks, &mut self.pool);
        self.spare_block_lists
            .push(std::mem::take(&mut request.blocks));
        request.block_keys = Arc::clone(&self.no_keys);
        request.phase = Phase::Vacant;
        self.by_id.remove(&request.id);
        self.vacant.push(slot);
    }
}

/// Puts `slot` into the waiting queue: under `fcfs` last, or first when it was
/// preempted (it resumes before anything newer); under `priority` after every
/// request with a smaller or equal (priority, arrival).
fn enqueue_waiting(
    policy: SchedulingPolicy,
    requests: &[Request],
    waiting: &mut VecDeque<u32>,
    slot: u32,
    preempted: bool,
) {
    match policy {
        SchedulingPolicy::Fcfs if preempted => waiting.push_front(slot),
        SchedulingPolicy::Fcfs => waiting.push_back(slot),
        SchedulingPolicy::Priority => {
            let key = priority_key(&requests[slot as usize]);
            let at =
                waiting.partition_point(|&other| priority_key(&requests[other as usize]).le(&key));
            waiting.insert(at, slot);
        }
    }
}

/// Where a request sorts under `priority`: lower first.
fn priority_key(request: &Request) -> (i32, f64) {
    (request.priority, request.arrival_ms)
}

/// The index in `running` of the request to preempt: the newest under `fcfs`;
/// under `priority` the first with the largest (priority, arrival), as vLLM's
/// `max(self.running, key=lambda r: (r.priority, r.arrival_time))`.
fn victim(policy: SchedulingPolicy, requests: &[Request], running: &[u32]) -> Option<usize> {
    match policy {
        SchedulingPolicy::Fcfs => running.len().checked_sub(1),
        SchedulingPolicy::Priority => {
            let mut best: Option<(usize, (i32, f64))> = None;
            for (at, &slot) in running.iter().enumerate() {
                let key = priority_key(&requests[slot as usize]);
                if best.is_none_or(|(_, top)| key.0 > top.0 || (key.0 == top.0 && key.1 > top.1)) {
                    best = Some((at, key));
                }
            }
            best.map(|(at, _)| at)
        }
    }
}

fn blocks_for(tokens: u32, block_size: u32) -> u32 {
    tokens.div_ceil(block_size)
}

/// Lengths here are bounded by the block pool or by live requests, both
/// below `u32::MAX`.
fn count_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Takes `count` blocks from the free queue (the caller checked there are
/// enough), reporting the cached keys this evicts.
fn allocate(
    pool: &mut BlockPool,
    blocks: &mut Vec<u32>,
    count: u32,
    kv_events: &mut Vec<KvChange>,
) {
    for _ in 0..count {
        let Some((slot, evicted)) = pool.allocate() else {
            return;
        };
        if let Some(key) = evicted {
            kv_events.push(KvChange::BlockRemoved { key });
        }
        blocks.push(slot);
    }
}

/// Caches the request's full prompt blocks covered by `computed` tokens, as
/// vLLM does when it schedules them (a request admitted later in the same
/// step can already hit them: the forward pass writes KV before attention).
///
/// Only prompt blocks are cached. vLLM also caches full blocks of generated
/// tokens, but their keys hash the generated token ids, which neither this
/// simulator nor the router in front of the pod ever sees; the router could
/// not match them against a later prompt either way.
fn cache_computed_blocks(
    request: &mut Request,
    computed: u32,
    block_size: u32,
    pool: &mut BlockPool,
    kv_events: &mut Vec<KvChange>,
) {
    let full = (computed / block_size).min(request.cacheable_blocks);
    let first = request.cached_blocks;
    if full <= first {
        return;
    }
    for block in first..full {
        let index = block as usize;
        if let (Some(&slot), Some(&key)) =
            (request.blocks.get(index), request.block_keys.get(index))
        {
            pool.register(slot, key);
        }
    }
    kv_events.push(KvChange::BlockStored {
        request: request.id,
        block_keys: Arc::clone(&request.block_keys),
        first_block: first as usize,
        blocks: (full - first) as usize,
    });
    request.cached_blocks = full;
}

/// Returns blocks to the pool last block first, as vLLM does, so a request's
/// tail is evicted before its (more shareable) prefix.
fn release_blocks(blocks: &mut Vec<u32>, pool: &mut BlockPool) {
    for &slot in blocks.iter().rev() {
        pool.release(slot);
    }
    blocks.clear();
}

/// Recompute preemption: all blocks go back to the pool and the request
/// starts over from the front of the waiting queue.
fn preempt(request: &mut Request, pool: &mut BlockPool) {
    release_blocks(&mut request.blocks, pool);
    request.computed_tokens = 0;
    request.cached_blocks = 0;
    request.preemptions += 1;
    // As NixlConnector: the KV is pulled once; a preempted decode leg recomputes.
    if request.kv_transfer == KvTransfer::PullFromRemote {
        request.kv_transfer = KvTransfer::None;
    }
    request.phase = Phase::Waiting;
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A tiny pod: blocks of 4 tokens, no request overhead, 1 ms steps plus
    /// 1 ms per prefill token so step ends are easy to predict.
    fn tiny(kv_blocks: u32) -> PodParams {
        PodParams {
            kv_blocks,
            block_size: 4,
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            max_model_len: kv_blocks * 4,
            step_base_ms: 1.0,
            prefill_ms_per_token: 1.0,
            attention_ms_per_pair: 0.0,
            decode_ms_per_million_context_tokens: 0.0,
            decode_ms_per_seq: 0.0,
            request_overhead_ms: 0.0,
            ..PodParams::default()
        }
    }

    fn request(id: u64, keys: &[u64], prompt_tokens: u32, max_tokens: u32) -> SimRequest {
        SimRequest {
            id: RequestId(id),
            block_keys: Arc::from(keys),
            prompt_tokens,
            max_tokens,
            lora: None,
            kv_transfer: KvTransfer::None,
            priority: 0,
        }
    }

    /// Steps until nothing is left, returning every step's outputs.
    fn run(engine: &mut PodEngine, mut now: f64) -> Vec<StepOutput> {
        let mut steps = Vec::new();
        while let Some(at) = engine.next_wakeup() {
            let mut out = StepOutput::default();
            now = match engine.step(now.max(at), &mut out) {
                Some(end) => end,
                None => break,
            };
            steps.push(out);
        }
        steps
    }

    /// The requests preempted over `steps`, in order.
    fn preempted_ids(steps: &[StepOutput]) -> Vec<RequestId> {
        steps
            .iter()
            .flat_map(|s| &s.events)
            .filter_map(|e| match e {
                EngineEvent::Preempted { id } => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn summaries(steps: &[StepOutput]) -> Vec<RequestSummary> {
        steps
            .iter()
            .flat_map(|s| &s.events)
            .filter_map(|e| match e {
                EngineEvent::Finished(summary) => Some(summary.clone()),
                _ => None,
            })
            .collect()
    }

    fn removed(steps: &[StepOutput]) -> Vec<u64> {
        steps
            .iter()
            .flat_map(|s| &s.kv_events)
            .filter_map(|e| match e {
                KvChange::BlockRemoved { key } => Some(*key),
                _ => None,
            })
            .collect()
    }

    fn cached_tokens_of(engine: &mut PodEngine, now: f64, req: SimRequest) -> u32 {
        let id = req.id;
        engine.submit(now, req).unwrap();
        let done = summaries(&run(engine, now));
        done.iter().find(|s| s.id == id).unwrap().cached_tokens
    }

    #[test]
    fn defaults_are_the_evaluation_pod_and_params_deserialize_in_camel_case() {
        let defaults = PodParams::default();
        assert_eq!(defaults.kv_blocks * defaults.block_size, 307_328);
        assert_eq!(defaults.validate(), Ok(()));
        let params: PodParams =
            serde_json::from_str(r#"{"kvBlocks": 19208, "blockSize": 16, "requestOverheadMs": 0}"#)
                .unwrap();
        assert_eq!((params.kv_blocks, params.block_size), (19_208, 16));
        assert_eq!(params.request_overhead_ms, 0.0);
        assert_eq!(params.max_num_batched_tokens, 8_192);
        assert!(serde_json::from_str::<PodParams>(r#"{"kvBlock": 1}"#).is_err());
        let bad = PodParams {
            max_model_len: 400_000,
            ..PodParams::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ParamsError::ModelLenExceedsKv { .. })
        ));
        let bad = PodParams {
            prefill_ms_per_token: f64::NAN,
            ..PodParams::default()
        };
        assert!(matches!(
            PodEngine::new(bad),
            Err(ParamsError::BadCost { .. })
        ));
    }

    fn leg(
        id: u64,
        keys: &[u64],
        prompt_tokens: u32,
        max_tokens: u32,
        kv_transfer: KvTransfer,
    ) -> SimRequest {
        SimRequest {
            kv_transfer,
            ..request(id, keys, prompt_tokens, max_tokens)
        }
    }

    fn stored(steps: &[StepOutput]) -> Vec<(usize, usize)> {
        steps
            .iter()
            .flat_map(|s| &s.kv_events)
            .filter_map(|e| match e {
                KvChange::BlockStored {
                    first_block,
                    blocks,
                    ..
                } => Some((*first_block, *blocks)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_prefill_leg_is_computed_as_usual_and_names_its_prompt_blocks() {
        let mut engine = PodEngine::new(tiny(16)).unwrap();
        // A warm first block: the prefill leg reuses it like any request.
        assert_eq!(
            cached_tokens_of(&mut engine, 0.0, request(1, &[11], 6, 1)),
            0
        );
        engine
            .submit(
                100.0,
                leg(2, &[11, 12, 13], 14, 1, KvTransfer::KeepForRemoteDecode),
            )
            .unwrap();
        let steps = run(&mut engine, 100.0);
        let done = summaries(&steps);
        assert_eq!(done[0].cached_tokens, 4);
        // Its three full blocks, in prompt order, the reused one first.
        let kept = done[0].kept_blocks.as_deref().unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(engine.cached_prefix_blocks(&[11, 12, 13]), 3);
        assert_eq!(stored(&steps), vec![(1, 2)]);
        // Ordinary requests name none.
        assert_eq!(
            summaries(&{
                engine.submit(200.0, request(3, &[11], 6, 1)).unwrap();
                run(&mut engine, 200.0)
            })[0]
                .kept_blocks,
            None
        );
    }

    #[test]
    fn a_decode_leg_pulls_the_blocks_it_lacks_then_computes_only_the_last_token() {
        // 125,000 bytes a token at 1 Gbit/s: 1 ms per pulled token.
        let params = PodParams {
            kv_bytes_per_token: 125_000.0,
            kv_transfer_gbps: 1.0,
            ..tiny(16)
        };
        let mut engine = PodEngine::new(params).unwrap();
        assert_eq!(
            cached_tokens_of(&mut engine, 0.0, request(1, &[21], 6, 1)),
            0
        );
        let keys = [21, 22, 23, 24];
        engine
            .submit(100.0, leg(2, &keys, 16, 3, KvTransfer::PullFromRemote))
            .unwrap();
        let mut out = StepOutput::default();
        // The scheduler allocates the whole prompt and starts the pull of the 12 tokens
        // the pod lacks; nothing computes meanwhile, and vLLM counts it as waiting.
        assert_eq!(engine.step(100.0, &mut out), Some(100.0));
        assert_eq!(out.batch, BatchStats::default());
        assert_eq!(engine.metrics().waiting, 1);
        assert_eq!(engine.next_wakeup(), Some(112.0));
        // The pulled blocks are cached when the pull ends; only the last token computes.
        let end = engine.step(112.0, &mut out).unwrap();
        assert_eq!(out.batch.prefill_tokens, 1);
        assert_eq!(end, 114.0);
        assert_eq!(stored(std::slice::from_ref(&out)), vec![(1, 2), (3, 1)]);
        let steps = run(&mut engine, end);
        let done = summaries(&steps);
        assert_eq!(
            (
                done[0].first_token_ms,
                done[0].cached_tokens,
                done[0].pulled_tokens
            ),
            (114.0, 15, 12)
        );
        assert_eq!(engine.cached_prefix_blocks(&keys), 4);
    }

    #[test]
    fn pulls_share_the_link_one_at_a_time_and_a_preempted_decode_leg_recomputes() {
        let params = PodParams {
            kv_bytes_per_token: 125_000.0,
            kv_transfer_gbps: 1.0,
            ..tiny(16)
        };
        let mut engine = PodEngine::new(params.clone()).unwrap();
        engine
            .submit(0.0, leg(1, &[1, 2], 8, 1, KvTransfer::PullFromRemote))
            .unwrap();
        engine
            .submit(0.0, leg(2, &[3, 4], 8, 1, KvTransfer::PullFromRemote))
            .unwrap();
        let done = summaries(&run(&mut engine, 0.0));
        let first = |id| {
            done.iter()
                .find(|s| s.id == RequestId(id))
                .unwrap()
                .first_token_ms
        };
        // 8 ms each on one link: the second pull ends at 16 ms, not 8.
        assert_eq!((first(1), first(2)), (10.0, 18.0));

        // A pool too small for a pulled decode leg and a growing request: the leg, admitted
        // last, is preempted and recomputes its prompt instead of pulling it again.
        let mut engine = PodEngine::new(PodParams {
            kv_blocks: 5,
            max_model_len: 20,
            ..params
        })
        .unwrap();
        engine.submit(0.0, request(1, &[], 4, 12)).unwrap();
        engine
            .submit(0.0, leg(2, &[5, 6], 8, 6, KvTransfer::PullFromRemote))
            .unwrap();
        let steps = run(&mut engine, 0.0);
        let done = summaries(&steps);
        let leg_summary = done.iter().find(|s| s.id == RequestId(2)).unwrap();
        assert!(leg_summary.preemptions >= 1, "{done:?}");
        // Pulled once; computed: request 1's prompt, the leg's last token, then its recompute.
        let computed: u32 = steps.iter().map(|s| s.batch.prefill_tokens).sum();
        assert!(computed > 4 + 1, "{computed}");
        assert_eq!(leg_summary.pulled_tokens, 8);
    }

    #[test]
    fn submit_rejects_what_vllm_would() {
        let mut engine = PodEngine::new(tiny(16)).unwrap();
        engine.submit(0.0, request(1, &[], 4, 1)).unwrap();
        assert_eq!(
            engine.submit(0.0, request(1, &[], 4, 1)),
            Err(SubmitError::DuplicateId(RequestId(1)))
        );
        assert_eq!(
            engine.submit(0.0, request(2, &[], 0, 1)),
            Err(SubmitError::EmptyPrompt(RequestId(2)))
        );
        assert_eq!(
            engine.submit(0.0, request(2, &[], 4, 0)),
            Err(SubmitError::NoOutput(RequestId(2)))
        );
        assert!(matches!(
            engine.submit(0.0, request(2, &[], 60, 5)),
            Err(SubmitError::TooLong { .. })
        ));
        assert!(matches!(
            engine.submit(0.0, request(2, &[1, 2], 7, 1)),
            Err(SubmitError::TooManyBlockKeys { full_blocks: 1, .. })
        ));
    }

    #[test]
    fn overhead_delays_admission_and_step_time_follows_the_formula() {
        let mut engine = PodEngine::new(PodParams::default()).unwrap();
        engine.submit(0.0, request(1, &[], 10_000, 2)).unwrap();
        assert_eq!(engine.next_wakeup(), Some(80.0));
        let mut out = StepOutput::default();
        assert_eq!(engine.step(0.0, &mut out), None);
        assert_eq!(engine.metrics().arriving, 1);

        let first = engine.step(80.0, &mut out).unwrap();
        let chunk1 = 14.0 + 0.05 * 8192.0 + 2.3e-6 * (8192.0f64 * 8192.0) / 2.0;
        assert!((first - (80.0 + chunk1)).abs() < 1e-9);
        assert_eq!(out.batch.prefill_tokens, 8_192);
        assert!(out.events.is_empty());

        let second = engine.step(first, &mut out).unwrap();
        let chunk2 =
            14.0 + 0.05 * 1808.0 + 2.3e-6 * (10_000.0f64.powi(2) - 8192.0f64.powi(2)) / 2.0;
        assert!((second - first - chunk2).abs() < 1e-9);
        assert_eq!(
            out.events,
            vec![EngineEvent::Token {
                id: RequestId(1),
                index: 0
            }]
        );

        let third = engine.step(second, &mut out).unwrap();
        let decode = 14.0 + 42.0 * 10_001.0 / 1e6 + 0.02;
        assert!((third - second - decode).abs() < 1e-9);
        assert_eq!(
            (out.batch.decode_seqs, out.batch.decode_context_tokens),
            (1, 10_001)
        );
        let EngineEvent::Finished(summary) = &out.events[1] else {
            panic!("expected the request to finish: {:?}", out.events);
        };
        assert_eq!(summary.ttft_ms(), second);
        assert!((summary.tpot_ms().unwrap() - decode).abs() < 1e-9);
        assert!(engine.is_idle());
        assert_eq!(engine.step(third, &mut out), None);
        assert_eq!(engine.next_wakeup(), None);
    }

    #[test]
    fn adapters_beyond_the_slots_wait_and_missing_ones_cost_a_swap_in() {
        let params = PodParams {
            max_loras: 2,
            lora_load_ms: 100.0,
            ..tiny(64)
        };
        let mut engine = PodEngine::new(params).unwrap();
        let names: Vec<Arc<str>> = ["a", "b", "c"].into_iter().map(Arc::from).collect();
        for (id, lora) in [(1, 0), (2, 1), (3, 2), (4, 0)] {
            let with_lora = SimRequest {
                lora: Some(Arc::clone(&names[lora])),
                ..request(id, &[], 4, 2)
            };
            engine.submit(0.0, with_lora).unwrap();
        }
        let mut out = StepOutput::default();
        // "c" would be a third adapter: skipped, while request 4 behind it runs.
        let first = engine.step(0.0, &mut out).unwrap();
        assert_eq!(first, 1.0 + 12.0 + 2.0 * 100.0, "a and b swapped in");
        assert_eq!(
            engine.lora_info(),
            Some(LoraInfo {
                running: names[..2].to_vec(),
                waiting: vec![Arc::clone(&names[2])],
                max_loras: 2,
            })
        );
        let second = engine.step(first, &mut out).unwrap();
        assert_eq!(second, first + 1.0, "loaded adapters cost nothing");
        let steps = run(&mut engine, second);
        let done = summaries(&steps);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].id, RequestId(3));
        assert_eq!(done[0].first_token_ms, second + 1.0 + 4.0 + 100.0);
        // "b" was the least recently used: "c" took its slot.
        assert_eq!(
            &engine.loaded_loras[..],
            [Arc::clone(&names[0]), Arc::clone(&names[2])]
        );
        assert_eq!(engine.metrics().lora_loads, 3);
        assert_eq!(engine.lora_info().map(|i| i.running), Some(vec![]));
    }

    #[test]
    fn prefix_hits_count_full_blocks_and_spare_the_last_token() {
        let mut engine = PodEngine::new(tiny(32)).unwrap();
        assert_eq!(
            cached_tokens_of(&mut engine, 0.0, request(1, &[1, 2, 3, 4], 16, 1)),
            0
        );
        assert_eq!(engine.cached_prefix_blocks(&[1, 2, 3, 4, 5]), 4);
        // The whole prompt is cached, but its last token is recomputed.
        assert_eq!(
            cached_tokens_of(&mut engine, 100.0, request(2, &[1, 2, 3, 4], 16, 1)),
            12
        );
        // One token more: all four blocks hit.
        assert_eq!(
            cached_tokens_of(&mut engine, 200.0, request(3, &[1, 2, 3, 4], 17, 1)),
            16
        );
        // Diverging after two blocks.
        assert_eq!(
            cached_tokens_of(&mut engine, 300.0, request(4, &[1, 2, 9], 14, 1)),
            8
        );
        // A request without keys never hits.
        assert_eq!(
            cached_tokens_of(&mut engine, 400.0, request(5, &[], 16, 1)),
            0
        );
        let metrics = engine.metrics();
        assert_eq!(metrics.prefix_cache_queries, 16 + 16 + 17 + 14 + 16);
        assert_eq!(metrics.prefix_cache_hits, 12 + 16 + 8);
        assert_eq!(metrics.kv_cache_usage, 0.0);
        assert_eq!(metrics.cached_blocks, 5);
    }

    #[test]
    fn a_request_admitted_in_the_same_step_hits_blocks_scheduled_before_it() {
        let mut engine = PodEngine::new(tiny(32)).unwrap();
        engine.submit(0.0, request(1, &[1, 2, 3], 12, 1)).unwrap();
        engine.submit(0.0, request(2, &[1, 2, 3], 13, 1)).unwrap();
        let steps = run(&mut engine, 0.0);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].batch.prefill_tokens, 12 + 1);
        let cached: Vec<u32> = summaries(&steps).iter().map(|s| s.cached_tokens).collect();
        assert_eq!(cached, vec![0, 12]);
        let stored: Vec<_> = steps[0].kv_events.iter().collect();
        assert_eq!(stored.len(), 1, "only the first request stores: {stored:?}");
    }

    #[test]
    fn lru_evicts_the_oldest_free_blocks_tail_first_and_never_pinned_ones() {
        let mut engine = PodEngine::new(tiny(8)).unwrap();
        // A then B: each caches two blocks and frees them, tail first.
        let mut steps = Vec::new();
        engine.submit(0.0, request(1, &[11, 12], 8, 1)).unwrap();
        steps.extend(run(&mut engine, 0.0));
        engine.submit(100.0, request(2, &[21, 22], 8, 1)).unwrap();
        steps.extend(run(&mut engine, 100.0));
        assert!(removed(&steps).is_empty());
        // Six fresh blocks: the four never-used ones, then A's tail, then A's head.
        engine
            .submit(200.0, request(3, &[31, 32, 33, 34, 35, 36], 24, 1))
            .unwrap();
        let steps = run(&mut engine, 200.0);
        assert_eq!(removed(&steps), vec![12, 11]);
        assert_eq!(engine.cached_prefix_blocks(&[21, 22]), 2);

        // D runs long and pins 31..33 through a hit; E must evict around them.
        engine
            .submit(300.0, request(4, &[31, 32, 33], 13, 8))
            .unwrap();
        let mut out = StepOutput::default();
        let end = engine.step(300.0, &mut out).unwrap();
        assert_eq!(out.kv_events, vec![KvChange::BlockRemoved { key: 22 }]);
        assert_eq!(engine.metrics().running, 1);
        engine
            .submit(end, request(5, &[51, 52, 53], 12, 1))
            .unwrap();
        let steps = run(&mut engine, end);
        // Free queue before D: B's blocks (tail first), then C's (tail first).
        // D's first step took B's tail (22); then E takes three blocks and D
        // one more as it decodes past 16 tokens, skipping D's pinned hits.
        assert_eq!(removed(&steps), vec![21, 36, 35, 34]);
        assert_eq!(engine.cached_prefix_blocks(&[31, 32, 33]), 3);
    }

    #[test]
    fn concurrent_requests_share_prefix_blocks() {
        let mut engine = PodEngine::new(tiny(16)).unwrap();
        engine.submit(0.0, request(1, &[1, 2, 3], 12, 10)).unwrap();
        let mut out = StepOutput::default();
        let end = engine.step(0.0, &mut out).unwrap();
        // A holds its three prompt blocks plus none yet for its first output.
        assert_eq!(engine.metrics().kv_cache_usage, 3.0 / 16.0);
        engine.submit(end, request(2, &[1, 2, 3], 14, 10)).unwrap();
        let end = engine.step(end, &mut out).unwrap();
        // B shares A's three blocks and adds one for its last two prompt
        // tokens; A's decode token needs a fourth block of its own.
        assert_eq!(engine.metrics().kv_cache_usage, 5.0 / 16.0);
        assert_eq!(out.batch.prefill_tokens, 2);
        engine.abort(RequestId(1));
        assert_eq!(engine.metrics().kv_cache_usage, 4.0 / 16.0);
        let steps = run(&mut engine, end);
        assert_eq!(summaries(&steps)[0].cached_tokens, 12);
        assert_eq!(engine.metrics().kv_cache_usage, 0.0);
    }

    #[test]
    fn kv_exhaustion_preempts_the_newest_request_which_later_resumes() {
        let mut engine = PodEngine::new(tiny(8)).unwrap();
        engine.submit(0.0, request(1, &[1, 2], 8, 20)).unwrap();
        engine.submit(0.0, request(2, &[3, 4], 8, 20)).unwrap();
        let steps = run(&mut engine, 0.0);
        let preempted = preempted_ids(&steps);
        assert!(!preempted.is_empty());
        assert!(
            preempted.iter().all(|&id| id == RequestId(2)),
            "{preempted:?}"
        );
        let done = summaries(&steps);
        assert_eq!(done.len(), 2);
        assert_eq!((done[0].id, done[0].preemptions), (RequestId(1), 0));
        assert_eq!(done[1].id, RequestId(2));
        assert_eq!(done[1].preemptions as usize, preempted.len());
        assert_eq!(done[1].output_tokens, 20);
        // Every output token exactly once, in order, across the preemption.
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| &s.events)
            .filter_map(|e| match e {
                EngineEvent::Token { id, index } if *id == RequestId(2) => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(tokens, (0..20).collect::<Vec<_>>());
        let metrics = engine.metrics();
        assert_eq!(metrics.preemptions, preempted.len() as u64);
        assert_eq!(metrics.generation_tokens, 40);
        // The re-admission recomputed B's outputs: its prompt blocks hit.
        assert!(metrics.prefix_cache_hits >= 4);
    }

    fn prioritized(id: u64, keys: &[u64], tokens: (u32, u32), priority: i32) -> SimRequest {
        SimRequest {
            priority,
            ..request(id, keys, tokens.0, tokens.1)
        }
    }

    fn finish_order(steps: &[StepOutput]) -> Vec<u64> {
        summaries(steps).iter().map(|s| s.id.0).collect()
    }

    #[test]
    fn priority_policy_orders_the_waiting_queue_by_priority_then_arrival() {
        for (policy, expected) in [
            (SchedulingPolicy::Fcfs, vec![1, 2, 3, 4, 5]),
            (SchedulingPolicy::Priority, vec![1, 3, 5, 2, 4]),
        ] {
            let params = PodParams {
                max_num_seqs: 1,
                scheduling_policy: policy,
                ..tiny(64)
            };
            let mut engine = PodEngine::new(params).unwrap();
            let priority = |p: i32| match policy {
                SchedulingPolicy::Fcfs => 0,
                SchedulingPolicy::Priority => p,
            };
            engine.submit(0.0, request(1, &[], 4, 3)).unwrap();
            let mut out = StepOutput::default();
            let end = engine.step(0.0, &mut out).unwrap();
            // Request 1 runs alone (max_num_seqs 1); the rest queue behind it.
            for (id, at, p) in [(2, 0.1, 5), (3, 0.2, -1), (4, 0.3, 5), (5, 0.4, -1)] {
                engine
                    .submit(end + at, prioritized(id, &[], (4, 3), priority(p)))
                    .unwrap();
            }
            assert_eq!(finish_order(&run(&mut engine, end)), expected, "{policy:?}");
        }
        let mut fcfs = PodEngine::new(tiny(64)).unwrap();
        assert_eq!(
            fcfs.submit(0.0, prioritized(9, &[], (4, 1), -1)),
            Err(SubmitError::PriorityNotEnabled {
                id: RequestId(9),
                priority: -1
            })
        );
        assert_eq!(
            SubmitError::PriorityNotEnabled {
                id: RequestId(9),
                priority: -1
            }
            .to_string(),
            "Got priority -1 but Priority scheduling is not enabled."
        );
    }

    #[test]
    fn priority_policy_preempts_the_lowest_priority_running_request() {
        // As `kv_exhaustion_preempts_the_newest_request_which_later_resumes`, but the
        // older request is the less important one: it is preempted, not the newest.
        let params = PodParams {
            scheduling_policy: SchedulingPolicy::Priority,
            ..tiny(8)
        };
        let mut engine = PodEngine::new(params).unwrap();
        engine
            .submit(0.0, prioritized(1, &[1, 2], (8, 20), 5))
            .unwrap();
        engine
            .submit(0.0, prioritized(2, &[3, 4], (8, 20), 0))
            .unwrap();
        let steps = run(&mut engine, 0.0);
        let preempted = preempted_ids(&steps);
        assert!(!preempted.is_empty());
        assert!(
            preempted.iter().all(|&id| id == RequestId(1)),
            "{preempted:?}"
        );
        let done = summaries(&steps);
        assert_eq!(finish_order(&steps), [2, 1]);
        assert_eq!(done[0].preemptions, 0);
        assert_eq!(done[1].output_tokens, 20);
        // No step ran over its token budget although a preempted request had been
        // scheduled in it first.
        assert!(steps
            .iter()
            .all(|s| s.batch.prefill_tokens + s.batch.decode_seqs <= 64));
    }

    #[test]
    fn a_first_running_request_preempting_itself_does_not_stall_the_pod() {
        // The low-priority request runs first, so it leads `running`; when KV runs out it is
        // its own victim, and the pod goes on with the Critical one in the same step.
        let params = PodParams {
            scheduling_policy: SchedulingPolicy::Priority,
            ..tiny(8)
        };
        let mut engine = PodEngine::new(params).unwrap();
        engine
            .submit(0.0, prioritized(1, &[1, 2], (8, 20), 5))
            .unwrap();
        let mut out = StepOutput::default();
        let end = engine.step(0.0, &mut out).unwrap();
        engine
            .submit(end, prioritized(2, &[3, 4], (8, 20), 0))
            .unwrap();
        let steps = run(&mut engine, end);
        assert_eq!(finish_order(&steps), [2, 1]);
        assert!(engine.is_idle());
    }

    #[test]
    fn abort_frees_blocks_and_keeps_them_cached() {
        let mut engine = PodEngine::new(tiny(16)).unwrap();
        engine.submit(0.0, request(1, &[1, 2], 9, 40)).unwrap();
        engine.submit(0.0, request(2, &[], 4, 1)).unwrap();
        let mut out = StepOutput::default();
        let end = engine.step(0.0, &mut out).unwrap();
        engine.submit(end, request(3, &[], 4, 1)).unwrap();
        assert!(engine.metrics().kv_cache_usage > 0.0);
        assert!(engine.abort(RequestId(1)));
        assert!(engine.abort(RequestId(3)));
        assert!(!engine.abort(RequestId(3)));
        assert!(!engine.abort(RequestId(2)), "finished already");
        assert!(engine.is_idle());
        assert_eq!(engine.metrics().kv_cache_usage, 0.0);
        assert_eq!(engine.cached_prefix_blocks(&[1, 2]), 2);
        assert_eq!(engine.step(end, &mut out), None);
        let mut kv = Vec::new();
        assert!(engine.reset_prefix_cache(&mut kv));
        assert_eq!(kv, vec![KvChange::AllCleared]);
        assert_eq!(engine.cached_prefix_blocks(&[1, 2]), 0);
    }

    #[test]
    fn reset_fails_while_blocks_are_in_use() {
        let mut engine = PodEngine::new(tiny(16)).unwrap();
        engine.submit(0.0, request(1, &[1], 4, 5)).unwrap();
        let mut out = StepOutput::default();
        engine.step(0.0, &mut out).unwrap();
        let mut kv = Vec::new();
        assert!(!engine.reset_prefix_cache(&mut kv));
        assert!(kv.is_empty());
        assert_eq!(engine.cached_prefix_blocks(&[1]), 1);
    }

    /// Applies KV events the way a router's index does.
    fn replay(index: &mut HashSet<u64>, events: &[KvChange]) {
        for event in events {
            match event {
                KvChange::BlockStored {
                    block_keys,
                    first_block,
                    blocks,
                    ..
                } => index.extend(&block_keys[*first_block..*first_block + *blocks]),
                KvChange::BlockRemoved { key } => {
                    assert!(index.remove(key), "removed unknown {key}")
                }
                KvChange::AllCleared => index.clear(),
            }
        }
    }

    #[test]
    fn kv_events_replayed_into_a_set_reproduce_the_cache_exactly() {
        for seed in 0..4 {
            let mut rng = StdRng::seed_from_u64(seed);
            let params = PodParams {
                max_num_batched_tokens: 32,
                max_num_seqs: 6,
                ..tiny(40)
            };
            let mut engine = PodEngine::new(params).unwrap();
            // Chained keys over a few shared prefixes, like real block hashes.
            let prefixes: Vec<Vec<u64>> = (0..5u64)
                .map(|p| (0..12u64).map(|b| (p + 1) * 1_000 + b).collect())
                .collect();
            let mut index = HashSet::new();
            let mut out = StepOutput::default();
            let mut now = 0.0;
            let mut next_id = 0;
            let mut saw_eviction = false;
            for round in 0..600 {
                if rng.random_bool(0.4) {
                    let prefix = &prefixes[rng.random_range(0..prefixes.len())];
                    let shared = rng.random_range(0..=prefix.len());
                    let own = rng.random_range(0..4usize);
                    let mut keys: Vec<u64> = prefix[..shared].to_vec();
                    keys.extend((0..own as u64).map(|b| 1_000_000 + next_id * 10 + b));
                    let tail = rng.random_range(1..4u32);
                    let prompt = keys.len() as u32 * 4 + tail;
                    let max_tokens = rng.random_range(1..24u32);
                    next_id += 1;
                    engine
                        .submit(now, request(next_id, &keys, prompt, max_tokens))
                        .unwrap();
                }
                if round % 97 == 0 && rng.random_bool(0.5) {
                    let victim = rng.random_range(1..=next_id.max(1));
                    engine.abort(RequestId(victim));
                }
                if engine.is_idle() && rng.random_bool(0.2) {
                    let mut kv = Vec::new();
                    assert!(engine.reset_prefix_cache(&mut kv));
                    replay(&mut index, &kv);
                }
                if let Some(end) = engine.step(now, &mut out) {
                    now = end;
                }
                saw_eviction |= out
                    .kv_events
                    .iter()
                    .any(|e| matches!(e, KvChange::BlockRemoved { .. }));
                replay(&mut index, &out.kv_events);
                let cached: HashSet<u64> = engine.cached_block_keys().collect();
                assert_eq!(index, cached, "seed {seed} round {round}");
            }
            assert!(
                saw_eviction,
                "seed {seed}: the workload should overflow the cache"
            );
        }
    }
}
