//! `kv-cache` (scorer): precise prefix affinity from the block index that the pods'
//! KV events maintain.
//!
//! Score = cache credit / request blocks, where a pod's credit is its longest cached
//! prefix of the request: blocks in GPU memory count fully, blocks found only in the
//! CPU tier count `cpuDiscount` each (they must be copied back, which is cheaper than
//! recomputing but not free). Only pods whose event stream is `Synced` get credit;
//! `Unknown` pods are treated as cold and `Untrusted` ones are routed on load only.
//!
//! **Speculative credit.** Events lag the routing decision (the pod publishes a block
//! once it is computed), so a burst of requests sharing a new prefix would otherwise
//! scatter. After routing, the chosen pod is credited with the request's blocks for
//! `speculativeTtlMs`; the credit is the max of indexed and speculative prefixes, so
//! once events confirm the blocks the index carries on and the speculation just ages out.
//! The credit is recorded under the pod's cache epoch and counts only in that epoch, so a
//! restart or a cleared cache drops it with everything else believed about the pod.
//! The credit outlives the event lag on purpose: when KV memory is short, a prefix's
//! tail is evicted between its requests, and following only the events would send the
//! next request to whichever pod is least loaded, copying the prefix onto one pod after
//! another and evicting still more. Credit that lasts keeps a recently routed prefix on
//! its pod, which recomputes only what it lost. A speculative block counts
//! `speculativeDiscount` of a confirmed one: the speculation is this router's own memory,
//! the events are what every kvgate replica sees, so where a pod's events show a prefix
//! and another pod only has this replica's promise, the replicas agree on the former.
//!
//! **Saturation valve.** Affinity must yield when the holder is overloaded, or every
//! request of a hot prefix piles onto one pod. The cache score is multiplied by
//! `f = clamp(2 − p, 0, 1)` where `p` is the pod's pressure *relative to the least
//! loaded candidate*: `max(excess uncached tokens in flight / saturationTokens,
//! excess scraped waiting requests / saturationWaiting)`, and, when
//! `saturationRequests` is set, `excess requests on the pod / saturationRequests`
//! (decode load, for fleets where hot prefixes pile up decoding). Up to one threshold of
//! excess the credit is full; at twice the threshold it is 0 and the pod competes on
//! load alone, so a load scorer in the profile decides. Pressure is relative so that
//! when every pod is equally busy, cache hits (which save compute exactly when it is
//! scarce) still steer requests.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::RwLock;
use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, SchedulingRequest, Scorer,
};
use crate::events::IndexTargets;
use crate::index::{BlockIndex, PodPrefix, PrefixMatch, ScopeId};
use crate::pods::{CacheEpoch, EventTrust, Pod, PodId};

pub const NAME: &str = "kv-cache";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    /// Credit of a block held only in the CPU tier, relative to a GPU-resident block (0..=1).
    cpu_discount: f64,
    /// How long a routed request's blocks count as cached on the chosen pod, whatever
    /// events say meanwhile (0 disables speculative credit).
    speculative_ttl_ms: u64,
    /// Bound on remembered speculative (pod, block) pairs; the oldest go first.
    max_speculative_blocks: usize,
    /// Credit of a speculative block relative to one the pod's events confirm (0..=1).
    speculative_discount: f64,
    /// Excess prefill backlog (uncached prompt tokens in flight, beyond the least loaded
    /// candidate's) at which cache affinity starts to yield; it is gone at twice this.
    saturation_tokens: u64,
    /// Same, for vLLM's scraped waiting queue (requests).
    saturation_waiting: f64,
    /// Same, for requests on the pod (running or queued, as [`Pod::estimated_requests`]
    /// counts them): decode load, which a cached prompt does not make cheaper. Off unless
    /// set: see the default's comment.
    saturation_requests: Option<f64>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            cpu_discount: 0.5,
            // `kvgate bench` W1 with half the KV memory per pod: 62 % hit rate at 2 s (the
            // event lag alone), 78 % at 30 s; with W1's full KV, Mooncake and the LooGLE
            // chats, no change beyond noise; the low-sharing control gains (7.5 → 9.2 %).
            speculative_ttl_ms: 30_000,
            max_speculative_blocks: 1 << 18,
            // W1 with half the KV: 2 / 4 replicas 68.6 / 58.2 % hit at 1.0, 73.6 / 67.5 % at
            // 0.5; one replica and the other workloads unchanged.
            speculative_discount: 0.5,
            // Tuned with `kvgate bench` (W1, Mooncake, LooGLE chats, control): at 16,384
            // tokens affinity let go as soon as the fleet queued, scattering hot prefixes
            // and dropping W1's hit rate to round-robin's. Past W1's knee every pod's
            // waiting queue grows and differences of 64 requests are common even when the
            // holder is the right choice: yielding there recomputed prefixes on a fleet that
            // was short of compute (91 % hit, TTFT p99 649 s over the ladder); at 256 it
            // holds 97 % (p99 533 s), equal to the oracle, the other workloads unchanged.
            saturation_tokens: 262_144,
            saturation_waiting: 256.0,
            // Off: on LooGLE chats at 3 sessions/s a hot document's pod runs 3.7× the mean
            // load and TPOT is 33 ms vs round-robin's 21; 16 brings it to 24 ms (balance
            // 2.9) but costs W1 7 points of hit rate (97.4 → 90.3 %) and half-KV W1 7.5,
            // because there the whole fleet is short of compute and copies are recomputed.
            saturation_requests: None,
        }
    }
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    let bad = |message: &str| Err(PluginError::params(NAME, message));
    if !(0.0..=1.0).contains(&p.cpu_discount) {
        return bad("cpuDiscount must be between 0 and 1");
    }
    if !(0.0..=1.0).contains(&p.speculative_discount) {
        return bad("speculativeDiscount must be between 0 and 1");
    }
    if p.speculative_ttl_ms > 0 && p.max_speculative_blocks == 0 {
        return bad("maxSpeculativeBlocks must be > 0 when speculativeTtlMs is set");
    }
    if p.saturation_tokens == 0 {
        return bad("saturationTokens must be > 0");
    }
    if !(p.saturation_waiting.is_finite() && p.saturation_waiting > 0.0) {
        return bad("saturationWaiting must be > 0");
    }
    if p.saturation_requests
        .is_some_and(|r| !(r.is_finite() && r > 0.0))
    {
        return bad("saturationRequests must be > 0");
    }
    Ok(Arc::new(KvCache {
        index: Arc::clone(&ctx.index),
        targets: Arc::clone(&ctx.targets),
        cpu_discount: p.cpu_discount,
        speculative_ttl: Duration::from_millis(p.speculative_ttl_ms),
        speculative_discount: p.speculative_discount,
        saturation_tokens: p.saturation_tokens as f64,
        saturation_waiting: p.saturation_waiting,
        saturation_requests: p.saturation_requests,
        speculative: RwLock::new(Speculative {
            expires: HashMap::new(),
            order: VecDeque::new(),
            capacity: p.max_speculative_blocks,
        }),
    }))
}

pub struct KvCache {
    index: Arc<BlockIndex>,
    targets: Arc<IndexTargets>,
    cpu_discount: f64,
    speculative_ttl: Duration,
    speculative_discount: f64,
    saturation_tokens: f64,
    saturation_waiting: f64,
    saturation_requests: Option<f64>,
    speculative: RwLock<Speculative>,
}

thread_local! {
    /// Lookup result buffer, reused so a scoring pass does not allocate.
    static PREFIX_MATCH: RefCell<PrefixMatch> = RefCell::new(PrefixMatch::new());
}

/// Blocks recently routed to a pod, not yet confirmed by its events.
struct Speculative {
    /// (scope, block key, pod) → when the credit ends, and the pod's cache epoch it was
    /// granted in.
    expires: HashMap<(ScopeId, u64, PodId), (Duration, CacheEpoch)>,
    /// Insertion order, oldest first, for expiry and the size bound. An entry whose
    /// pair was refreshed since is stale: its deadline no longer matches `expires`.
    order: VecDeque<(Duration, ScopeId, u64, PodId)>,
    capacity: usize,
}

impl Speculative {
    fn record(&mut self, scope: ScopeId, keys: &[u64], pod: &Pod, now: Duration, ttl: Duration) {
        while self.order.front().is_some_and(|e| e.0 <= now) {
            self.pop_oldest();
        }
        let until = now + ttl;
        let epoch = pod.cache_epoch();
        // Last block first, so that block 0 is the newest entry: when the bound trims a
        // long request, it drops the tail of its prefix, never the head.
        for &key in keys.iter().rev() {
            self.expires.insert((scope, key, pod.id), (until, epoch));
            self.order.push_back((until, scope, key, pod.id));
        }
        while self.order.len() > self.capacity {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((until, scope, key, pod)) = self.order.pop_front() {
            if self
                .expires
                .get(&(scope, key, pod))
                .is_some_and(|&(u, _)| u == until)
            {
                self.expires.remove(&(scope, key, pod));
            }
        }
    }

    /// Leading blocks of `keys` speculatively held by `pod` at `now`, in its current epoch.
    fn prefix_len(&self, scope: ScopeId, keys: &[u64], pod: &Pod, now: Duration) -> u32 {
        if self.expires.is_empty() {
            return 0;
        }
        let epoch = pod.cache_epoch();
        let held = keys
            .iter()
            .take_while(|&&key| {
                self.expires
                    .get(&(scope, key, pod.id))
                    .is_some_and(|&(until, granted)| until > now && granted == epoch)
            })
            .count();
        u32::try_from(held).unwrap_or(u32::MAX)
    }
}

/// The least loaded candidate's figures, each on its own, that the valve measures against.
struct LeastLoad {
    backlog: u64,
    waiting: f64,
    requests: f64,
}

impl LeastLoad {
    fn of(candidates: &[Candidate]) -> Self {
        candidates.iter().fold(
            Self {
                backlog: u64::MAX,
                waiting: f64::INFINITY,
                requests: f64::INFINITY,
            },
            |least, c| Self {
                backlog: least.backlog.min(c.pod.uncached_tokens_in_flight()),
                waiting: least.waiting.min(c.pod.scraped().waiting),
                requests: least.requests.min(c.pod.estimated_requests()),
            },
        )
    }
}

/// Cache credit of one pod in blocks: GPU-resident blocks fully, CPU-only ones discounted.
fn indexed_credit(held: PodPrefix, request_blocks: u32, cpu_discount: f64) -> (f64, u32) {
    let gpu = held.gpu_blocks.min(request_blocks);
    let any = held.any_blocks.clamp(gpu, request_blocks);
    (gpu as f64 + cpu_discount * (any - gpu) as f64, any)
}

impl KvCache {
    /// Fraction of cache credit a pod keeps given its load relative to the least loaded candidate.
    fn affinity_factor(&self, pod: &Pod, least: &LeastLoad) -> f64 {
        let excess_tokens = pod
            .uncached_tokens_in_flight()
            .saturating_sub(least.backlog) as f64;
        let excess_waiting = (pod.scraped().waiting - least.waiting).max(0.0);
        let excess_requests = self.saturation_requests.map_or(0.0, |r| {
            (pod.estimated_requests() - least.requests).max(0.0) / r
        });
        let pressure = (excess_tokens / self.saturation_tokens)
            .max(excess_waiting / self.saturation_waiting)
            .max(excess_requests);
        (2.0 - pressure).clamp(0.0, 1.0)
    }
}

impl Scorer for KvCache {
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &mut [Candidate], scores: &mut [f64]) {
        let Ok(request_blocks) = u32::try_from(req.block_keys.len()) else {
            return;
        };
        if request_blocks == 0
            || !candidates
                .iter()
                .any(|c| c.pod.trust() == EventTrust::Synced)
        {
            return;
        }
        let least = LeastLoad::of(candidates);
        PREFIX_MATCH.with_borrow_mut(|found| {
            self.index.lookup(req.scope, req.block_keys, found);
            let speculative = self.speculative.read();
            for (cand, score) in candidates.iter_mut().zip(scores.iter_mut()) {
                if cand.pod.trust() != EventTrust::Synced {
                    continue;
                }
                // A data-parallel pod routes the request to one of its ranks itself:
                // credit the rank holding the longest prefix.
                let held = self.targets.best_prefix(found, cand.pod.id);
                let (indexed, any) = indexed_credit(held, request_blocks, self.cpu_discount);
                let promised =
                    speculative.prefix_len(req.scope, req.block_keys, &cand.pod, req.now);
                cand.cached_blocks = cand.cached_blocks.max(any).max(promised);
                let credit = indexed.max(self.speculative_discount * promised as f64);
                *score = credit / request_blocks as f64 * self.affinity_factor(&cand.pod, &least);
            }
        });
    }
}

impl Plugin for KvCache {
    fn name(&self) -> &'static str {
        NAME
    }

    fn routed(&self, req: &SchedulingRequest<'_>, chosen: &Candidate) {
        if self.speculative_ttl.is_zero() || req.block_keys.is_empty() {
            return;
        }
        self.speculative.write().record(
            req.scope,
            req.block_keys,
            &chosen.pod,
            req.now,
            self.speculative_ttl,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Tier;
    use crate::plugins::testing::{candidates, context, params, request, scores};
    use crate::pods::ScrapedLoad;

    fn plugin(ctx: &PluginContext, yaml: Option<&str>) -> Arc<dyn Scorer> {
        build(yaml.map(params).as_ref(), ctx).expect("valid params")
    }

    fn synced(cands: &[Candidate]) {
        for c in cands {
            c.pod.set_trust(c.pod.cache_epoch(), EventTrust::Synced);
        }
    }

    #[test]
    fn scores_the_indexed_prefix_of_synced_pods_only() {
        let ctx = context();
        let cands = candidates(4);
        synced(&cands);
        let blocks = [11, 12, 13, 14];
        ctx.index.store(0, 0, Tier::Gpu, &blocks);
        ctx.index.store(1, 0, Tier::Gpu, &blocks[..2]);
        ctx.index.store(2, 0, Tier::Gpu, &blocks);
        cands[2]
            .pod
            .set_trust(cands[2].pod.cache_epoch(), EventTrust::Untrusted);
        ctx.index.store(3, 0, Tier::Gpu, &blocks);
        cands[3]
            .pod
            .set_trust(cands[3].pod.cache_epoch(), EventTrust::Unknown);

        let kv = plugin(&ctx, None);
        let mut cands = cands;
        let got = scores(kv.as_ref(), &request(&blocks), &mut cands);
        assert_eq!(got, vec![1.0, 0.5, 0.0, 0.0]);
        assert_eq!(
            cands.iter().map(|c| c.cached_blocks).collect::<Vec<_>>(),
            vec![4, 2, 0, 0]
        );
    }

    #[test]
    fn other_scopes_do_not_count() {
        let ctx = context();
        let mut cands = candidates(1);
        synced(&cands);
        let blocks = [1, 2];
        ctx.index.store(0, 7, Tier::Gpu, &blocks);
        let got = scores(plugin(&ctx, None).as_ref(), &request(&blocks), &mut cands);
        assert_eq!(got, vec![0.0]);
    }

    #[test]
    fn cpu_only_blocks_are_discounted() {
        let held = PodPrefix {
            gpu_blocks: 2,
            any_blocks: 6,
        };
        assert_eq!(indexed_credit(held, 8, 0.5), (4.0, 6));
        assert_eq!(indexed_credit(held, 8, 0.0), (2.0, 6));
        // Never more than the request itself.
        assert_eq!(indexed_credit(held, 4, 1.0), (4.0, 4));
    }

    #[test]
    fn keeps_a_higher_estimate_from_an_earlier_scorer() {
        let ctx = context();
        let mut cands = candidates(1);
        synced(&cands);
        cands[0].cached_blocks = 3;
        let blocks = [1, 2, 3, 4];
        ctx.index.store(0, 0, Tier::Gpu, &blocks[..1]);
        scores(plugin(&ctx, None).as_ref(), &request(&blocks), &mut cands);
        assert_eq!(cands[0].cached_blocks, 3);
    }

    #[test]
    fn speculative_credit_lasts_for_its_ttl() {
        let ctx = context();
        let mut cands = candidates(2);
        synced(&cands);
        let kv = plugin(&ctx, Some("{speculativeTtlMs: 500}"));
        let blocks = [21, 22, 23, 24];
        let mut req = request(&blocks);
        req.now = Duration::from_secs(10);
        kv.routed(&req, &cands[1]);

        // A longer request sharing the prefix is credited with the routed part.
        let longer = [21, 22, 23, 24, 25, 26, 27, 28];
        let mut follow = request(&longer);
        follow.now = Duration::from_millis(10_499);
        // 4 of 8 blocks, at half the credit of confirmed ones.
        assert_eq!(scores(kv.as_ref(), &follow, &mut cands), vec![0.0, 0.25]);
        assert_eq!(cands[1].cached_blocks, 4);

        follow.now = Duration::from_millis(10_500);
        let mut fresh = candidates(2);
        synced(&fresh);
        assert_eq!(scores(kv.as_ref(), &follow, &mut fresh), vec![0.0, 0.0]);
    }

    #[test]
    fn speculation_is_bounded_and_keeps_prefix_heads() {
        let ctx = context();
        let mut cands = candidates(1);
        synced(&cands);
        let kv = plugin(&ctx, Some("{maxSpeculativeBlocks: 3}"));
        let blocks = [1, 2, 3, 4, 5];
        kv.routed(&request(&blocks), &cands[0]);
        let got = scores(kv.as_ref(), &request(&blocks), &mut cands);
        assert_eq!(got, vec![0.5 * 3.0 / 5.0]);
    }

    #[test]
    fn a_new_cache_epoch_voids_speculation_and_trust() {
        let ctx = context();
        let mut cands = candidates(2);
        synced(&cands);
        let kv = plugin(&ctx, None);
        let blocks = [51, 52];
        kv.routed(&request(&blocks), &cands[0]);
        assert_eq!(
            scores(kv.as_ref(), &request(&blocks), &mut cands),
            vec![0.5, 0.0]
        );

        // The pod restarted: nothing routed to it before counts, and it is not
        // trusted until ingestion vouches for the new epoch.
        let epoch = cands[0].pod.process_replaced();
        let mut fresh: Vec<Candidate> = cands
            .iter()
            .map(|c| Candidate::new(Arc::clone(&c.pod)))
            .collect();
        assert_eq!(cands[0].pod.trust(), EventTrust::Unknown);
        cands[0].pod.set_trust(epoch, EventTrust::Synced);
        assert_eq!(
            scores(kv.as_ref(), &request(&blocks), &mut fresh),
            vec![0.0, 0.0]
        );
        assert_eq!(fresh[0].cached_blocks, 0);

        // Routed again in the new epoch: credited again.
        kv.routed(&request(&blocks), &fresh[0]);
        assert_eq!(
            scores(kv.as_ref(), &request(&blocks), &mut fresh),
            vec![0.5, 0.0]
        );
    }

    #[test]
    fn a_data_parallel_pod_is_credited_with_its_best_rank() {
        let ctx = context();
        let mut cands = candidates(2);
        synced(&cands);
        let blocks = [41, 42, 43, 44];
        // Pod 0 runs two ranks; ingestion indexes rank 1's blocks under id 9.
        ctx.targets.set(0, &[0, 9]);
        ctx.index.store(0, 0, Tier::Gpu, &blocks[..1]);
        ctx.index.store(9, 0, Tier::Gpu, &blocks[..3]);
        let got = scores(plugin(&ctx, None).as_ref(), &request(&blocks), &mut cands);
        assert_eq!(got, vec![0.75, 0.0]);
        assert_eq!(cands[0].cached_blocks, 3);
    }

    #[test]
    fn confirmed_blocks_outrank_a_promise_of_the_same_length() {
        let ctx = context();
        let mut cands = candidates(2);
        synced(&cands);
        let kv = plugin(&ctx, None);
        let blocks = [31, 32, 33, 34];
        // This replica sent the prefix to pod 1; pod 0's events show it holds it.
        kv.routed(&request(&blocks), &cands[1]);
        ctx.index.store(0, 0, Tier::Gpu, &blocks);
        assert_eq!(
            scores(kv.as_ref(), &request(&blocks), &mut cands),
            vec![1.0, 0.5]
        );
        let trusting = plugin(&ctx, Some("{speculativeDiscount: 1}"));
        trusting.routed(&request(&blocks), &cands[1]);
        assert_eq!(
            scores(trusting.as_ref(), &request(&blocks), &mut cands),
            vec![1.0, 1.0]
        );
    }

    #[test]
    fn no_speculation_for_pods_that_are_not_synced() {
        let ctx = context();
        let mut cands = candidates(1);
        let kv = plugin(&ctx, None);
        let blocks = [1, 2];
        kv.routed(&request(&blocks), &cands[0]);
        cands[0]
            .pod
            .set_trust(cands[0].pod.cache_epoch(), EventTrust::Untrusted);
        assert_eq!(
            scores(kv.as_ref(), &request(&blocks), &mut cands),
            vec![0.0]
        );
    }

    #[test]
    fn valve_scales_credit_by_excess_backlog() {
        let ctx = context();
        let cands = candidates(2);
        synced(&cands);
        let blocks = [5, 6];
        ctx.index.store(0, 0, Tier::Gpu, &blocks);
        let kv = plugin(&ctx, Some("{saturationTokens: 1000}"));
        let score_of_holder = |backlog: u64| {
            let _guard = cands[0].pod.begin_request(backlog);
            let _other = cands[1].pod.begin_request(200);
            let mut fresh = cands.clone();
            scores(kv.as_ref(), &request(&blocks), &mut fresh)[0]
        };
        // Excess over the least loaded candidate (200 tokens), not absolute backlog.
        assert_eq!(score_of_holder(1_200), 1.0);
        assert_eq!(score_of_holder(1_700), 0.5);
        assert_eq!(score_of_holder(2_200), 0.0);
        assert_eq!(score_of_holder(50_000), 0.0);
    }

    #[test]
    fn valve_reads_the_scraped_waiting_queue() {
        let ctx = context();
        let mut cands = candidates(2);
        synced(&cands);
        let blocks = [5, 6];
        ctx.index.store(0, 0, Tier::Gpu, &blocks);
        ctx.index.store(1, 0, Tier::Gpu, &blocks);
        cands[0].pod.set_scraped(ScrapedLoad {
            waiting: 14.0,
            ..Default::default()
        });
        cands[1].pod.set_scraped(ScrapedLoad {
            waiting: 8.0,
            ..Default::default()
        });
        let kv = plugin(&ctx, Some("{saturationWaiting: 4}"));
        assert_eq!(
            scores(kv.as_ref(), &request(&blocks), &mut cands),
            vec![0.5, 1.0]
        );
    }

    #[test]
    fn valve_reads_requests_on_the_pod_when_asked_to() {
        let ctx = context();
        let mut cands = candidates(2);
        synced(&cands);
        let blocks = [7, 8];
        ctx.index.store(0, 0, Tier::Gpu, &blocks);
        // Cached prompts add no prefill, but 12 decoding requests more than pod 1 has.
        let _decoding: Vec<_> = (0..12).map(|_| cands[0].pod.begin_request(0)).collect();
        let off = plugin(&ctx, None);
        assert_eq!(
            scores(off.as_ref(), &request(&blocks), &mut cands),
            vec![1.0, 0.0]
        );
        let on = plugin(&ctx, Some("{saturationRequests: 8}"));
        assert_eq!(
            scores(on.as_ref(), &request(&blocks), &mut cands),
            vec![0.5, 0.0]
        );
    }

    #[test]
    fn params_are_strict() {
        let ctx = context();
        for bad in [
            "{cpuDiscount: 1.5}",
            "{saturationTokens: 0}",
            "{saturationWaiting: -1}",
            "{speculativeTTL: 5}",
            "{speculativeTtlMs: 10, maxSpeculativeBlocks: 0}",
            "{speculativeDiscount: 1.5}",
            "{saturationRequests: 0}",
        ] {
            assert!(
                matches!(
                    build(Some(&params(bad)), &ctx),
                    Err(PluginError::Params { .. })
                ),
                "{bad} must be refused"
            );
        }
    }
}
