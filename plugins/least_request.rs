//! `least-request` (scorer): fewest requests in flight from this router wins — the
//! classic load-only baseline. Min-max normalized: the least busy pod scores 1, the
//! busiest 0, and all score 1 when they are equally busy.

use std::sync::Arc;

use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, SchedulingRequest, Scorer,
};

pub const NAME: &str = "least-request";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Params {}

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let Params {} = parse_params(NAME, params)?;
    Ok(Arc::new(LeastRequest))
}

pub struct LeastRequest;

impl Plugin for LeastRequest {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Scorer for LeastRequest {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        candidates: &mut [Candidate],
        scores: &mut [f64],
    ) {
        for (cand, score) in candidates.iter().zip(scores.iter_mut()) {
            *score = f64::from(cand.pod.in_flight());
        }
        let (min, max) = scores.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
        for score in scores.iter_mut() {
            *score = if max > min {
                (max - *score) / (max - min)
            } else {
                1.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{candidates, context, request, scores};

    #[test]
    fn fewest_in_flight_wins() {
        let plugin = build(None, &context()).unwrap();
        let mut cands = candidates(3);
        assert_eq!(
            scores(plugin.as_ref(), &request(&[1]), &mut cands),
            vec![1.0; 3]
        );
        let _a: Vec<_> = (0..4).map(|_| cands[0].pod.begin_request(0)).collect();
        let _b: Vec<_> = (0..2).map(|_| cands[1].pod.begin_request(0)).collect();
        assert_eq!(
            scores(plugin.as_ref(), &request(&[1]), &mut cands),
            vec![0.0, 0.5, 1.0]
        );
    }
}
