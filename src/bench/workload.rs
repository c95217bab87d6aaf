//! Benchmark workloads: streams of requests with arrival times, and the vLLM block keys
//! each prompt hashes to (computed with the real [`BlockHasher`], so the simulated pods,
//! the block index and a live gateway all agree on them).
//!
//! * **W1 shared prefixes** (`docs/evaluation.md` §2): groups × a shared system prompt,
//!   a fixed set of questions per group, Poisson arrivals over a QPS ladder (llm-d's
//!   `guide_precise-prefix-cache-routing` stages by default).
//! * **Control**: the same generator with a short shared prefix and a fresh question per
//!   request, so almost nothing is shared.
//! * **Mooncake** (FAST'25 traces): each 512-token `hash_id` expands deterministically to
//!   the same 512 token ids wherever it appears; the last block is cut to `input_length`.
//!   Replayed at their timestamps divided by a speed-up.
//! * **LoRA adapters**: requests for adapters of Zipf popularity, each adapter with its own
//!   system prompt (hashed with the adapter, as vLLM keys an adapter's blocks) and a fresh
//!   question per request, Poisson arrivals over a QPS ladder. Virtual time only.
//! * **LooGLE multi-turn** (W3): chats over shared long documents through the model's real
//!   chat template and tokenizer, each turn sent after the previous answer plus think time.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::hash::{BlockHash, BlockHasher, ExtraKeys, LoraKey};
use crate::tokenize::{self, Endpoint, ModelTokenizer, TokenizeError};
use crate::trace::{TraceRecord, MOONCAKE_BLOCK_TOKENS};

/// Token ids drawn for synthetic prompts: ordinary vocabulary entries of Qwen-sized
/// tokenizers, below every special token, so pods and tokenizers accept them.
const SYNTHETIC_TOKENS: std::ops::Range<u32> = 1_000..150_000;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    TraceLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path} holds no usable request")]
    EmptyTrace { path: PathBuf },
    #[error("{trace} was recorded with {recorded}-token blocks but the model's blockSize is {model}: replay it with a config of the recording fleet's model")]
    TraceBlocks {
        trace: String,
        recorded: u32,
        model: usize,
    },
    #[error(
        "{trace} holds block hashes, not tokens: a recorded trace replays in virtual time only"
    )]
    NoTokens { trace: String },
    #[error("workload parameter {name} must be {rule} (got {value})")]
    Param {
        name: &'static str,
        rule: &'static str,
        value: String,
    },
    #[error("LooGLE document {title:?}: {message}")]
    Document { title: String, message: String },
    #[error("tokenizing a LooGLE chat: {0}")]
    Tokenize(#[from] TokenizeError),
    #[error("tokenizer: {0}")]
    TokenizerLoad(#[from] crate::tokenize::TokenizerLoadError),
}

/// What a live run sends for a request.
#[derive(Debug)]
pub enum LivePrompt {
    /// A `/v1/completions` prompt given as token ids.
    Tokens(Vec<u32>),
    /// A `/v1/chat/completions` conversation (`messages`). Earlier turns carry the
    /// workload's own deterministic replies, the same ones the virtual run hashes, so both
    /// modes send identical prompts whatever the pods generate.
    Chat(serde_json::Value),
}

/// A request that is sent only after an earlier one of the same session finished.
#[derive(Clone, Copy, Debug)]
pub struct FollowUp {
    /// Index of the earlier request in [`Segment::requests`].
    pub previous: u32,
    /// The user's think time between that answer and this request.
    pub think_ms: f64,
}

/// One request of a workload.
#[derive(Clone, Debug)]
pub struct BenchRequest {
    /// Arrival, in ms from the segment's start; for a follow-up, ignored (it arrives
    /// `think_ms` after its predecessor finished).
    pub arrival_ms: f64,
    /// Index into [`Segment::stages`]; follow-ups belong to their session's stage.
    pub stage: u32,
    /// vLLM block keys of the prompt's full blocks.
    pub block_keys: Arc<[u64]>,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub follows: Option<FollowUp>,
    /// Present when the workload was built for a live run.
    pub live: Option<Arc<LivePrompt>>,
    /// A recorded trace's gateway replica that handled it, numbered from 0 in order of
    /// first appearance.
    pub replica: Option<u32>,
    /// The LoRA adapter it runs with (its block keys are hashed with it).
    pub adapter: Option<Arc<str>>,
}

/// A load step: requests arriving in `[start_ms, end_ms)` were offered at `offered_qps`.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stage {
    pub label: String,
    pub offered_qps: f64,
    pub start_ms: f64,
    pub end_ms: f64,
    /// Warm-up stages are simulated but left out of the results.
    pub measured: bool,
}

/// An independent run from cold pods: its stages follow each other without a reset.
#[derive(Debug)]
pub struct Segment {
    pub label: String,
    pub stages: Vec<Stage>,
    /// In arrival order (follow-ups after their predecessor).
    pub requests: Vec<BenchRequest>,
    /// Prompt-token hit rate of one shared infinite cache over these requests in order:
    /// the ceiling no routing can beat.
    pub pooled_hit_ceiling: f64,
}

#[derive(Debug)]
pub struct Workload {
    pub name: String,
    pub description: String,
    pub segments: Vec<Segment>,
}

impl Workload {
    pub fn request_count(&self) -> usize {
        self.segments.iter().map(|s| s.requests.len()).sum()
    }
}

/// Shape of a shared-prefix workload (inference-perf `shared_prefix`).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedPrefixShape {
    pub groups: u32,
    /// Distinct questions per group; ignored when `fresh_questions`.
    pub prompts_per_group: u32,
    pub prefix_tokens: u32,
    pub question_tokens: u32,
    pub output_tokens: u32,
    /// Every request gets a question of its own (the low-sharing control).
    pub fresh_questions: bool,
}

impl SharedPrefixShape {
    /// W1: 150 groups × 6,000-token prefix, 5 × 1,200-token questions, 1,000 output tokens.
    pub fn w1() -> Self {
        Self {
            groups: 150,
            prompts_per_group: 5,
            prefix_tokens: 6_000,
            question_tokens: 1_200,
            output_tokens: 1_000,
            fresh_questions: false,
        }
    }

    /// The control (GIE `long-questions__many-system-prompts`): 1,000-token prefixes over
    /// many groups, a fresh 6,200-token question per request.
    pub fn control() -> Self {
        Self {
            groups: 256,
            prompts_per_group: 1,
            prefix_tokens: 1_000,
            question_tokens: 6_200,
            output_tokens: 1_000,
            fresh_questions: true,
        }
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        for (name, value) in [
            ("groups", self.groups),
            ("prompts per group", self.prompts_per_group),
            ("output tokens", self.output_tokens),
        ] {
            if value == 0 {
                return Err(WorkloadError::Param {
                    name,
                    rule: "at least 1",
                    value: value.to_string(),
                });
            }
        }
        if self.prefix_tokens + self.question_tokens == 0 {
            return Err(WorkloadError::Param {
                name: "prefix + question tokens",
                rule: "at least 1",
                value: "0".into(),
            });
        }
        Ok(())
    }
}

/// Offered load over time: an optional warm-up, then steps of (QPS, seconds).
#[derive(Clone, Debug)]
pub struct Ladder {
    pub warmup: Option<(f64, f64)>,
    pub steps: Vec<(f64, f64)>,
}

impl Ladder {
    /// llm-d's precise-routing benchmark (inference-perf, 8 × Qwen3-32B): a 15 QPS × 50 s
    /// warm-up that seats the prefixes, then 3 → 60 QPS with shorter steps at high load.
    pub fn llm_d() -> Self {
        Self {
            warmup: Some((15.0, 50.0)),
            steps: vec![
                (3.0, 20.0),
                (10.0, 20.0),
                (15.0, 20.0),
                (20.0, 38.0),
                (22.0, 34.0),
                (25.0, 30.0),
                (30.0, 25.0),
                (35.0, 21.0),
                (40.0, 38.0),
                (43.0, 36.0),
                (46.0, 33.0),
                (49.0, 30.0),
                (52.0, 29.0),
                (55.0, 27.0),
                (57.0, 26.0),
                (60.0, 25.0),
            ],
        }
    }

    /// For the low-sharing control, whose every prompt is prefilled almost whole: steps
    /// of 2 QPS from light load to past saturation, 60 s each, no warm-up (nothing to seat).
    pub fn control() -> Self {
        Self {
            warmup: None,
            steps: (1..=8).map(|k| (f64::from(k) * 2.0, 60.0)).collect(),
        }
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        for &(qps, seconds) in self.warmup.iter().chain(&self.steps) {
            if !(qps.is_finite() && qps > 0.0 && seconds.is_finite() && seconds > 0.0) {
                return Err(WorkloadError::Param {
                    name: "QPS ladder",
                    rule: "positive rates and durations",
                    value: format!("{qps} QPS for {seconds} s"),
                });
            }
        }
        if self.steps.is_empty() {
            return Err(WorkloadError::Param {
                name: "QPS ladder",
                rule: "at least one step",
                value: "none".into(),
            });
        }
        Ok(())
    }

    fn stages(&self) -> Vec<Stage> {
        let mut stages = Vec::new();
        let mut start_ms = 0.0;
        let mut push = |label: String, qps: f64, seconds: f64, measured: bool| {
            let end_ms = start_ms + seconds * 1e3;
            stages.push(Stage {
                label,
                offered_qps: qps,
                start_ms,
                end_ms,
                measured,
            });
            start_ms = end_ms;
        };
        if let Some((qps, seconds)) = self.warmup {
            push(format!("warm-up {qps} QPS"), qps, seconds, false);
        }
        for &(qps, seconds) in &self.steps {
            push(format!("{qps} QPS"), qps, seconds, true);
        }
        stages
    }
}

/// Derives independent seeds for named streams.
fn sub_seed(seed: u64, stream: &str, id: u64) -> u64 {
    let mut bytes = Vec::with_capacity(stream.len() + 16);
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(stream.as_bytes());
    bytes.extend_from_slice(&id.to_le_bytes());
    xxh3_64(&bytes)
}

fn push_random_tokens(seed: u64, count: usize, out: &mut Vec<u32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    out.extend((0..count).map(|_| rng.random_range(SYNTHETIC_TOKENS)));
}

/// `count` prompts of `tokens` random tokens each, prompt `i` from the seed's `stream`.
fn random_prefixes(seed: u64, stream: &str, count: u32, tokens: u32) -> Vec<Vec<u32>> {
    (0..count)
        .map(|i| {
            let mut prefix = Vec::with_capacity(tokens as usize);
            push_random_tokens(
                sub_seed(seed, stream, u64::from(i)),
                tokens as usize,
                &mut prefix,
            );
            prefix
        })
        .collect()
}

/// Hashes whole prompts into block keys, reusing its buffer.
pub struct PromptHasher<'a> {
    hasher: &'a BlockHasher,
    hashes: Vec<BlockHash>,
}

impl<'a> PromptHasher<'a> {
    pub fn new(hasher: &'a BlockHasher) -> Self {
        Self {
            hasher,
            hashes: Vec::new(),
        }
    }

    pub fn block_keys(&mut self, tokens: &[u32]) -> Arc<[u64]> {
        self.hashes.clear();
        self.hasher
            .hash_prompt(tokens, &ExtraKeys::default(), &mut self.hashes);
        self.hashes.iter().map(|h| h.key).collect()
    }
}

/// Exponential inter-arrival gaps of a Poisson process, in ms.
fn poisson_gap_ms(rng: &mut StdRng, qps: f64) -> f64 {
    let uniform: f64 = rng.random();
    // 1 - u is in (0, 1], so the logarithm is finite.
    -(1.0 - uniform).ln() / qps * 1e3
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Arrival times of a Poisson process over the ladder's stages, with each arrival's stage.
fn ladder_arrivals(stages: &[Stage], rng: &mut StdRng) -> Vec<(f64, u32)> {
    let mut arrivals = Vec::new();
    for (index, stage) in stages.iter().enumerate() {
        let mut t = stage.start_ms + poisson_gap_ms(rng, stage.offered_qps);
        while t < stage.end_ms {
            arrivals.push((t, count_u32(index)));
            t += poisson_gap_ms(rng, stage.offered_qps);
        }
    }
    arrivals
}

/// A distinct prompt's block keys and, for live runs, what is sent.
type SharedPrompt = (Arc<[u64]>, Option<Arc<LivePrompt>>);

/// W1 and the control: shared prefixes over a QPS ladder.
pub fn shared_prefix(
    name: &str,
    shape: &SharedPrefixShape,
    ladder: &Ladder,
    hasher: &BlockHasher,
    seed: u64,
    live: bool,
) -> Result<Workload, WorkloadError> {
    shape.validate()?;
    ladder.validate()?;
    let stages = ladder.stages();
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, "arrivals", 0));
    let arrivals = ladder_arrivals(&stages, &mut rng);
    let mut prompt_hasher = PromptHasher::new(hasher);
    let prefixes = random_prefixes(seed, "prefix", shape.groups, shape.prefix_tokens);
    let build_prompt = |group: u32, question_seed: u64, hasher: &mut PromptHasher<'_>| {
        let mut tokens = Vec::with_capacity((shape.prefix_tokens + shape.question_tokens) as usize);
        tokens.extend_from_slice(&prefixes[group as usize]);
        push_random_tokens(question_seed, shape.question_tokens as usize, &mut tokens);
        let block_keys = hasher.block_keys(&tokens);
        (tokens, block_keys)
    };
    // Fixed questions: each distinct prompt is built once and shared by its requests.
    let mut fixed: Vec<SharedPrompt> = Vec::new();
    if !shape.fresh_questions {
        for group in 0..shape.groups {
            for question in 0..shape.prompts_per_group {
                let id = u64::from(group) << 32 | u64::from(question);
                let (tokens, keys) =
                    build_prompt(group, sub_seed(seed, "question", id), &mut prompt_hasher);
                fixed.push((keys, live.then(|| Arc::new(LivePrompt::Tokens(tokens)))));
            }
        }
    }
    let prompt_tokens = shape.prefix_tokens + shape.question_tokens;
    let mut requests = Vec::with_capacity(arrivals.len());
    for (n, (arrival_ms, stage)) in arrivals.into_iter().enumerate() {
        let (block_keys, live_prompt) = if shape.fresh_questions {
            let group = rng.random_range(0..shape.groups);
            let (tokens, keys) = build_prompt(
                group,
                sub_seed(seed, "fresh-question", n as u64),
                &mut prompt_hasher,
            );
            (keys, live.then(|| Arc::new(LivePrompt::Tokens(tokens))))
        } else {
            let (keys, live_prompt) = &fixed[rng.random_range(0..fixed.len())];
            (Arc::clone(keys), live_prompt.clone())
        };
        requests.push(BenchRequest {
            arrival_ms,
            stage,
            block_keys,
            prompt_tokens,
            output_tokens: shape.output_tokens,
            follows: None,
            live: live_prompt,
            replica: None,
            adapter: None,
        });
    }
    let block_size = hasher.settings().block_size;
    let pooled_hit_ceiling = pooled_hit_ceiling(&requests, &stages, block_size);
    let description = format!(
        "{} groups × {}-token prefix, {} × {}-token questions{}, {} output tokens, Poisson ladder {}",
        shape.groups,
        shape.prefix_tokens,
        if shape.fresh_questions {
            "fresh".to_string()
        } else {
            shape.prompts_per_group.to_string()
        },
        shape.question_tokens,
        if shape.fresh_questions {
            " (one per request)"
        } else {
            " per group"
        },
        shape.output_tokens,
        ladder_text(ladder),
    );
    Ok(Workload {
        name: name.to_string(),
        description,
        segments: vec![Segment {
            label: "ladder".into(),
            stages,
            requests,
            pooled_hit_ceiling,
        }],
    })
}

fn ladder_text(ladder: &Ladder) -> String {
    let steps: Vec<String> = ladder
        .steps
        .iter()
        .map(|(qps, seconds)| format!("{qps}×{seconds}s"))
        .collect();
    match ladder.warmup {
        Some((qps, seconds)) => format!("(warm-up {qps}×{seconds}s) {}", steps.join(", ")),
        None => steps.join(", "),
    }
}

/// Shape of the LoRA workload.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoraShape {
    pub adapters: u32,
    /// Zipf exponent of adapter popularity: adapter k (from 1) is asked for ∝ 1 / k^s.
    pub zipf_s: f64,
    /// Tokens of each adapter's system prompt.
    pub prefix_tokens: u32,
    /// Tokens of each request's own question.
    pub question_tokens: u32,
    pub output_tokens: u32,
}

impl LoraShape {
    /// 32 adapters, Zipf 1, 1,000-token system prompts, 500-token questions, 200 output tokens.
    pub fn standard() -> Self {
        Self {
            adapters: 32,
            zipf_s: 1.0,
            prefix_tokens: 1_000,
            question_tokens: 500,
            output_tokens: 200,
        }
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        let bad = |name, rule, value: String| Err(WorkloadError::Param { name, rule, value });
        if self.adapters == 0 {
            return bad("adapters", "at least 1", "0".into());
        }
        if self.output_tokens == 0 {
            return bad("output tokens", "at least 1", "0".into());
        }
        if self.prefix_tokens + self.question_tokens == 0 {
            return bad("prefix + question tokens", "at least 1", "0".into());
        }
        if !(self.zipf_s.is_finite() && self.zipf_s >= 0.0) {
            return bad(
                "zipf exponent",
                "a finite number ≥ 0",
                self.zipf_s.to_string(),
            );
        }
        Ok(())
    }
}

/// The adapter name of index `k` in a LoRA workload.
pub fn adapter_name(k: u32) -> String {
    format!("adapter-{k:02}")
}

/// The LoRA workload: each request picks an adapter by Zipf popularity, then sends that
/// adapter's system prompt followed by a fresh question.
pub fn lora_adapters(
    shape: &LoraShape,
    ladder: &Ladder,
    hasher: &BlockHasher,
    seed: u64,
) -> Result<Workload, WorkloadError> {
    shape.validate()?;
    ladder.validate()?;
    let stages = ladder.stages();
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, "arrivals", 0));
    let arrivals = ladder_arrivals(&stages, &mut rng);
    let names: Vec<Arc<str>> = (0..shape.adapters)
        .map(|k| Arc::from(adapter_name(k)))
        .collect();
    let mut cumulative = Vec::with_capacity(names.len());
    let mut total = 0.0;
    for k in 0..shape.adapters {
        total += 1.0 / f64::from(k + 1).powf(shape.zipf_s);
        cumulative.push(total);
    }
    let prefixes = random_prefixes(seed, "adapter-prefix", shape.adapters, shape.prefix_tokens);
    let prompt_tokens = shape.prefix_tokens + shape.question_tokens;
    let mut tokens = Vec::with_capacity(prompt_tokens as usize);
    let mut hashes = Vec::new();
    let mut requests = Vec::with_capacity(arrivals.len());
    for (n, (arrival_ms, stage)) in arrivals.into_iter().enumerate() {
        let draw = rng.random::<f64>() * total;
        let k = cumulative
            .partition_point(|&upto| upto <= draw)
            .min(names.len() - 1);
        tokens.clear();
        tokens.extend_from_slice(&prefixes[k]);
        push_random_tokens(
            sub_seed(seed, "adapter-question", n as u64),
            shape.question_tokens as usize,
            &mut tokens,
        );
        let extra = ExtraKeys {
            lora: Some(LoraKey {
                name: names[k].to_string(),
                int_id: i64::from(count_u32(k) + 1),
                path: format!("/adapters/{}", names[k]),
            }),
            cache_salt: None,
        };
        hashes.clear();
        hasher.hash_prompt(&tokens, &extra, &mut hashes);
        requests.push(BenchRequest {
            arrival_ms,
            stage,
            block_keys: hashes.iter().map(|h| h.key).collect(),
            prompt_tokens,
            output_tokens: shape.output_tokens,
            follows: None,
            live: None,
            replica: None,
            adapter: Some(Arc::clone(&names[k])),
        });
    }
    let block_size = hasher.settings().block_size;
    let pooled_hit_ceiling = pooled_hit_ceiling(&requests, &stages, block_size);
    let description = format!(
        "{} LoRA adapters of Zipf({}) popularity, each a {}-token system prompt; fresh {}-token questions, {} output tokens, Poisson ladder {}",
        shape.adapters,
        shape.zipf_s,
        shape.prefix_tokens,
        shape.question_tokens,
        shape.output_tokens,
        ladder_text(ladder),
    );
    Ok(Workload {
        name: "lora".into(),
        description,
        segments: vec![Segment {
            label: "ladder".into(),
            stages,
            requests,
            pooled_hit_ceiling,
        }],
    })
}

/// Which Mooncake trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MooncakeTrace {
    Conversation,
    Synthetic,
}

impl MooncakeTrace {
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Conversation => "mooncake_conversation_trace.jsonl",
            Self::Synthetic => "mooncake_synthetic_trace.jsonl",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Conversation => "mooncake-conversation",
            Self::Synthetic => "mooncake-synthetic",
        }
    }
}

/// Expands Mooncake hash ids into token ids: the same id always gives the same 512 tokens.
fn expand_hash_ids(hash_ids: &[u64], input_length: usize, out: &mut Vec<u32>) {
    out.clear();
    let block = MOONCAKE_BLOCK_TOKENS as usize;
    for &id in hash_ids {
        if out.len() >= input_length {
            break;
        }
        let take = block.min(input_length - out.len());
        let mut rng = StdRng::seed_from_u64(sub_seed(0, "mooncake-block", id));
        out.extend((0..take).map(|_| rng.random_range(SYNTHETIC_TOKENS)));
    }
    // A trace line whose ids cover less than its length: the rest is its own.
    if out.len() < input_length {
        let seed = sub_seed(
            0,
            "mooncake-tail",
            hash_ids.len() as u64 ^ input_length as u64,
        );
        push_random_tokens(seed, input_length - out.len(), out);
    }
}

/// Reads a trace file: Mooncake FAST'25 lines or kvgate's recorded ones ([`TraceRecord`]).
pub fn read_trace(path: &Path) -> Result<Vec<TraceRecord>, WorkloadError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| WorkloadError::TraceLine {
            path: path.to_path_buf(),
            line: number + 1,
            message: e.to_string(),
        })?;
        records.push(record);
    }
    Ok(records)
}

/// How a trace is replayed.
#[derive(Clone, Debug)]
pub struct TraceReplay {
    /// Speed-ups, one segment each: timestamps are divided by the speed-up.
    pub speedups: Vec<f64>,
    /// Longest request (prompt + output) the pods accept; longer ones are left out.
    pub max_tokens: u32,
    /// Use only the first N requests.
    pub limit: Option<usize>,
    /// Keep only the lines of this model (lines that name none are kept).
    pub model: Option<String>,
    /// Seconds at the start of the trace (at 1×) replayed but not measured.
    pub warmup_s: f64,
}

/// Lines of a trace a replay left out, and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceSkips {
    /// Prompt and output beyond what the pods accept.
    pub too_long: usize,
    /// Lines of another model.
    pub other_model: usize,
    /// No prompt tokens.
    pub empty: usize,
}

impl TraceSkips {
    pub fn total(&self) -> usize {
        self.too_long + self.other_model + self.empty
    }
}

/// Builds the replay of trace lines (in any order): one segment per speed-up, requests at
/// their timestamps. Mooncake's 512-token ids are expanded into tokens and hashed with the
/// model's hasher; a recorded trace's ids are the block keys themselves, already in the
/// model's blocks.
pub fn trace_workload(
    name: &str,
    source: &str,
    mut records: Vec<TraceRecord>,
    replay: &TraceReplay,
    hasher: &BlockHasher,
    live: bool,
) -> Result<(Workload, TraceSkips), WorkloadError> {
    let speedups = &replay.speedups;
    if speedups.is_empty() || speedups.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(WorkloadError::Param {
            name: "speed-ups",
            rule: "one or more positive numbers",
            value: format!("{speedups:?}"),
        });
    }
    if !(replay.warmup_s.is_finite() && replay.warmup_s >= 0.0) {
        return Err(WorkloadError::Param {
            name: "trace warm-up",
            rule: "a number of seconds ≥ 0",
            value: replay.warmup_s.to_string(),
        });
    }
    records.sort_by_key(|r| r.timestamp);
    let block_size = hasher.settings().block_size;
    let mut skips = TraceSkips::default();
    let mut kept = Vec::with_capacity(records.len());
    for record in records {
        if replay.limit.is_some_and(|limit| kept.len() >= limit) {
            break;
        }
        if let (Some(model), Some(wanted)) = (&record.model, &replay.model) {
            if model != wanted {
                skips.other_model += 1;
                continue;
            }
        }
        let output = record.output_length.max(1);
        if record.input_length == 0 {
            skips.empty += 1;
            continue;
        }
        if u64::from(record.input_length) + u64::from(output) > u64::from(replay.max_tokens) {
            skips.too_long += 1;
            continue;
        }
        if let Some(recorded) = record.block_size {
            if recorded as usize != block_size {
                return Err(WorkloadError::TraceBlocks {
                    trace: source.to_string(),
                    recorded,
                    model: block_size,
                });
            }
            if live {
                return Err(WorkloadError::NoTokens {
                    trace: source.to_string(),
                });
            }
        }
        kept.push(record);
    }
    let Some(first) = kept.first().map(|r| r.timestamp) else {
        return Err(WorkloadError::EmptyTrace {
            path: PathBuf::from(source),
        });
    };
    let mut prompt_hasher = PromptHasher::new(hasher);
    let mut tokens = Vec::new();
    let mut base = Vec::with_capacity(kept.len());
    let mut replica_ids: Vec<&str> = Vec::new();
    for record in &kept {
        let replica = record.replica.as_deref().map(|id| {
            let slot = replica_ids.iter().position(|&known| known == id);
            let slot = slot.unwrap_or_else(|| {
                replica_ids.push(id);
                replica_ids.len() - 1
            });
            u32::try_from(slot).unwrap_or(u32::MAX)
        });
        let (block_keys, live_prompt) = match record.block_size {
            Some(_) => {
                let full = (record.input_length as usize / block_size).min(record.hash_ids.len());
                (Arc::from(&record.hash_ids[..full]), None)
            }
            None => {
                expand_hash_ids(&record.hash_ids, record.input_length as usize, &mut tokens);
                let keys = prompt_hasher.block_keys(&tokens);
                (
                    keys,
                    live.then(|| Arc::new(LivePrompt::Tokens(tokens.clone()))),
                )
            }
        };
        base.push((record, block_keys, live_prompt, replica));
    }
    let last = kept.last().map_or(first, |r| r.timestamp);
    let span_ms = ((last - first) as f64).max(1.0);
    let mut segments = Vec::new();
    for &speedup in speedups {
        let end_ms = span_ms / speedup + 1.0;
        let warmup_ms = (replay.warmup_s * 1e3 / speedup).min(end_ms);
        let arrivals = |r: &TraceRecord| (r.timestamp - first) as f64 / speedup;
        let measured_requests = kept.iter().filter(|r| arrivals(r) >= warmup_ms).count();
        let offered_qps = measured_requests as f64 / ((end_ms - warmup_ms).max(1.0) / 1e3);
        let label = format!("{speedup}× ({offered_qps:.1} QPS)");
        let mut stages = Vec::new();
        if warmup_ms > 0.0 {
            stages.push(Stage {
                label: format!("warm-up {}", replay.warmup_s / speedup),
                offered_qps,
                start_ms: 0.0,
                end_ms: warmup_ms,
                measured: false,
            });
        }
        stages.push(Stage {
            label,
            offered_qps,
            start_ms: warmup_ms,
            end_ms,
            measured: true,
        });
        let requests: Vec<BenchRequest> = base
            .iter()
            .map(|(record, keys, live_prompt, replica)| {
                let arrival_ms = arrivals(record);
                BenchRequest {
                    arrival_ms,
                    stage: u32::from(stages.len() > 1 && arrival_ms >= warmup_ms),
                    block_keys: Arc::clone(keys),
                    prompt_tokens: record.input_length,
                    output_tokens: record.output_length.max(1),
                    follows: None,
                    live: live_prompt.clone(),
                    replica: *replica,
                    adapter: None,
                }
            })
            .collect();
        let pooled_hit_ceiling = pooled_hit_ceiling(&requests, &stages, block_size);
        segments.push(Segment {
            label: format!("{speedup}×"),
            stages,
            requests,
            pooled_hit_ceiling,
        });
    }
    let skipped = if skips.total() > 0 {
        format!(
            " ({} left out: {} too long for the pods, {} of another model, {} without a prompt)",
            skips.total(),
            skips.too_long,
            skips.other_model,
            skips.empty
        )
    } else {
        String::new()
    };
    let description = format!(
        "{source}: {} requests over {:.0} s{skipped}, {}, timestamps ÷ speed-up",
        kept.len(),
        span_ms / 1e3,
        match kept[0].block_size {
            Some(size) => format!("recorded {size}-token block hashes"),
            None => "512-token hash ids expanded to fixed tokens".into(),
        },
    );
    Ok((
        Workload {
            name: name.to_string(),
            description,
            segments,
        },
        skips,
    ))
}

/// Replays a Mooncake trace at each speed-up (timestamps divided by it), one segment each.
/// Requests longer than `max_tokens` (prompt + output) are left out and counted.
pub fn mooncake(
    traces_dir: &Path,
    trace: MooncakeTrace,
    speedups: &[f64],
    max_tokens: u32,
    limit: Option<usize>,
    hasher: &BlockHasher,
    live: bool,
) -> Result<(Workload, usize), WorkloadError> {
    let path = traces_dir.join(trace.file_name());
    let records = read_trace(&path)?;
    let replay = TraceReplay {
        speedups: speedups.to_vec(),
        max_tokens,
        limit,
        model: None,
        warmup_s: 0.0,
    };
    let source = format!(
        "Mooncake FAST'25 {} trace",
        match trace {
            MooncakeTrace::Conversation => "conversation",
            MooncakeTrace::Synthetic => "synthetic",
        }
    );
    let (workload, skips) = trace_workload(trace.name(), &source, records, &replay, hasher, live)?;
    Ok((workload, skips.total()))
}

/// How many pods and gateway replicas a recorded trace saw at once: the most distinct
/// `pod` and `prefill_pod` (`replica`) values whose first-to-last spans overlap, so a pod
/// replaced in a rollout is not counted twice. `None` when the lines do not say (Mooncake
/// traces).
pub fn trace_fleet(records: &[TraceRecord]) -> (Option<usize>, Option<usize>) {
    fn most_at_once<'a>(spans: impl Iterator<Item = (&'a str, u64)>) -> Option<usize> {
        let mut by_id: HashMap<&str, (u64, u64)> = HashMap::new();
        for (id, at) in spans {
            let span = by_id.entry(id).or_insert((at, at));
            span.0 = span.0.min(at);
            span.1 = span.1.max(at);
        }
        // Starts before ends at the same instant: touching spans overlap.
        let mut edges: Vec<(u64, i32)> = by_id
            .values()
            .flat_map(|&(start, end)| [(start, -1), (end, 1)])
            .collect();
        edges.sort_unstable();
        let (mut open, mut most) = (0i32, 0i32);
        for (_, edge) in edges {
            open -= edge;
            most = most.max(open);
        }
        usize::try_from(most).ok().filter(|&n| n > 0)
    }
    let pods = most_at_once(records.iter().flat_map(|r| {
        [r.pod.as_deref(), r.prefill_pod.as_deref()]
            .into_iter()
            .flatten()
            .map(|pod| (pod, r.timestamp))
    }));
    let replicas = most_at_once(
        records
            .iter()
            .filter_map(|r| Some((r.replica.as_deref()?, r.timestamp))),
    );
    (pods, replicas)
}

/// Shape of the W3 multi-turn LooGLE sessions.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatShape {
    /// Sessions started per second (Poisson).
    pub sessions_per_s: f64,
    pub duration_s: f64,
    /// Questions asked per session, one per turn (taken in order from the document).
    pub turns: u32,
    pub reply_tokens: u32,
    pub think_s: f64,
    /// Words of the generic system prompt before the document.
    pub system_words: u32,
}

impl Default for ChatShape {
    fn default() -> Self {
        Self {
            sessions_per_s: 0.5,
            duration_s: 300.0,
            turns: 4,
            reply_tokens: 300,
            think_s: 45.0,
            system_words: 700,
        }
    }
}

/// One LooGLE document and its questions.
struct LoogleDoc {
    title: String,
    text: String,
    questions: Vec<String>,
}

fn read_loogle(path: &Path) -> Result<Vec<LoogleDoc>, WorkloadError> {
    #[derive(Deserialize)]
    struct Line {
        input: String,
        title: String,
        qa_pairs: String,
    }
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut docs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(line).map_err(|e| WorkloadError::TraceLine {
            path: path.to_path_buf(),
            line: number + 1,
            message: e.to_string(),
        })?;
        let questions = python_dict_strings(&parsed.qa_pairs, "Q").map_err(|message| {
            WorkloadError::Document {
                title: parsed.title.clone(),
                message,
            }
        })?;
        if questions.is_empty() {
            return Err(WorkloadError::Document {
                title: parsed.title,
                message: "no questions".into(),
            });
        }
        docs.push(LoogleDoc {
            title: parsed.title,
            text: parsed.input,
            questions,
        });
    }
    if docs.is_empty() {
        return Err(WorkloadError::EmptyTrace {
            path: path.to_path_buf(),
        });
    }
    Ok(docs)
}

/// The string values of `key` in a Python-literal list of dicts (LooGLE's `qa_pairs`):
/// scans Python string literals and keeps each one that follows `'key':`.
fn python_dict_strings(literal: &str, key: &str) -> Result<Vec<String>, String> {
    let mut strings: Vec<(String, usize)> = Vec::new();
    let bytes = literal.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let quote = bytes[i];
        if quote != b'\'' && quote != b'"' {
            i += 1;
            continue;
        }
        let mut value = String::new();
        let mut j = i + 1;
        let mut closed = false;
        while j < bytes.len() {
            let c = bytes[j];
            if c == b'\\' {
                let Some(&escaped) = bytes.get(j + 1) else {
                    break;
                };
                match escaped {
                    b'n' => value.push('\n'),
                    b't' => value.push('\t'),
                    b'r' => value.push('\r'),
                    b'\\' => value.push('\\'),
                    b'\'' => value.push('\''),
                    b'"' => value.push('"'),
                    b'x' => {
                        let hex = literal.get(j + 2..j + 4).ok_or("truncated \\x escape")?;
                        let code = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                        value.push(char::from_u32(code).ok_or("bad \\x escape")?);
                        j += 2;
                    }
                    b'u' => {
                        let hex = literal.get(j + 2..j + 6).ok_or("truncated \\u escape")?;
                        let code = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                        value.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        j += 4;
                    }
                    other => {
                        value.push('\\');
                        value.push(other as char);
                    }
                }
                j += 2;
                continue;
            }
            if c == quote {
                closed = true;
                break;
            }
            // Copy one UTF-8 character whole.
            let start = j;
            j += 1;
            while j < bytes.len() && (bytes[j] & 0xC0) == 0x80 {
                j += 1;
            }
            value.push_str(literal.get(start..j).ok_or("invalid UTF-8 boundary")?);
        }
        if !closed {
            return Err("unterminated string literal".into());
        }
        strings.push((value, j + 1));
        i = j + 1;
    }
    let mut found = Vec::new();
    for pair in strings.windows(2) {
        let (name, name_end) = &pair[0];
        let between = literal.get(*name_end..).unwrap_or_default().trim_start();
        if name == key && between.starts_with(':') {
            found.push(pair[1].0.clone());
        }
    }
    Ok(found)
}

/// Text of a deterministic assistant reply of about `tokens` tokens.
fn reply_text(seed: u64, tokens: u32) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "document",
        "states",
        "that",
        "answer",
        "is",
        "based",
        "on",
        "section",
        "which",
        "describes",
        "evidence",
        "from",
        "records",
        "and",
        "figures",
        "in",
        "this",
        "part",
        "clearly",
        "shows",
        "a",
        "result",
        "of",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = String::new();
    for n in 0..tokens {
        if n > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out
}

/// W3: multi-turn chats over the LooGLE documents, tokenized with the model's chat template.
pub fn loogle_chats(
    traces_dir: &Path,
    shape: &ChatShape,
    model: &str,
    tokenizer: &ModelTokenizer,
    hasher: &BlockHasher,
    seed: u64,
    live: bool,
) -> Result<Workload, WorkloadError> {
    if !(shape.sessions_per_s > 0.0 && shape.duration_s > 0.0 && shape.turns > 0) {
        return Err(WorkloadError::Param {
            name: "chat shape",
            rule: "positive session rate, duration and turns",
            value: format!("{shape:?}"),
        });
    }
    let docs = read_loogle(&traces_dir.join("loogle_longdep_qa.jsonl"))?;
    let stages = vec![Stage {
        label: format!("{} sessions/s", shape.sessions_per_s),
        offered_qps: shape.sessions_per_s * f64::from(shape.turns),
        start_ms: 0.0,
        end_ms: shape.duration_s * 1e3,
        measured: true,
    }];
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, "sessions", 0));
    let arrivals = ladder_arrivals(
        &[Stage {
            offered_qps: shape.sessions_per_s,
            ..stages[0].clone()
        }],
        &mut rng,
    );
    let system = reply_text(sub_seed(seed, "system", 0), shape.system_words);
    let mut prompt_hasher = PromptHasher::new(hasher);
    let mut requests = Vec::new();
    for (session, (arrival_ms, stage)) in arrivals.into_iter().enumerate() {
        let doc = &docs[rng.random_range(0..docs.len())];
        let first_question = rng.random_range(0..doc.questions.len());
        let mut messages = vec![serde_json::json!({
            "role": "system",
            "content": format!("{system}\n\nDocument: {}\n\n{}", doc.title, doc.text),
        })];
        let mut previous: Option<u32> = None;
        for turn in 0..shape.turns as usize {
            let question = &doc.questions[(first_question + turn) % doc.questions.len()];
            messages.push(serde_json::json!({"role": "user", "content": question}));
            let body = serde_json::json!({
                "model": model,
                "messages": messages,
                "max_tokens": shape.reply_tokens,
            });
            let body = serde_json::to_vec(&body).map_err(|e| WorkloadError::Document {
                title: doc.title.clone(),
                message: e.to_string(),
            })?;
            let request = tokenize::parse_request(Endpoint::ChatCompletions, &body)
                .map_err(TokenizeError::from)?;
            let tokens = tokenizer.tokens(&request)?;
            let block_keys = prompt_hasher.block_keys(&tokens);
            let index = count_u32(requests.len());
            requests.push(BenchRequest {
                arrival_ms,
                stage,
                block_keys,
                prompt_tokens: count_u32(tokens.len()),
                output_tokens: shape.reply_tokens,
                follows: previous.map(|previous| FollowUp {
                    previous,
                    think_ms: shape.think_s * 1e3,
                }),
                live: live.then(|| Arc::new(LivePrompt::Chat(serde_json::json!(messages)))),
                replica: None,
                adapter: None,
            });
            previous = Some(index);
            let reply = reply_text(
                sub_seed(seed, "reply", (session as u64) << 8 | turn as u64),
                shape.reply_tokens,
            );
            messages.push(serde_json::json!({"role": "assistant", "content": reply}));
        }
    }
    let block_size = hasher.settings().block_size;
    let pooled_hit_ceiling = pooled_hit_ceiling(&requests, &stages, block_size);
    Ok(Workload {
        name: "loogle-chat".into(),
        description: format!(
            "{} multi-turn chats/s for {} s over {} LooGLE documents: {}-word system prompt + document, {} turns, {}-token replies, {} s think time, real chat template and tokenizer",
            shape.sessions_per_s,
            shape.duration_s,
            docs.len(),
            shape.system_words,
            shape.turns,
            shape.reply_tokens,
            shape.think_s
        ),
        segments: vec![Segment {
            label: "sessions".into(),
            stages,
            requests,
            pooled_hit_ceiling,
        }],
    })
}

/// Prompt-token hit rate of one infinite cache shared by all pods, requests in order,
/// with vLLM's rule that the last prompt token is always computed. Requests of stages
/// that are not measured (warm-up) fill the cache but are not counted.
pub fn pooled_hit_ceiling(requests: &[BenchRequest], stages: &[Stage], block_size: usize) -> f64 {
    let mut seen: HashSet<u64> = HashSet::new();
    let mut hits = 0u64;
    let mut prompt = 0u64;
    for request in requests {
        let counted = stages
            .get(request.stage as usize)
            .is_none_or(|stage| stage.measured);
        if !counted {
            seen.extend(request.block_keys.iter().copied());
            continue;
        }
        let usable = (request.prompt_tokens.saturating_sub(1) as usize) / block_size.max(1);
        let held = request
            .block_keys
            .iter()
            .take(usable)
            .take_while(|key| seen.contains(key))
            .count();
        hits += (held * block_size) as u64;
        prompt += u64::from(request.prompt_tokens);
        seen.extend(request.block_keys.iter().copied());
    }
    if prompt == 0 {
        0.0
    } else {
        hits as f64 / prompt as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{HashAlgo, HashSettings};
    use crate::vllm::VllmRelease;

    fn hasher() -> BlockHasher {
        BlockHasher::new(&HashSettings {
            algo: HashAlgo::Sha256Cbor,
            block_size: 64,
            seed: Some("42".into()),
            release: "0.11.0".parse::<VllmRelease>().unwrap(),
        })
        .unwrap()
    }

    #[test]
    fn a_recorded_fleet_counts_prefill_pods_with_the_decode_pods() {
        let line = |timestamp: u64, pod: &str, prefill: Option<&str>| {
            let mut record: TraceRecord = serde_json::from_value(serde_json::json!({
                "timestamp": timestamp, "input_length": 128, "output_length": 8,
                "hash_ids": [1, 2], "block_size": 64, "pod": pod, "replica": "r",
            }))
            .unwrap();
            record.prefill_pod = prefill.map(str::to_string);
            record
        };
        // Two decode pods, and two prefill pods that only ever ran prefill legs.
        let records = [
            line(10, "d1:8000", Some("p1:8000")),
            line(20, "d2:8000", Some("p2:8000")),
            line(30, "d1:8000", None),
            line(40, "d2:8000", Some("p1:8000")),
        ];
        assert_eq!(trace_fleet(&records), (Some(4), Some(1)));
        assert_eq!(trace_fleet(&records[2..3]), (Some(1), Some(1)));
    }

    #[test]
    fn recorded_requests_keep_the_replica_that_handled_them() {
        let record = |timestamp: u64, replica: Option<&str>| TraceRecord {
            timestamp,
            input_length: 128,
            output_length: 8,
            hash_ids: vec![timestamp, 7],
            block_size: Some(64),
            model: None,
            replica: replica.map(str::to_string),
            pod: None,
            policy: None,
            predicted_cached_tokens: None,
            actual_cached_tokens: None,
            status: None,
            prefill_pod: None,
            prefill_predicted_cached_tokens: None,
            prefill_actual_cached_tokens: None,
        };
        // Out of order, as two replicas' files merge: numbered by first arrival.
        let records = vec![
            record(30, Some("b")),
            record(10, Some("b")),
            record(20, Some("a")),
            record(40, None),
        ];
        let replay = TraceReplay {
            speedups: vec![1.0],
            max_tokens: 4_096,
            limit: None,
            model: None,
            warmup_s: 0.0,
        };
        let (workload, _) =
            trace_workload("t", "t.jsonl", records, &replay, &hasher(), false).unwrap();
        let replicas: Vec<Option<u32>> = workload.segments[0]
            .requests
            .iter()
            .map(|r| r.replica)
            .collect();
        assert_eq!(replicas, [Some(0), Some(1), Some(0), None]);
    }

    #[test]
    fn shared_prefix_requests_share_exactly_the_prefix_blocks() {
        let shape = SharedPrefixShape {
            groups: 3,
            prompts_per_group: 2,
            prefix_tokens: 640,
            question_tokens: 200,
            output_tokens: 5,
            fresh_questions: false,
        };
        let ladder = Ladder {
            warmup: None,
            steps: vec![(50.0, 2.0)],
        };
        let workload = shared_prefix("w1", &shape, &ladder, &hasher(), 7, false).unwrap();
        let requests = &workload.segments[0].requests;
        assert!((60..140).contains(&requests.len()), "{}", requests.len());
        let distinct: HashSet<&[u64]> = requests.iter().map(|r| &*r.block_keys).collect();
        assert_eq!(distinct.len(), 6);
        let heads: HashSet<&[u64]> = requests.iter().map(|r| &r.block_keys[..10]).collect();
        assert_eq!(heads.len(), 3);
        assert!(requests.iter().all(|r| r.block_keys.len() == 840 / 64));
        assert!(requests
            .windows(2)
            .all(|w| w[0].arrival_ms <= w[1].arrival_ms));
        // Only the first request of each distinct prompt misses.
        let ceiling = workload.segments[0].pooled_hit_ceiling;
        assert!(ceiling > 0.85, "{ceiling}");
        let again = shared_prefix("w1", &shape, &ladder, &hasher(), 7, false).unwrap();
        assert_eq!(
            again.segments[0].requests[5].block_keys,
            requests[5].block_keys
        );
    }

    #[test]
    fn mooncake_blocks_expand_to_the_same_tokens_everywhere() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        expand_hash_ids(&[4, 9, 11], 1_100, &mut a);
        expand_hash_ids(&[4, 9, 12], 1_500, &mut b);
        assert_eq!(a.len(), 1_100);
        assert_eq!(b.len(), 1_500);
        assert_eq!(a[..1_024], b[..1_024]);
        assert_ne!(a[1_024..1_100], b[1_024..1_100]);
    }

    #[test]
    fn python_literals_are_read() {
        let literal = r#"[{'Q': "Who's there?\nA", 'A': '3', 'S': ['x']}, {'Q': 'caf\xe9 \u00e9', 'A': "it's"}]"#;
        assert_eq!(
            python_dict_strings(literal, "Q").unwrap(),
            vec!["Who's there?\nA".to_string(), "café é".to_string()]
        );
        assert!(python_dict_strings("[{'Q': 'open", "Q").is_err());
    }

    #[test]
    fn ceiling_spares_the_last_token() {
        let request = |keys: &[u64], tokens: u32| BenchRequest {
            arrival_ms: 0.0,
            stage: 0,
            block_keys: keys.into(),
            prompt_tokens: tokens,
            output_tokens: 1,
            follows: None,
            live: None,
            replica: None,
            adapter: None,
        };
        let requests = [request(&[1, 2], 128), request(&[1, 2], 128)];
        assert_eq!(pooled_hit_ceiling(&requests, &[], 64), 64.0 / 256.0);
        let requests = [request(&[1, 2], 130), request(&[1, 2], 130)];
        assert_eq!(pooled_hit_ceiling(&requests, &[], 64), 128.0 / 260.0);
        // A warm-up request seeds the cache without counting.
        let warm = Stage {
            label: String::new(),
            offered_qps: 1.0,
            start_ms: 0.0,
            end_ms: 1.0,
            measured: false,
        };
        let measured = Stage {
            measured: true,
            ..warm.clone()
        };
        let mut first = request(&[1, 2], 130);
        first.stage = 0;
        let mut second = request(&[1, 2], 130);
        second.stage = 1;
        assert_eq!(
            pooled_hit_ceiling(&[first, second], &[warm, measured], 64),
            128.0 / 130.0
        );
    }
}
