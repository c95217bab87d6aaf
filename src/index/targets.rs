//! Index addressing: which block-index ids hold a pod's blocks. Ingestion writes it as
//! publishers appear (one id per data-parallel rank, ids adopted from publishers seen before
//! discovery); the request path reads it, lock-free, to credit a pod with its best id's prefix.

use std::collections::HashMap;

use arc_swap::ArcSwap;

use super::{PodId, PodPrefix, PrefixMatch};

/// Which block-index ids hold a pod's blocks when that is not simply its own
/// id: one per data-parallel rank above 0 (each rank has its own cache and
/// sequence), and the ids of publishers tracked before discovery listed the pod.
/// Read on the request path without locks.
#[derive(Debug, Default)]
pub struct IndexTargets {
    map: ArcSwap<HashMap<PodId, Box<[PodId]>>>,
}

impl IndexTargets {
    /// The index ids of `pod`'s blocks; `None` when it is just `pod`.
    pub fn of(&self, pod: PodId) -> Option<Box<[PodId]>> {
        self.map.load().get(&pod).cloned()
    }

    /// The pod's best prefix over its targets (the longest any-tier run, GPU
    /// run as tie-break). Equals `found.get(pod)` for a pod without extra targets.
    pub fn best_prefix(&self, found: &PrefixMatch, pod: PodId) -> PodPrefix {
        match self.map.load().get(&pod) {
            None => found.get(pod),
            Some(targets) => targets
                .iter()
                .map(|&target| found.get(target))
                .max_by_key(|p| (p.any_blocks, p.gpu_blocks))
                .unwrap_or_default(),
        }
    }

    /// Records the index ids holding `pod`'s blocks (its own id alone: no entry).
    pub fn set(&self, pod: PodId, targets: &[PodId]) {
        let identity = targets.is_empty() || targets == [pod];
        self.map.rcu(|current| {
            let mut next = HashMap::clone(current);
            if identity {
                next.remove(&pod);
            } else {
                next.insert(pod, targets.into());
            }
            next
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{BlockIndex, IndexConfig, Tier};

    #[test]
    fn a_pod_is_credited_with_its_best_target() {
        let index = BlockIndex::new(IndexConfig {
            budget_bytes: 1 << 20,
            shards: 1,
        });
        let blocks = [1, 2, 3, 4];
        index.store(5, 0, Tier::Gpu, &blocks[..1]);
        index.store(6, 0, Tier::Gpu, &blocks[..3]);
        index.store(7, 0, Tier::Cpu, &blocks);
        let mut found = PrefixMatch::new();
        index.lookup(0, &blocks, &mut found);

        let targets = IndexTargets::default();
        assert_eq!(targets.of(5), None);
        assert_eq!(targets.best_prefix(&found, 5), found.get(5));
        targets.set(5, &[5, 6]);
        assert_eq!(targets.of(5).as_deref(), Some(&[5, 6][..]));
        assert_eq!(targets.best_prefix(&found, 5), found.get(6));
        // The longest run on any tier wins over a shorter one on the GPU.
        targets.set(5, &[5, 6, 7]);
        assert_eq!(targets.best_prefix(&found, 5), found.get(7));
        // Its own id alone is no entry at all.
        targets.set(5, &[5]);
        assert_eq!(targets.of(5), None);
    }
}
