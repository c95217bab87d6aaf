//! `kv-headroom` (scorer): room left in each pod's KV cache, as the block index sees it.
//!
//! Score = 1 − blocks the index holds for the pod / its capacity, clamped to [0, 1]; a
//! data-parallel pod scores the mean of its ranks. Capacity is `capacityBlocks`, or the
//! model's `podKvBlocks` (vLLM's `num_gpu_blocks`).
//!
//! **Why.** A prompt that no pod holds is placed by load alone, and at low load every pod
//! is idle: the tie-break then decides where a new prefix lives, and a hash can put five
//! prefixes on one pod and two on another. The crowded pod evicts its own prefixes
//! between their requests while the others keep room to spare, and which pods get
//! crowded changes with every deployment's pod names. Placing a new prefix where the
//! cache has room fills the pods evenly, so the fleet holds as many prefixes as it can,
//! and a pod that restarts (or joins) empty takes the prefixes nobody holds any more.
//! Once every pod's cache is full the score is 0 everywhere and changes nothing: vLLM
//! evicts its least recently used blocks, and kv-cache and load decide.
//!
//! The weight sets what room is worth against load: at 0.5, a pod whose cache is a
//! third emptier than another's outweighs a few requests in flight, but not a pod that
//! is really busy, and never a prefix the kv-cache scorer (weight 2) found cached on a
//! large part of the prompt.
//!
//! Only pods whose event stream is `Synced` or not yet heard from (`Unknown`: a new
//! process starts empty) are read from the index; an `Untrusted` pod's events do not
//! hash as kvgate does, its cache is unknown, and it scores 0 rather than attract every
//! new prefix to a cache kvgate cannot see.

use std::sync::Arc;

use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, SchedulingRequest, Scorer,
};
use crate::index::{BlockIndex, IndexTargets};
use crate::pods::{EventTrust, Pod};

pub const NAME: &str = "kv-headroom";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Params {
    /// Blocks one pod (one data-parallel rank) holds at most; the model's `podKvBlocks`
    /// when absent.
    capacity_blocks: Option<usize>,
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    let capacity = p.capacity_blocks.unwrap_or(ctx.pod_kv_blocks);
    if capacity == 0 {
        return Err(PluginError::params(NAME, "capacityBlocks must be > 0"));
    }
    Ok(Arc::new(KvHeadroom {
        index: Arc::clone(&ctx.index),
        targets: Arc::clone(&ctx.targets),
        capacity: capacity as f64,
    }))
}

pub struct KvHeadroom {
    index: Arc<BlockIndex>,
    targets: Arc<IndexTargets>,
    capacity: f64,
}

impl KvHeadroom {
    fn room(&self, pod: &Pod) -> f64 {
        if pod.trust() == EventTrust::Untrusted {
            return 0.0;
        }
        let free = |blocks: usize| (1.0 - blocks as f64 / self.capacity).clamp(0.0, 1.0);
        match self.targets.of(pod.id) {
            None => free(self.index.pod_block_count(pod.id)),
            Some(ranks) => {
                let sum: f64 = ranks
                    .iter()
                    .map(|&rank| free(self.index.pod_block_count(rank)))
                    .sum();
                sum / ranks.len().max(1) as f64
            }
        }
    }
}

impl Plugin for KvHeadroom {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl Scorer for KvHeadroom {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        candidates: &mut [Candidate],
        scores: &mut [f64],
    ) {
        for (cand, score) in candidates.iter().zip(scores.iter_mut()) {
            *score = self.room(&cand.pod);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Tier;
    use crate::plugins::testing::{candidates, context, params, request, scores};

    #[test]
    fn the_emptier_cache_scores_higher_and_a_full_one_zero() {
        let ctx = context();
        let plugin = build(Some(&params("{capacityBlocks: 100}")), &ctx).unwrap();
        let mut cands = candidates(3);
        let blocks: Vec<u64> = (0..150).collect();
        ctx.index
            .store(cands[0].pod.id, 0, Tier::Gpu, &blocks[..25]);
        ctx.index.store(cands[1].pod.id, 0, Tier::Gpu, &blocks);
        assert_eq!(
            scores(plugin.as_ref(), &request(&[1]), &mut cands),
            vec![0.75, 0.0, 1.0]
        );
    }

    #[test]
    fn an_untrusted_pod_has_no_room_to_show() {
        let ctx = context();
        let plugin = build(None, &ctx).unwrap();
        let mut cands = candidates(2);
        cands[0]
            .pod
            .set_trust(cands[0].pod.cache_epoch(), EventTrust::Untrusted);
        assert_eq!(
            scores(plugin.as_ref(), &request(&[1]), &mut cands),
            vec![0.0, 1.0]
        );
    }

    #[test]
    fn a_data_parallel_pod_scores_the_mean_of_its_ranks() {
        let ctx = context();
        let plugin = build(Some(&params("{capacityBlocks: 10}")), &ctx).unwrap();
        let mut cands = candidates(1);
        let pod = cands[0].pod.id;
        let rank = pod + 100;
        ctx.targets.set(pod, &[pod, rank]);
        let blocks: Vec<u64> = (0..10).collect();
        ctx.index.store(rank, 0, Tier::Gpu, &blocks);
        assert_eq!(
            scores(plugin.as_ref(), &request(&[1]), &mut cands),
            vec![0.5]
        );
    }

    #[test]
    fn a_zero_capacity_is_refused() {
        assert!(build(Some(&params("{capacityBlocks: 0}")), &context()).is_err());
    }
}
