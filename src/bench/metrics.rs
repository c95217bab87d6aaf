//! What one policy did on one segment (raw records, from a virtual or a live run), and
//! the per-stage and per-policy figures derived from them.

use serde::Serialize;

use super::workload::Stage;
use crate::metrics::flow::ShedReason;

/// One finished request.
#[derive(Clone, Debug, Default)]
pub struct RequestRecord {
    /// Index of the request in its segment.
    pub request: u32,
    pub stage: u32,
    pub pod: u32,
    pub ttft_ms: f64,
    /// Mean time per output token after the first; none for a one-token answer.
    pub tpot_ms: Option<f64>,
    pub e2e_ms: f64,
    pub prompt_tokens: u32,
    /// Prompt tokens served from the pod's prefix cache.
    pub cached_tokens: u32,
    pub output_tokens: u32,
    /// Prompt tokens some pod held when the request arrived beyond what its pod reused:
    /// prefill wasted by the routing decision. Known in virtual time only.
    pub missed_tokens: Option<u32>,
    pub preemptions: u32,
    /// Gaps between consecutive streamed tokens (virtual runs only).
    pub itl_ms: Vec<f32>,
}

/// Everything a run of one policy over one segment produced.
#[derive(Debug, Default)]
pub struct RunData {
    pub records: Vec<RequestRecord>,
    /// Requests that failed (live runs: HTTP or stream errors).
    pub failed: u64,
    /// Requests flow control refused (virtual runs with a flow stage), and why.
    pub refused: Vec<(u32, ShedReason)>,
    /// Output tokens generated inside each stage's time window.
    pub stage_output_tokens: Vec<u64>,
    /// Per stage: sum and count of (max / mean) router-side in-flight requests over pods,
    /// sampled at each scrape.
    pub stage_balance: Vec<(f64, u32)>,
    /// Requests routed to each pod.
    pub pod_requests: Vec<u64>,
    /// Wall time of each routing decision (schedule + routed), in µs.
    pub decision_us: Vec<f64>,
    /// KV event batches delivered into the index, and lost on the way.
    pub event_batches: u64,
    pub event_batches_lost: u64,
    /// Oracle runs: decisions where the index disagreed with a pod's true cache (must be 0).
    pub oracle_mismatches: u64,
    /// LoRA adapters swapped in by the pods (virtual time, pods with adapter slots).
    pub adapter_loads: u64,
    /// Several replicas: (other replicas that would have picked the handling replica's
    /// pod, other replicas asked), over all requests.
    pub same_pick: (u64, u64),
    pub replicas: usize,
    /// Index size at the end of the run.
    pub index_blocks: u64,
    pub index_bytes: usize,
    /// Virtual time simulated (virtual runs) or wall time of the run (live), in s.
    pub span_s: f64,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
    /// Live runs with a pod restart: when it was asked for, in ms since the Unix epoch.
    pub restarted_unix_ms: Option<u64>,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Latency and cache figures over a set of requests.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Figures {
    pub requests: usize,
    pub hit_rate: f64,
    pub ttft_mean_s: Option<f64>,
    pub ttft_p50_s: Option<f64>,
    pub ttft_p90_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    pub tpot_p99_ms: Option<f64>,
    /// Inter-token latency: every gap between consecutive streamed tokens (virtual runs).
    pub itl_p50_ms: Option<f64>,
    pub itl_p90_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    pub e2e_p99_s: Option<f64>,
    /// Missed reuse: prompt tokens cached on some pod at arrival but recomputed, as a
    /// fraction of prompt tokens (virtual runs only).
    pub wasted_prefill: Option<f64>,
    pub preemptions: u64,
}

impl Figures {
    fn of<'a>(records: impl Iterator<Item = &'a RequestRecord> + Clone) -> Self {
        let mut prompt = 0u64;
        let mut cached = 0u64;
        let mut missed = Some(0u64);
        let mut preemptions = 0u64;
        let mut requests = 0;
        for r in records.clone() {
            requests += 1;
            prompt += u64::from(r.prompt_tokens);
            cached += u64::from(r.cached_tokens);
            missed = missed.zip(r.missed_tokens).map(|(a, b)| a + u64::from(b));
            preemptions += u64::from(r.preemptions);
        }
        let ttft = sorted(records.clone().map(|r| r.ttft_ms / 1e3));
        let tpot = sorted(records.clone().filter_map(|r| r.tpot_ms));
        let itl = sorted(
            records
                .clone()
                .flat_map(|r| r.itl_ms.iter().map(|&gap| f64::from(gap))),
        );
        let e2e = sorted(records.map(|r| r.e2e_ms / 1e3));
        let ratio = |a: u64| {
            if prompt == 0 {
                0.0
            } else {
                a as f64 / prompt as f64
            }
        };
        Self {
            requests,
            hit_rate: ratio(cached),
            ttft_mean_s: (!ttft.is_empty()).then(|| ttft.iter().sum::<f64>() / ttft.len() as f64),
            ttft_p50_s: percentile(&ttft, 50.0),
            ttft_p90_s: percentile(&ttft, 90.0),
            ttft_p99_s: percentile(&ttft, 99.0),
            tpot_p50_ms: percentile(&tpot, 50.0),
            tpot_p99_ms: percentile(&tpot, 99.0),
            itl_p50_ms: percentile(&itl, 50.0),
            itl_p90_ms: percentile(&itl, 90.0),
            itl_p99_ms: percentile(&itl, 99.0),
            e2e_p99_s: percentile(&e2e, 99.0),
            wasted_prefill: missed.map(ratio),
            preemptions,
        }
    }
}

/// One stage of one policy.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageSummary {
    pub label: String,
    pub offered_qps: f64,
    pub measured: bool,
    #[serde(flatten)]
    pub figures: Figures,
    /// Output tokens generated during the stage's window, per second.
    pub output_tokens_per_s: f64,
    /// Mean over scrapes of max / mean in-flight requests per pod (1 = even).
    pub balance: Option<f64>,
}

/// One policy over one segment, measured stages only.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    pub policy: String,
    #[serde(flatten)]
    pub figures: Figures,
    /// Hit rate as a fraction of the oracle's on the same segment.
    pub hit_vs_oracle: Option<f64>,
    /// Hit rate as a fraction of the pooled-cache ceiling.
    pub hit_vs_ceiling: Option<f64>,
    pub peak_output_tokens_per_s: f64,
    /// Highest offered QPS up to which every measured stage kept TTFT p90 under the SLO.
    pub knee_qps: Option<f64>,
    /// Output throughput at the knee stage.
    pub knee_output_tokens_per_s: Option<f64>,
    /// The SLO held on every measured stage: the knee is at least the top of the ladder.
    pub knee_at_top: bool,
    pub balance: Option<f64>,
    pub pod_requests: Vec<u64>,
    pub failed: u64,
    pub decision_p50_us: Option<f64>,
    pub decision_p99_us: Option<f64>,
    pub event_batches: u64,
    pub event_batches_lost: u64,
    pub oracle_mismatches: u64,
    pub adapter_loads: u64,
    /// Gateway replicas, and how often another replica would have picked the same pod.
    pub replicas: usize,
    pub same_pick_rate: Option<f64>,
    pub index_blocks: u64,
    pub index_bytes: usize,
    pub span_s: f64,
    pub wall_s: f64,
}

/// Per-stage figures of a run.
pub fn stage_summaries(stages: &[Stage], run: &RunData) -> Vec<StageSummary> {
    stages
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let seconds = ((stage.end_ms - stage.start_ms) / 1e3).max(1e-9);
            let tokens = run.stage_output_tokens.get(i).copied().unwrap_or(0);
            let balance = run
                .stage_balance
                .get(i)
                .and_then(|&(sum, n)| (n > 0).then(|| sum / f64::from(n)));
            StageSummary {
                label: stage.label.clone(),
                offered_qps: stage.offered_qps,
                measured: stage.measured,
                figures: Figures::of(run.records.iter().filter(|r| r.stage == index)),
                output_tokens_per_s: tokens as f64 / seconds,
                balance,
            }
        })
        .collect()
}

/// The policy-level figures of a run, given its stage summaries.
pub fn policy_summary(
    policy: &str,
    stages: &[Stage],
    stage_summaries: &[StageSummary],
    run: &RunData,
    slo_ttft_p90_s: f64,
) -> PolicySummary {
    let measured: Vec<bool> = stages.iter().map(|s| s.measured).collect();
    let figures = Figures::of(
        run.records
            .iter()
            .filter(|r| measured.get(r.stage as usize).copied().unwrap_or(false)),
    );
    let measured_stages: Vec<&StageSummary> =
        stage_summaries.iter().filter(|s| s.measured).collect();
    let peak_output_tokens_per_s = measured_stages
        .iter()
        .map(|s| s.output_tokens_per_s)
        .fold(0.0, f64::max);
    let (knee, knee_at_top) = knee(&measured_stages, slo_ttft_p90_s);
    let balances: Vec<f64> = measured_stages.iter().filter_map(|s| s.balance).collect();
    let decisions = sorted(run.decision_us.iter().copied());
    PolicySummary {
        policy: policy.to_string(),
        figures,
        hit_vs_oracle: None,
        hit_vs_ceiling: None,
        peak_output_tokens_per_s,
        knee_qps: knee.map(|s| s.offered_qps),
        knee_output_tokens_per_s: knee.map(|s| s.output_tokens_per_s),
        knee_at_top,
        balance: (!balances.is_empty())
            .then(|| balances.iter().sum::<f64>() / balances.len() as f64),
        pod_requests: run.pod_requests.clone(),
        failed: run.failed,
        decision_p50_us: percentile(&decisions, 50.0),
        decision_p99_us: percentile(&decisions, 99.0),
        event_batches: run.event_batches,
        event_batches_lost: run.event_batches_lost,
        oracle_mismatches: run.oracle_mismatches,
        adapter_loads: run.adapter_loads,
        replicas: run.replicas.max(1),
        same_pick_rate: (run.same_pick.1 > 0)
            .then(|| run.same_pick.0 as f64 / run.same_pick.1 as f64),
        index_blocks: run.index_blocks,
        index_bytes: run.index_bytes,
        span_s: run.span_s,
        wall_s: run.wall_s,
    }
}

/// The highest-load stage such that it and every lower-load stage kept TTFT p90 under
/// the SLO; and whether no stage broke it.
fn knee<'a>(stages: &[&'a StageSummary], slo_s: f64) -> (Option<&'a StageSummary>, bool) {
    let mut by_load: Vec<&StageSummary> = stages.to_vec();
    by_load.sort_by(|a, b| a.offered_qps.total_cmp(&b.offered_qps));
    let mut best = None;
    for stage in &by_load {
        match stage.figures.ttft_p90_s {
            Some(p90) if p90 < slo_s => best = Some(*stage),
            None => continue,
            Some(_) => return (best, false),
        }
    }
    (best, best.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 90.0), Some(9.0));
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    fn stage(qps: f64, p90: Option<f64>) -> StageSummary {
        StageSummary {
            label: String::new(),
            offered_qps: qps,
            measured: true,
            figures: Figures {
                ttft_p90_s: p90,
                ..Figures::default()
            },
            output_tokens_per_s: qps * 100.0,
            balance: None,
        }
    }

    #[test]
    fn knee_is_the_last_stage_before_the_first_miss() {
        let stages = [
            stage(10.0, Some(0.5)),
            stage(3.0, Some(0.4)),
            stage(20.0, Some(2.5)),
            stage(30.0, Some(1.0)),
        ];
        let refs: Vec<&StageSummary> = stages.iter().collect();
        let (knee, top) = knee(&refs, 2.0);
        assert_eq!(knee.map(|s| s.offered_qps), Some(10.0));
        assert!(!top);
        let (knee, top) = knee_of(&[stage(3.0, Some(0.1)), stage(5.0, Some(0.2))]);
        assert_eq!(knee, Some(5.0));
        assert!(top);
        let (knee, top) = knee_of(&[stage(3.0, Some(3.0))]);
        assert_eq!(knee, None);
        assert!(!top);
    }

    fn knee_of(stages: &[StageSummary]) -> (Option<f64>, bool) {
        let refs: Vec<&StageSummary> = stages.iter().collect();
        let (k, top) = knee(&refs, 2.0);
        (k.map(|s| s.offered_qps), top)
    }
}
