//! `ttft` (scorer): estimated time to first token per pod, which weighs cache hits and
//! queueing in one unit.
//!
//! `ttft = baseLatency + (uncached prefill tokens queued on the pod + this request's
//! uncached tokens) / prefill rate`. The request's uncached tokens use the
//! `cached_blocks` that cache scorers listed *before* this one in the profile set.
//! Score = fastest estimate / this estimate (1 for the fastest).
//!
//! The prefill rate is learned online per pod in `completed`: a request's first token
//! arrives once the pod has prefilled the work queued ahead of it plus its own
//! uncached prompt, so each sample is that work / (TTFT − baseLatency), folded into an
//! EWMA stored on the pod (so every profile and `/debug` see the same rate). Until a
//! pod has samples, `priorTokensPerSecond` stands in.

use std::sync::Arc;

use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, RequestOutcome, SchedulingRequest,
    Scorer,
};

pub const NAME: &str = "ttft";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    /// Prefill rate assumed for a pod with no samples yet.
    prior_tokens_per_second: f64,
    /// Fixed per-request latency (network, scheduling, first decode step).
    base_latency_ms: f64,
    /// EWMA weight of a new sample.
    ewma_alpha: f64,
    /// Samples with less prefill work than this are dominated by fixed overheads and skipped.
    min_sample_tokens: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            prior_tokens_per_second: 16_000.0,
            base_latency_ms: 50.0,
            ewma_alpha: 0.1,
            min_sample_tokens: 256,
        }
    }
}

/// A single sample may move the estimate by at most this factor before the EWMA
/// weight applies: one stalled or oddly fast request must not swing routing.
const SAMPLE_CLAMP: f64 = 4.0;

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    let bad = |message: &str| Err(PluginError::params(NAME, message));
    if !(p.prior_tokens_per_second.is_finite() && p.prior_tokens_per_second > 0.0) {
        return bad("priorTokensPerSecond must be > 0");
    }
    if !(p.base_latency_ms.is_finite() && p.base_latency_ms >= 0.0) {
        return bad("baseLatencyMs must be ≥ 0");
    }
    if !(p.ewma_alpha > 0.0 && p.ewma_alpha <= 1.0) {
        return bad("ewmaAlpha must be in (0, 1]");
    }
    Ok(Arc::new(Ttft {
        prior_rate: p.prior_tokens_per_second,
        base_latency_s: p.base_latency_ms / 1_000.0,
        alpha: p.ewma_alpha,
        min_sample_tokens: p.min_sample_tokens as f64,
    }))
}

pub struct Ttft {
    prior_rate: f64,
    base_latency_s: f64,
    alpha: f64,
    min_sample_tokens: f64,
}

impl Scorer for Ttft {
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &mut [Candidate], scores: &mut [f64]) {
        let mut fastest = f64::INFINITY;
        for (cand, estimate) in candidates.iter().zip(scores.iter_mut()) {
            let rate = cand.pod.prefill_rate().unwrap_or(self.prior_rate);
            let work =
                cand.pod.uncached_tokens_in_flight() as f64 + cand.uncached_tokens(req) as f64;
            *estimate = self.base_latency_s + work / rate;
            fastest = fastest.min(*estimate);
        }
        for estimate in scores.iter_mut() {
            *estimate = if *estimate <= fastest {
                1.0
            } else {
                fastest / *estimate
            };
        }
    }
}

impl Plugin for Ttft {
    fn name(&self) -> &'static str {
        NAME
    }

    fn completed(&self, outcome: &RequestOutcome) {
        let Some(ttft) = outcome.time_to_first_token else {
            return;
        };
        if !outcome.success {
            return;
        }
        let cached = outcome
            .actual_cached_tokens
            .unwrap_or(outcome.predicted_cached_tokens);
        let work = outcome.queued_uncached_tokens as f64
            + outcome.prompt_tokens.saturating_sub(cached) as f64;
        let busy = ttft.as_secs_f64() - self.base_latency_s;
        if work < self.min_sample_tokens || busy <= 0.0 {
            return;
        }
        let current = outcome.pod.prefill_rate().unwrap_or(self.prior_rate);
        let sample = (work / busy).clamp(current / SAMPLE_CLAMP, current * SAMPLE_CLAMP);
        outcome
            .pod
            .set_prefill_rate(current + self.alpha * (sample - current));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::plugins::testing::{candidates, context, params, request, scores, BLOCK_SIZE};

    fn plugin(yaml: Option<&str>) -> Arc<dyn Scorer> {
        build(yaml.map(params).as_ref(), &context()).expect("valid params")
    }

    fn outcome(cand: &Candidate, prompt: usize, queued: u64, ttft_ms: u64) -> RequestOutcome {
        RequestOutcome {
            pod: Arc::clone(&cand.pod),
            prompt_tokens: prompt,
            queued_uncached_tokens: queued,
            predicted_cached_tokens: 0,
            actual_cached_tokens: Some(0),
            time_to_first_token: Some(Duration::from_millis(ttft_ms)),
            success: true,
        }
    }

    #[test]
    fn cached_prefix_and_queue_trade_off_in_time() {
        let ttft = plugin(Some("{priorTokensPerSecond: 1000, baseLatencyMs: 0}"));
        let blocks: Vec<u64> = (0..100).collect();
        let req = request(&blocks); // 1,600 tokens
        let mut cands = candidates(3);
        // Pod 0 holds 75% of the prompt but has 800 tokens queued: 400 + 800 = 1.2 s.
        cands[0].cached_blocks = 75;
        let _queued = cands[0].pod.begin_request(800);
        // Pod 1 is idle and cold: 1.6 s. Pod 2 holds half and is idle: 0.8 s.
        cands[2].cached_blocks = 50;
        let got = scores(ttft.as_ref(), &req, &mut cands);
        assert_eq!(got, vec![0.8 / 1.2, 0.5, 1.0]);
        assert_eq!(req.prompt_tokens, 100 * BLOCK_SIZE);
    }

    #[test]
    fn fully_cached_idle_pods_tie_at_one() {
        let ttft = plugin(Some("{baseLatencyMs: 0}"));
        let blocks = [1, 2];
        let mut cands = candidates(2);
        cands[0].cached_blocks = 2;
        cands[1].cached_blocks = 2;
        assert_eq!(
            scores(ttft.as_ref(), &request(&blocks), &mut cands),
            vec![1.0, 1.0]
        );
    }

    #[test]
    fn learns_the_prefill_rate_from_outcomes() {
        let ttft = plugin(Some(
            "{priorTokensPerSecond: 10000, baseLatencyMs: 100, ewmaAlpha: 0.5}",
        ));
        let cands = candidates(2);
        // 2,000 queued + 4,000 own tokens in 0.6 s − 0.1 s base = 12,000 tokens/s.
        let rate = |c: &Candidate| c.pod.prefill_rate().unwrap_or(0.0);
        ttft.completed(&outcome(&cands[0], 4_000, 2_000, 600));
        assert!((rate(&cands[0]) - 11_000.0).abs() < 1e-6);
        ttft.completed(&outcome(&cands[0], 4_000, 2_000, 600));
        assert!((rate(&cands[0]) - 11_500.0).abs() < 1e-6);

        // The learned rate feeds the estimate: pod 0 is faster than the prior.
        let blocks: Vec<u64> = (0..64).collect();
        let mut both = cands.clone();
        let got = scores(ttft.as_ref(), &request(&blocks), &mut both);
        assert_eq!(got[0], 1.0);
        assert!(got[1] < 1.0);
    }

    #[test]
    fn skips_uninformative_samples_and_clamps_outliers() {
        let ttft = plugin(Some(
            "{priorTokensPerSecond: 10000, baseLatencyMs: 100, ewmaAlpha: 1}",
        ));
        let cands = candidates(1);
        // Too little work, inside the base latency, failed, or without a TTFT.
        ttft.completed(&outcome(&cands[0], 100, 0, 500));
        ttft.completed(&outcome(&cands[0], 4_000, 0, 90));
        let mut failed = outcome(&cands[0], 4_000, 0, 500);
        failed.success = false;
        ttft.completed(&failed);
        let mut no_ttft = outcome(&cands[0], 4_000, 0, 500);
        no_ttft.time_to_first_token = None;
        ttft.completed(&no_ttft);
        assert_eq!(cands[0].pod.prefill_rate(), None);

        // 4,000 tokens in 1 ms of busy time would be 4M tokens/s: clamped to 4× the prior.
        ttft.completed(&outcome(&cands[0], 4_000, 0, 101));
        assert_eq!(cands[0].pod.prefill_rate(), Some(40_000.0));
    }

    #[test]
    fn uses_reported_cached_tokens_over_the_prediction() {
        let ttft = plugin(Some(
            "{priorTokensPerSecond: 10000, baseLatencyMs: 0, ewmaAlpha: 1}",
        ));
        let cands = candidates(1);
        let mut done = outcome(&cands[0], 10_000, 0, 1_000);
        done.predicted_cached_tokens = 8_000;
        done.actual_cached_tokens = Some(2_000);
        ttft.completed(&done);
        assert_eq!(cands[0].pod.prefill_rate(), Some(8_000.0));
    }

    #[test]
    fn params_are_strict() {
        for bad in [
            "{priorTokensPerSecond: 0}",
            "{ewmaAlpha: 0}",
            "{ewmaAlpha: 2}",
            "{baseLatencyMs: -5}",
            "{prior: 1}",
        ] {
            assert!(matches!(
                build(Some(&params(bad)), &context()),
                Err(PluginError::Params { .. })
            ));
        }
    }
}
