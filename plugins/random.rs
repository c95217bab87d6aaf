//! `random` (picker): ignores scores and ranks the candidates in a random order from
//! a seeded generator, so runs (and the benchmark's baselines) are reproducible.

use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;

use super::{
    parse_params, Candidate, Picker, Plugin, PluginContext, PluginError, SchedulingRequest,
};

pub const NAME: &str = "random";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    seed: u64,
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Picker>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    Ok(Arc::new(Random {
        rng: Mutex::new(StdRng::seed_from_u64(p.seed)),
    }))
}

pub struct Random {
    rng: Mutex<StdRng>,
}

impl Plugin for Random {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Picker for Random {
    fn pick_moves_state(&self) -> bool {
        true
    }

    fn pick(
        &self,
        _req: &SchedulingRequest<'_>,
        candidates: &[Candidate],
        _totals: &[f64],
        order: &mut Vec<usize>,
    ) {
        order.clear();
        order.extend(0..candidates.len());
        order.shuffle(&mut *self.rng.lock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{candidates, context, params, request};

    fn firsts(seed: u64, cands: &[Candidate]) -> Vec<usize> {
        let random = build(Some(&params(&format!("{{seed: {seed}}}"))), &context()).unwrap();
        let mut order = Vec::new();
        (0..200)
            .map(|_| {
                random.pick(&request(&[1]), cands, &[0.0; 4], &mut order);
                assert_eq!(order.len(), cands.len());
                order[0]
            })
            .collect()
    }

    #[test]
    fn seeded_and_spread() {
        let cands = candidates(4);
        let a = firsts(7, &cands);
        assert_eq!(a, firsts(7, &cands), "same seed, same picks");
        assert_ne!(a, firsts(8, &cands));
        for pod in 0..4 {
            let hits = a.iter().filter(|&&p| p == pod).count();
            assert!(
                (25..=75).contains(&hits),
                "pod {pod} picked {hits}/200 times"
            );
        }
    }
}
