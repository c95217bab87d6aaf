//! Speed of the simulated pod engine: steps per second of wall time and how many times
//! faster than real time, per scenario. `cargo bench --bench sim_engine`.

// Shared with the pod-model tests, which use less of it.
#[allow(dead_code)]
#[path = "../tests/support/closed_loop.rs"]
mod closed_loop;

#[path = "support/smoke.rs"]
mod smoke;

use std::time::Instant;

use closed_loop::{closed_loop, random_prompts, ClosedLoop, Prompts};
use kvgate::sim::PodParams;

fn main() {
    // Requests per client; a smoke run only checks that every scenario runs through.
    let n = |full: u32| smoke::size(full, 3);
    let scenarios = [
        ("random 1024/1024, c=128", random_prompts(128, 1_024, n(40))),
        (
            "random 4096/1024, c=128 (preempting)",
            random_prompts(128, 4_096, n(10)),
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
                requests_per_client: n(40),
                start_spread_ms: 20_000.0,
                seed: 3,
            },
        ),
        ("random 1024/1024, c=8", random_prompts(8, 1_024, n(200))),
    ];
    for (name, cfg) in scenarios {
        let started = Instant::now();
        let run = closed_loop(PodParams::default(), &cfg);
        let wall = started.elapsed().as_secs_f64();
        smoke::figure("steps/s", run.steps as f64 / wall);
        smoke::figure("TPOT", run.tpot_ms());
        smoke::figure("TTFT", run.ttft_s());
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
