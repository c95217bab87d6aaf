//! `round-robin` (picker): ignores scores and rotates through the candidates, the
//! Kubernetes Service baseline. The rest of the ranking (retry fallbacks) continues
//! the rotation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use super::{
    parse_params, Candidate, Picker, Plugin, PluginContext, PluginError, SchedulingRequest,
};

pub const NAME: &str = "round-robin";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Params {}

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Picker>, PluginError> {
    let Params {} = parse_params(NAME, params)?;
    Ok(Arc::new(RoundRobin {
        next: AtomicUsize::new(0),
    }))
}

pub struct RoundRobin {
    next: AtomicUsize,
}

impl Plugin for RoundRobin {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Picker for RoundRobin {
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
        let n = candidates.len();
        order.clear();
        if n == 0 {
            return;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        order.extend((0..n).map(|k| (start + k) % n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{candidates, context, request};

    #[test]
    fn rotates_and_ranks_every_candidate() {
        let rr = build(None, &context()).unwrap();
        let cands = candidates(3);
        let totals = [0.0, 9.0, 0.0];
        let mut firsts = Vec::new();
        let mut order = Vec::new();
        for _ in 0..6 {
            rr.pick(&request(&[1]), &cands, &totals, &mut order);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2]);
            firsts.push(order[0]);
        }
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        rr.pick(&request(&[1]), &[], &[], &mut order);
        assert!(order.is_empty());
    }
}
