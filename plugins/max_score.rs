//! `max-score` (picker): ranks candidates by weighted total, best first.
//!
//! Totals within `epsilon` of the best of their group tie, and ties are broken by
//! rendezvous hashing: each tied pod gets `xxh3(pod stable key, seed = request key)`
//! and the highest wins. The request key is the request's first block key (or a hash
//! of its id when it has no full block), and the pod key is its discovery key, so every
//! kvgate replica breaks a tie the same way without coordinating, and requests that
//! share a first block land together when nothing else tells pods apart.
//!
//! Epsilon only absorbs floating-point noise: any real score difference (a load
//! difference included) outranks the tie-break, so cold requests still spread by load.

use std::sync::Arc;

use serde::Deserialize;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{
    parse_params, Candidate, Picker, Plugin, PluginContext, PluginError, SchedulingRequest,
};

pub const NAME: &str = "max-score";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    epsilon: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self { epsilon: 1e-9 }
    }
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    _ctx: &PluginContext,
) -> Result<Arc<dyn Picker>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    if !(p.epsilon.is_finite() && p.epsilon >= 0.0) {
        return Err(PluginError::params(NAME, "epsilon must be finite and ≥ 0"));
    }
    Ok(Arc::new(MaxScore { epsilon: p.epsilon }))
}

pub struct MaxScore {
    epsilon: f64,
}

/// The request's side of the rendezvous hash.
fn request_key(req: &SchedulingRequest<'_>) -> u64 {
    req.block_keys
        .first()
        .copied()
        .unwrap_or_else(|| xxh3_64(req.request_id.as_bytes()))
}

fn rendezvous_weight(request_key: u64, cand: &Candidate) -> u64 {
    xxh3_64_with_seed(cand.pod.endpoint.key.as_bytes(), request_key)
}

impl Plugin for MaxScore {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Picker for MaxScore {
    fn pick(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[Candidate],
        totals: &[f64],
        order: &mut Vec<usize>,
    ) {
        order.clear();
        order.extend((0..candidates.len()).filter(|&i| i < totals.len()));
        let total = |i: usize| totals.get(i).copied().unwrap_or(f64::NEG_INFINITY);
        order.sort_by(|&a, &b| total(b).total_cmp(&total(a)));

        let key = request_key(req);
        let mut start = 0;
        while start < order.len() {
            let best = total(order[start]);
            let tied = order[start..]
                .iter()
                .take_while(|&&i| best - total(i) <= self.epsilon)
                .count();
            if tied > 1 {
                order[start..start + tied].sort_by(|&a, &b| {
                    let (ca, cb) = (&candidates[a], &candidates[b]);
                    rendezvous_weight(key, cb)
                        .cmp(&rendezvous_weight(key, ca))
                        .then_with(|| ca.pod.endpoint.key.cmp(&cb.pod.endpoint.key))
                });
            }
            start += tied.max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::plugins::testing::{candidates, endpoint, request};
    use crate::pods::Pod;

    impl MaxScore {
        fn ranked(
            &self,
            req: &SchedulingRequest<'_>,
            cands: &[Candidate],
            totals: &[f64],
        ) -> Vec<usize> {
            let mut order = Vec::new();
            self.pick(req, cands, totals, &mut order);
            order
        }
    }

    #[test]
    fn ranks_by_total() {
        let picker = MaxScore { epsilon: 1e-9 };
        let cands = candidates(4);
        let got = picker.ranked(&request(&[7]), &cands, &[0.2, 1.5, 0.9, 1.2]);
        assert_eq!(got, vec![1, 3, 2, 0]);
    }

    #[test]
    fn ties_break_by_pod_key_not_by_position_or_id() {
        let picker = MaxScore { epsilon: 1e-9 };
        let blocks = [42u64];
        let req = request(&blocks);
        let cands = candidates(5);
        let winner = &cands[picker.ranked(&req, &cands, &[1.0; 5])[0]]
            .pod
            .endpoint
            .key
            .clone();

        // Another replica: other ids, other discovery order.
        let other: Vec<Candidate> = (0..5u32)
            .rev()
            .map(|i| Candidate::new(Arc::new(Pod::new(100 + i, endpoint(i)))))
            .collect();
        let again = &other[picker.ranked(&req, &other, &[1.0; 5])[0]]
            .pod
            .endpoint
            .key;
        assert_eq!(winner, again);
    }

    #[test]
    fn tie_breaks_spread_different_requests() {
        let picker = MaxScore { epsilon: 1e-9 };
        let cands = candidates(4);
        let mut wins = [0usize; 4];
        for key in 0..400u64 {
            wins[picker.ranked(&request(&[key]), &cands, &[0.5; 4])[0]] += 1;
        }
        assert!(wins.iter().all(|&w| (60..=140).contains(&w)), "{wins:?}");
    }

    #[test]
    fn a_real_difference_beats_the_tie_break() {
        let picker = MaxScore { epsilon: 1e-9 };
        let cands = candidates(2);
        for key in 0..50u64 {
            let blocks = [key];
            let req = request(&blocks);
            assert_eq!(picker.ranked(&req, &cands, &[1.0, 1.0 + 1e-6])[0], 1);
            assert_eq!(picker.ranked(&req, &cands, &[1.0 + 1e-6, 1.0])[0], 0);
        }
    }

    #[test]
    fn requests_without_blocks_use_their_id() {
        let picker = MaxScore { epsilon: 1e-9 };
        let cands = candidates(8);
        let firsts: std::collections::HashSet<usize> = (0..64)
            .map(|i| {
                let id = format!("req-{i}");
                let mut req = request(&[]);
                req.request_id = &id;
                picker.ranked(&req, &cands, &[0.0; 8])[0]
            })
            .collect();
        assert!(firsts.len() > 1);
    }
}
