//! Behaviour tests of the block index, and a model test against a plain map.

use super::registry::Registry;
use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// (scope, hash) → pod → tier bits (1 = GPU, 2 = CPU).
type Contents = BTreeMap<(ScopeId, u64), BTreeMap<PodId, u32>>;

impl BlockIndex {
    /// Checks every shard's invariants and returns what the index holds, by pod id.
    fn audit(&self) -> Contents {
        let st = self.registry.read();
        let mut contents = Contents::new();
        let mut bytes = 0;
        for shard in self.shards.iter() {
            let shard = shard.0.read();
            bytes += shard.bytes();
            for (key, holders) in shard.audit(&st) {
                let by_pod = holders
                    .into_iter()
                    .map(|(slot, tiers)| {
                        let pod = Registry::tag_pod(self.registry.tag(usize::from(slot)))
                            .expect("holders only of live pods");
                        (pod, tiers)
                    })
                    .collect();
                contents.insert(key, by_pod);
            }
        }
        let stats = self.stats();
        assert_eq!(stats.bytes, bytes);
        assert!(stats.bytes <= stats.budget_bytes);
        assert_eq!(stats.blocks as usize, contents.len());
        assert_eq!(
            stats.entries as usize,
            contents.values().map(BTreeMap::len).sum::<usize>()
        );
        contents
    }
}

fn index(budget_bytes: usize, shards: usize) -> BlockIndex {
    BlockIndex::with_seed(
        IndexConfig {
            budget_bytes,
            shards,
        },
        0x5EED,
    )
}

fn big() -> BlockIndex {
    index(64 << 20, 8)
}

fn lookup(index: &BlockIndex, scope: ScopeId, hashes: &[u64]) -> BTreeMap<PodId, (u32, u32)> {
    let mut out = PrefixMatch::new();
    index.lookup(scope, hashes, &mut out);
    let result: BTreeMap<_, _> = out
        .iter()
        .map(|(pod, p)| (pod, (p.gpu_blocks, p.any_blocks)))
        .collect();
    assert_eq!(result.len(), out.len(), "each pod once");
    let longest = result.values().map(|p| p.1).max().unwrap_or(0);
    assert_eq!(out.longest(), longest as usize);
    result
}

#[test]
fn prefix_counts_consecutive_blocks_from_the_first() {
    let index = big();
    let chain: Vec<u64> = (100..110).collect();
    index.store(1, 0, Tier::Gpu, &[100, 101, 103]);
    index.store(2, 0, Tier::Gpu, &chain[..5]);
    index.store(3, 0, Tier::Gpu, &chain[1..]);
    let result = lookup(&index, 0, &chain);
    assert_eq!(
        result,
        BTreeMap::from([(1, (2, 2)), (2, (5, 5))]),
        "pod 3 lacks block 0"
    );
    let mut out = PrefixMatch::new();
    index.lookup(0, &chain, &mut out);
    assert_eq!(
        out.get(1),
        PodPrefix {
            gpu_blocks: 2,
            any_blocks: 2
        }
    );
    assert_eq!(out.get(3), PodPrefix::default());
    assert_eq!(out.longest(), 5);
    index.lookup(0, &[7, 8], &mut out);
    assert!(
        out.is_empty() && out.longest() == 0,
        "a reused match is reset"
    );
    index.lookup(0, &[], &mut out);
    assert!(out.is_empty());
    index.store(2, 0, Tier::Gpu, &chain[5..]);
    assert_eq!(lookup(&index, 0, &chain)[&2], (10, 10), "a full match");
}

#[test]
fn gpu_and_any_tier_prefixes() {
    let index = big();
    index.store(1, 0, Tier::Gpu, &[1, 2, 4]);
    index.store(1, 0, Tier::Cpu, &[3, 4, 5]);
    index.store(2, 0, Tier::Cpu, &[1, 2]);
    index.store(2, 0, Tier::Gpu, &[2]);
    let result = lookup(&index, 0, &[1, 2, 3, 4, 5, 6]);
    assert_eq!(result, BTreeMap::from([(1, (2, 5)), (2, (0, 2))]));
}

#[test]
fn store_is_idempotent_and_tiers_are_removed_one_by_one() {
    let index = big();
    index.store(7, 3, Tier::Gpu, &[10, 11]);
    index.store(7, 3, Tier::Gpu, &[10, 11]);
    index.store(7, 3, Tier::Cpu, &[10]);
    let stats = index.stats();
    assert_eq!((stats.entries, stats.blocks, stats.pods), (2, 2, 1));
    assert_eq!(index.pod_block_count(7), 2);
    index.remove(7, 3, Tier::Gpu, &[10]);
    assert_eq!(
        lookup(&index, 3, &[10, 11])[&7],
        (0, 2),
        "block 10 stays on CPU"
    );
    index.remove(7, 3, Tier::Cpu, &[10]);
    assert!(lookup(&index, 3, &[10, 11]).is_empty());
    index.remove(7, 3, Tier::Cpu, &[11, 12]);
    index.remove(8, 3, Tier::Gpu, &[11]);
    assert_eq!(
        index.pod_block_count(7),
        1,
        "removing absent tiers or pods changes nothing"
    );
    assert_eq!(index.audit().len(), 1);
}

#[test]
fn scopes_are_separate_keys() {
    let index = big();
    index.store(1, 10, Tier::Gpu, &[5, 6]);
    index.store(2, 11, Tier::Gpu, &[5, 6]);
    assert_eq!(lookup(&index, 10, &[5, 6]), BTreeMap::from([(1, (2, 2))]));
    assert_eq!(lookup(&index, 11, &[5, 6]), BTreeMap::from([(2, (2, 2))]));
    assert!(lookup(&index, 12, &[5, 6]).is_empty());
    assert_eq!(index.stats().blocks, 4);
}

/// Many holders move a block to group cells and back; pods span several 32-slot groups.
#[test]
fn many_holders_across_groups() {
    let index = big();
    let chain: Vec<u64> = (0..20).map(|i| i * 7919).collect();
    for pod in 0..100u32 {
        let tier = if pod % 3 == 0 { Tier::Cpu } else { Tier::Gpu };
        index.store(pod, 0, tier, &chain[..(pod as usize % 20) + 1]);
    }
    let result = lookup(&index, 0, &chain);
    assert_eq!(result.len(), 100);
    for pod in 0..100u32 {
        let n = pod % 20 + 1;
        let gpu = if pod % 3 == 0 { 0 } else { n };
        assert_eq!(result[&pod], (gpu, n), "pod {pod}");
    }
    index.audit();
    for pod in (0..100u32).filter(|p| p % 10 != 0) {
        index.remove(pod, 0, Tier::Gpu, &chain);
        index.remove(pod, 0, Tier::Cpu, &chain);
    }
    let contents = index.audit();
    let holders: BTreeSet<PodId> = contents.values().flat_map(|h| h.keys().copied()).collect();
    assert_eq!(holders, (0..100).step_by(10).collect());
    let result = lookup(&index, 0, &chain);
    assert_eq!(result.len(), 10);
    assert_eq!(result[&90], (0, 11));
}

#[test]
fn clear_pod_drops_only_that_pod() {
    let index = big();
    let chain: Vec<u64> = (0..500).collect();
    index.store(1, 0, Tier::Gpu, &chain);
    index.store(2, 0, Tier::Gpu, &chain[..100]);
    index.store(1, 1, Tier::Cpu, &chain[..50]);
    assert_eq!(index.pod_block_count(1), 550);
    index.clear_pod(1);
    assert_eq!(index.pod_block_count(1), 0);
    assert_eq!(index.pod_block_count(2), 100);
    assert_eq!(lookup(&index, 0, &chain), BTreeMap::from([(2, (100, 100))]));
    index.store(1, 0, Tier::Gpu, &chain[..3]);
    assert_eq!(
        lookup(&index, 0, &chain)[&1],
        (3, 3),
        "the pod stays usable"
    );
    let stats = index.stats();
    assert_eq!((stats.entries, stats.blocks), (103, 100));
    index.audit();
}

#[test]
fn retired_pod_ignores_late_events_and_its_slot_is_reused() {
    let index = big();
    index.store(1, 0, Tier::Gpu, &[1, 2, 3]);
    index.store(2, 0, Tier::Gpu, &[1, 2]);
    index.retire_pod(1);
    index.store(1, 0, Tier::Gpu, &[1, 2, 3, 4]);
    index.clear_pod(1);
    assert_eq!(index.pod_block_count(1), 0);
    assert_eq!(lookup(&index, 0, &[1, 2, 3]), BTreeMap::from([(2, (2, 2))]));
    assert_eq!(index.stats().pods, 1);
    index.store(3, 0, Tier::Gpu, &[1]);
    assert_eq!(
        lookup(&index, 0, &[1, 2, 3]),
        BTreeMap::from([(2, (2, 2)), (3, (1, 1))]),
        "the new pod took the freed slot without inheriting anything"
    );
    index.retire_pod(9);
    index.store(9, 0, Tier::Gpu, &[1]);
    assert_eq!(
        index.pod_block_count(9),
        0,
        "retiring an unseen id still bars it"
    );
    index.audit();
}

#[test]
fn registry_holds_max_pods() {
    let index = super::tests::index(64 << 20, 1);
    for pod in 0..MAX_PODS as u32 + 1 {
        index.store(pod, 0, Tier::Gpu, &[u64::from(pod)]);
    }
    assert_eq!(index.stats().pods, MAX_PODS);
    assert_eq!(index.pod_block_count(MAX_PODS as u32), 0);
    index.retire_pod(5);
    index.store(MAX_PODS as u32, 0, Tier::Gpu, &[1]);
    assert_eq!(
        index.pod_block_count(MAX_PODS as u32),
        1,
        "a freed slot admits a new pod"
    );
}

#[test]
fn eviction_keeps_bytes_within_budget_and_spares_recent_blocks() {
    let budget = 256 << 10;
    let index = index(budget, 4);
    let hot: Vec<u64> = (0..200).map(|i| 1 << 40 | i).collect();
    for round in 0..40u64 {
        index.store(1, 0, Tier::Gpu, &hot);
        let cold: Vec<u64> = (0..1000).map(|i| round * 1000 + i).collect();
        index.store(2, 0, Tier::Gpu, &cold);
    }
    let stats = index.stats();
    assert!(stats.bytes <= budget, "{stats:?}");
    assert!(
        stats.bytes > budget * 3 / 4,
        "the budget is used: {stats:?}"
    );
    assert!(stats.evicted_blocks > 0);
    assert_eq!(stats.rejected, 0);
    assert_eq!(
        lookup(&index, 0, &hot)[&1],
        (200, 200),
        "re-stored blocks survive"
    );
    index.audit();
}

#[test]
fn tiny_budget_uses_fewer_shards() {
    let small = index(3 * MIN_SHARD_BUDGET, 64);
    assert_eq!(small.stats().shards, 2);
    let empty = index(0, 64);
    assert_eq!(empty.stats().shards, 1);
    empty.store(1, 0, Tier::Gpu, &[1, 2]);
    let stats = empty.stats();
    assert_eq!((stats.entries, stats.rejected, stats.bytes), (0, 2, 0));
}

#[test]
fn index_is_shareable_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<BlockIndex>();
    shareable::<Arc<BlockIndex>>();
}

#[test]
fn medium_names_map_to_tiers() {
    assert_eq!(Tier::from_medium(None), Tier::Gpu);
    assert_eq!(Tier::from_medium(Some("GPU")), Tier::Gpu);
    assert_eq!(Tier::from_medium(Some("CPU")), Tier::Cpu);
    assert_eq!(Tier::from_medium(Some("STORAGE")), Tier::Cpu);
}

/// Writers on several threads (each its own pods, with clears and retires) while readers look
/// up; afterwards every invariant holds and each surviving pod holds exactly its last stores.
#[test]
fn concurrent_writers_and_readers() {
    let index = Arc::new(index(64 << 20, 16));
    let chain: Vec<u64> = (0..64).collect();
    let writers: Vec<_> = (0..4u32)
        .map(|w| {
            let index = Arc::clone(&index);
            let chain = chain.clone();
            std::thread::spawn(move || {
                for round in 0..200u32 {
                    let pod = w * 1000 + round / 50;
                    let n = (round % 64) as usize + 1;
                    index.store(pod, 0, Tier::Gpu, &chain[..n]);
                    index.store(pod, 0, Tier::Cpu, &[10_000 + u64::from(round)]);
                    if round % 7 == 0 {
                        index.remove(pod, 0, Tier::Gpu, &chain[n / 2..n]);
                    }
                    if round % 50 == 49 {
                        index.retire_pod(pod);
                    }
                    if round % 13 == 0 {
                        index.clear_pod(pod);
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let index = Arc::clone(&index);
            let chain = chain.clone();
            std::thread::spawn(move || {
                let mut out = PrefixMatch::new();
                for _ in 0..500 {
                    index.lookup(0, &chain, &mut out);
                    for (_, p) in out.iter() {
                        assert!(p.gpu_blocks <= p.any_blocks && p.any_blocks <= 64);
                    }
                }
            })
        })
        .collect();
    for t in writers.into_iter().chain(readers) {
        t.join().expect("thread panicked");
    }
    let contents = index.audit();
    assert!(contents.is_empty(), "every pod was retired");
    assert_eq!(index.stats().pods, 0);
}

// ---- model test ----

#[derive(Clone, Debug)]
enum Op {
    Store(PodId, ScopeId, Tier, Vec<u64>),
    Remove(PodId, ScopeId, Tier, Vec<u64>),
    Clear(PodId),
    Retire(PodId),
    Lookup(ScopeId, Vec<u64>),
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![3 => Just(Tier::Gpu), 1 => Just(Tier::Cpu)]
}

/// Block hashes from a small space so that pods share blocks, spread over the full u64 range.
fn hashes(space: u64, max_len: usize) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0..space, 0..max_len).prop_map(|v| {
        v.into_iter()
            .map(|h| h.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (h << 3))
            .collect()
    })
}

fn op(pods: u32, space: u64, max_len: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..pods, 0..2u32, tier(), hashes(space, max_len)).prop_map(|(p, s, t, h)| Op::Store(p, s, t, h)),
        3 => (0..pods, 0..2u32, tier(), hashes(space, max_len)).prop_map(|(p, s, t, h)| Op::Remove(p, s, t, h)),
        1 => (0..pods).prop_map(Op::Clear),
        1 => (0..pods).prop_map(Op::Retire),
        2 => (0..2u32, hashes(space, max_len)).prop_map(|(s, h)| Op::Lookup(s, h)),
    ]
}

#[derive(Default)]
struct Model {
    blocks: HashMap<(ScopeId, u64), BTreeMap<PodId, u32>>,
    retired: HashSet<PodId>,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Store(pod, scope, tier, hashes) if !self.retired.contains(pod) => {
                for &h in hashes {
                    *self
                        .blocks
                        .entry((*scope, h))
                        .or_default()
                        .entry(*pod)
                        .or_default() |= tier.bits();
                }
            }
            Op::Remove(pod, scope, tier, hashes) => {
                for &h in hashes {
                    if let Some(holders) = self.blocks.get_mut(&(*scope, h)) {
                        if let Some(t) = holders.get_mut(pod) {
                            *t &= !tier.bits();
                            if *t == 0 {
                                holders.remove(pod);
                            }
                        }
                        if holders.is_empty() {
                            self.blocks.remove(&(*scope, h));
                        }
                    }
                }
            }
            Op::Clear(pod) | Op::Retire(pod) => {
                if matches!(op, Op::Retire(_)) {
                    self.retired.insert(*pod);
                }
                for holders in self.blocks.values_mut() {
                    holders.remove(pod);
                }
                self.blocks.retain(|_, h| !h.is_empty());
            }
            Op::Store(..) | Op::Lookup(..) => {}
        }
    }

    /// Per pod (gpu, any) prefix lengths, like `BlockIndex::lookup`.
    fn prefix(&self, scope: ScopeId, hashes: &[u64]) -> BTreeMap<PodId, (u32, u32)> {
        let Some(first) = hashes.first().and_then(|h| self.blocks.get(&(scope, *h))) else {
            return BTreeMap::new();
        };
        first
            .keys()
            .map(|&pod| {
                let tiers = || {
                    hashes.iter().map(move |h| {
                        self.blocks
                            .get(&(scope, *h))
                            .and_then(|holders| holders.get(&pod))
                            .copied()
                            .unwrap_or(0)
                    })
                };
                let gpu = tiers().take_while(|t| t & 1 != 0).count() as u32;
                let any = tiers().take_while(|&t| t != 0).count() as u32;
                (pod, (gpu, any))
            })
            .collect()
    }

    fn contents(&self) -> Contents {
        self.blocks.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    fn pod_blocks(&self, pod: PodId) -> usize {
        self.blocks
            .values()
            .filter(|h| h.contains_key(&pod))
            .count()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// With a budget that never fills, the index holds exactly what the model holds.
    #[test]
    fn matches_the_model_without_eviction(ops in prop::collection::vec(op(40, 48, 12), 1..150)) {
        let index = index(64 << 20, 4);
        let mut model = Model::default();
        for op in &ops {
            model.apply(op);
            match op {
                Op::Store(p, s, t, h) => index.store(*p, *s, *t, h),
                Op::Remove(p, s, t, h) => index.remove(*p, *s, *t, h),
                Op::Clear(p) => index.clear_pod(*p),
                Op::Retire(p) => index.retire_pod(*p),
                Op::Lookup(s, h) => prop_assert_eq!(lookup(&index, *s, h), model.prefix(*s, h)),
            }
            prop_assert_eq!(index.audit(), model.contents());
        }
        for pod in 0..40 {
            prop_assert_eq!(index.pod_block_count(pod), model.pod_blocks(pod));
        }
        let stats = index.stats();
        prop_assert_eq!((stats.evicted_blocks, stats.rejected), (0, 0));
    }

    /// With a budget a few pages big, eviction runs constantly: bytes stay within the budget,
    /// every invariant holds, and the index never claims a holder the model does not have.
    #[test]
    fn stays_within_budget_and_sound_with_eviction(ops in prop::collection::vec(op(40, 1500, 30), 1..150)) {
        let budget = 2 * MIN_SHARD_BUDGET;
        let index = index(budget, 2);
        let mut model = Model::default();
        for op in &ops {
            model.apply(op);
            match op {
                Op::Store(p, s, t, h) => index.store(*p, *s, *t, h),
                Op::Remove(p, s, t, h) => index.remove(*p, *s, *t, h),
                Op::Clear(p) => index.clear_pod(*p),
                Op::Retire(p) => index.retire_pod(*p),
                Op::Lookup(s, h) => {
                    let expected = model.prefix(*s, h);
                    for (pod, (gpu, any)) in lookup(&index, *s, h) {
                        let (model_gpu, model_any) = expected.get(&pod).copied().unwrap_or((0, 0));
                        prop_assert!(gpu <= model_gpu && any <= model_any, "pod {} prefix", pod);
                    }
                }
            }
            let contents = index.audit();
            for (key, holders) in &contents {
                let model_holders = model.blocks.get(key);
                for (pod, tiers) in holders {
                    let model_tiers = model_holders.and_then(|h| h.get(pod)).copied().unwrap_or(0);
                    prop_assert!(tiers & !model_tiers == 0, "pod {} holds {:?} only in the index", pod, key);
                }
            }
            prop_assert!(index.stats().bytes <= budget);
        }
    }
}
