//! A simulated pod driven in virtual time by closed-loop clients, as a benchmark at fixed
//! concurrency drives vLLM: shared by the pod-model validation tests and the engine
//! benchmark.

use std::sync::Arc;

use hashbrown::HashMap;
use kvgate::sim::{
    EngineEvent, KvTransfer, PodEngine, PodParams, RequestId, RequestSummary, SimRequest,
    StepOutput,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How each client builds its prompts.
#[derive(Clone, Copy)]
pub enum Prompts {
    /// Random, never shared.
    Random { tokens: u32 },
    /// A shared prefix of one of `groups` groups, then a unique question.
    SharedPrefix {
        groups: u64,
        prefix_tokens: u32,
        question_tokens: u32,
    },
}

pub struct ClosedLoop {
    pub concurrency: usize,
    pub prompts: Prompts,
    pub output_tokens: u32,
    pub requests_per_client: u32,
    /// Clients start uniformly at random in `[0, start_spread_ms)`.
    pub start_spread_ms: f64,
    pub seed: u64,
}

#[derive(Default)]
pub struct Run {
    /// Requests that ran while every client was active.
    pub steady: Vec<RequestSummary>,
    pub finished: usize,
    pub steps: u64,
    pub preemptions: u64,
    pub prefix_hit_rate: f64,
    pub virtual_ms: f64,
}

impl Run {
    pub fn mean(&self, f: impl Fn(&RequestSummary) -> f64) -> f64 {
        self.steady.iter().map(f).sum::<f64>() / self.steady.len() as f64
    }

    pub fn ttft_s(&self) -> f64 {
        self.mean(RequestSummary::ttft_ms) / 1e3
    }

    pub fn tpot_ms(&self) -> f64 {
        self.mean(|s| s.tpot_ms().unwrap_or(0.0))
    }
}

/// Chained-looking block keys: unique per (stream, block).
pub fn keys(stream: u64, blocks: u32) -> impl Iterator<Item = u64> {
    (0..u64::from(blocks)).map(move |b| stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (b << 1 | 1))
}

fn prompt(prompts: Prompts, rng: &mut StdRng, id: u64, block_size: u32) -> (Arc<[u64]>, u32) {
    match prompts {
        Prompts::Random { tokens } => (keys(id + (1 << 40), tokens / block_size).collect(), tokens),
        Prompts::SharedPrefix {
            groups,
            prefix_tokens,
            question_tokens,
        } => {
            let group = rng.random_range(0..groups);
            let tokens = prefix_tokens + question_tokens;
            let prefix_blocks = prefix_tokens / block_size;
            let block_keys = keys(group, prefix_blocks)
                .chain(keys(id + (1 << 40), tokens / block_size - prefix_blocks))
                .collect();
            (block_keys, tokens)
        }
    }
}

/// Closed loop in virtual time: each client sends its next request the
/// moment the previous one finishes, like a benchmark at fixed concurrency.
pub fn closed_loop(params: PodParams, cfg: &ClosedLoop) -> Run {
    let block_size = params.block_size;
    let mut engine = PodEngine::new(params).unwrap();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut next_send: Vec<f64> = (0..cfg.concurrency)
        .map(|_| rng.random_range(0.0..cfg.start_spread_ms))
        .collect();
    let last_start = next_send.iter().copied().fold(0.0, f64::max);
    let mut sent = vec![0u32; cfg.concurrency];
    let mut last_finish = vec![0.0f64; cfg.concurrency];
    let mut owner = HashMap::new();
    let mut done = Vec::new();
    let mut run = Run::default();
    let mut out = StepOutput::default();
    let mut step_end: Option<f64> = None;
    let mut next_id = 0u64;
    loop {
        let (client, send_at) = next_send
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        let engine_at = step_end.or_else(|| engine.next_wakeup());
        if send_at.is_finite() && engine_at.is_none_or(|at| send_at <= at) {
            next_id += 1;
            let (block_keys, prompt_tokens) = prompt(cfg.prompts, &mut rng, next_id, block_size);
            let request = SimRequest {
                id: RequestId(next_id),
                block_keys,
                prompt_tokens,
                max_tokens: cfg.output_tokens,
                lora: None,
                kv_transfer: KvTransfer::None,
                priority: 0,
            };
            engine.submit(send_at, request).unwrap();
            owner.insert(RequestId(next_id), client);
            sent[client] += 1;
            next_send[client] = f64::INFINITY;
            continue;
        }
        let Some(at) = engine_at else {
            break;
        };
        step_end = engine.step(at, &mut out);
        if step_end.is_none() {
            continue;
        }
        run.steps += 1;
        for event in &out.events {
            if let EngineEvent::Finished(summary) = event {
                let client = owner.remove(&summary.id).unwrap();
                last_finish[client] = summary.finish_ms;
                if sent[client] < cfg.requests_per_client {
                    next_send[client] = summary.finish_ms;
                }
                done.push(summary.clone());
            }
        }
        run.virtual_ms = out.end_ms;
    }
    let first_client_done = last_finish.iter().copied().fold(f64::INFINITY, f64::min);
    run.finished = done.len();
    run.steady = done
        .into_iter()
        .filter(|s| s.arrival_ms >= last_start && s.finish_ms <= first_client_done)
        .collect();
    let metrics = engine.metrics();
    run.preemptions = metrics.preemptions;
    run.prefix_hit_rate = metrics.prefix_cache_hits as f64 / metrics.prefix_cache_queries as f64;
    run
}

pub fn random_prompts(
    concurrency: usize,
    prompt_tokens: u32,
    requests_per_client: u32,
) -> ClosedLoop {
    ClosedLoop {
        concurrency,
        prompts: Prompts::Random {
            tokens: prompt_tokens,
        },
        output_tokens: 1_024,
        requests_per_client,
        // About one request's duration, so clients are spread over a cycle.
        start_spread_ms: 1_024.0 * 25.0,
        seed: 7,
    }
}
