//! `load` (scorer): how busy each pod is, 1 = least loaded.
//!
//! Four signals, each weighted: requests on the pod (the router's own count, raised to
//! the last scrape's running + waiting plus what it routed since when that is higher, so
//! other kvgate replicas' traffic shows), uncached prompt tokens in flight (the router's
//! own accounting: immediate, so a burst is seen as it is routed), and vLLM's scraped
//! waiting queue and KV-cache usage (they lag by a scrape period).
//!
//! Each signal is scored relative to the other candidates:
//! `1 − (m − min) / max(max, scale)`. The least loaded pod scores 1; when every pod is
//! idle all score 1. The `scale` floor keeps small absolute differences small (one
//! request more than an idle pod is not "fully loaded"), and under heavy load a
//! difference counts in proportion to the load itself.

use std::sync::Arc;

use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, SchedulingRequest, Scorer,
};
use crate::pods::Pod;

pub const NAME: &str = "load";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    in_flight_weight: f64,
    uncached_tokens_weight: f64,
    waiting_weight: f64,
    kv_usage_weight: f64,
    /// Requests in flight below which differences count proportionally less.
    in_flight_scale: f64,
    /// Same for uncached prompt tokens in flight.
    uncached_tokens_scale: f64,
    /// Same for the scraped waiting queue.
    waiting_scale: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            in_flight_weight: 1.0,
            uncached_tokens_weight: 1.0,
            waiting_weight: 1.0,
            kv_usage_weight: 1.0,
            in_flight_scale: 8.0,
            uncached_tokens_scale: 8_192.0,
            waiting_scale: 4.0,
        }
    }
}

const SIGNALS: usize = 4;

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    let bad = |message: &str| Err(PluginError::params(NAME, message));
    let weights = [
        p.in_flight_weight,
        p.uncached_tokens_weight,
        p.waiting_weight,
        p.kv_usage_weight,
    ];
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return bad("weights must be finite and ≥ 0");
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return bad("at least one weight must be > 0");
    }
    // KV usage is already a fraction of capacity, so its scale is 1.
    let scales = [
        p.in_flight_scale,
        p.uncached_tokens_scale,
        p.waiting_scale,
        1.0,
    ];
    if scales.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return bad("scales must be finite and > 0");
    }
    Ok(Arc::new(Load {
        weights: weights.map(|w| w / total),
        scales,
    }))
}

pub struct Load {
    /// Normalized to sum to 1.
    weights: [f64; SIGNALS],
    scales: [f64; SIGNALS],
}

fn signals(pod: &Pod) -> [f64; SIGNALS] {
    let scraped = pod.scraped();
    [
        pod.estimated_requests(),
        pod.uncached_tokens_in_flight() as f64,
        scraped.waiting.max(0.0),
        scraped.kv_usage.clamp(0.0, 1.0),
    ]
}

impl Plugin for Load {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Scorer for Load {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        candidates: &mut [Candidate],
        scores: &mut [f64],
    ) {
        // One snapshot per pod, so min/max and the scores see the same values.
        let loads: Vec<[f64; SIGNALS]> = candidates.iter().map(|c| signals(&c.pod)).collect();
        let mut min = [f64::INFINITY; SIGNALS];
        let mut max = [0.0f64; SIGNALS];
        for load in &loads {
            for s in 0..SIGNALS {
                min[s] = min[s].min(load[s]);
                max[s] = max[s].max(load[s]);
            }
        }
        for (load, score) in loads.iter().zip(scores.iter_mut()) {
            *score = (0..SIGNALS)
                .map(|s| {
                    let relative = (load[s] - min[s]) / max[s].max(self.scales[s]);
                    self.weights[s] * (1.0 - relative)
                })
                .sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{candidates, context, params, request, scores};
    use crate::pods::ScrapedLoad;

    fn plugin(yaml: Option<&str>) -> Arc<dyn Scorer> {
        build(yaml.map(params).as_ref(), &context()).expect("valid params")
    }

    #[test]
    fn idle_pods_all_score_one() {
        let mut cands = candidates(3);
        let got = scores(plugin(None).as_ref(), &request(&[1]), &mut cands);
        assert_eq!(got, vec![1.0; 3]);
    }

    #[test]
    fn least_loaded_scores_one_and_small_differences_stay_small() {
        let mut cands = candidates(3);
        let only_requests = plugin(Some(
            "{uncachedTokensWeight: 0, waitingWeight: 0, kvUsageWeight: 0}",
        ));
        let _a = cands[0].pod.begin_request(0);
        let _b: Vec<_> = (0..16).map(|_| cands[2].pod.begin_request(0)).collect();
        let got = scores(only_requests.as_ref(), &request(&[1]), &mut cands);
        assert_eq!(got, vec![1.0 - 1.0 / 16.0, 1.0, 0.0]);

        let mut two = candidates(2);
        let _c = two[0].pod.begin_request(0);
        let got = scores(only_requests.as_ref(), &request(&[1]), &mut two);
        assert_eq!(got, vec![1.0 - 1.0 / 8.0, 1.0]);
    }

    #[test]
    fn combines_router_accounting_and_scraped_metrics() {
        let mut cands = candidates(2);
        let _a = cands[0].pod.begin_request(8_192);
        cands[1].pod.set_scraped(ScrapedLoad {
            running: 3.0,
            waiting: 4.0,
            kv_usage: 0.5,
        });
        let got = scores(plugin(None).as_ref(), &request(&[1]), &mut cands);
        // Pod 1 runs 7 requests routed by other replicas (3 running + 4 waiting) against
        // pod 0's 1: requests (7 − 1) / 8 and waiting 1 and KV 0.5 below the best for
        // pod 1; tokens 1 below the best for pod 0.
        assert!((got[0] - (1.0 - 1.0 / 4.0)).abs() < 1e-12);
        assert!((got[1] - (1.0 - (0.75 + 1.0 + 0.5) / 4.0)).abs() < 1e-12);
        assert!(got[0] > got[1]);
    }

    #[test]
    fn scraped_requests_move_with_the_routers_own_since_the_scrape() {
        let pod = candidates(1).remove(0).pod;
        let first = pod.begin_request(0);
        assert_eq!(pod.estimated_requests(), 1.0);
        pod.set_scraped(ScrapedLoad {
            running: 5.0,
            waiting: 1.0,
            kv_usage: 0.0,
        });
        assert_eq!(pod.estimated_requests(), 6.0, "others' traffic shows");
        let second = pod.begin_request(0);
        assert_eq!(pod.estimated_requests(), 7.0);
        drop(first);
        drop(second);
        assert_eq!(pod.estimated_requests(), 5.0);
        pod.set_scraped(ScrapedLoad::default());
        assert_eq!(
            pod.estimated_requests(),
            0.0,
            "a fresh scrape replaces the guess"
        );
    }

    #[test]
    fn params_are_strict() {
        for bad in [
            "{inFlightWeight: 0, uncachedTokensWeight: 0, waitingWeight: 0, kvUsageWeight: 0}",
            "{waitingScale: 0}",
            "{inFlightWeight: -1}",
            "{queueWeight: 1}",
        ] {
            assert!(matches!(
                build(Some(&params(bad)), &context()),
                Err(PluginError::Params { .. })
            ));
        }
    }
}
