//! `prefix` (scorer): approximate prefix affinity from the router's own past decisions,
//! the way GIE/llm-d's `prefix-cache-scorer` works. It is the baseline the precise
//! `kv-cache` scorer must beat, so it never reads the block index.
//!
//! On `routed`, the request's block keys are recorded for the chosen pod in an LRU
//! sized to the pod's KV capacity (`podKvBlocks`), standing in for vLLM's own eviction.
//! Score = longest recorded prefix / request blocks.
//!
//! Memory is bounded: each pod holds at most `capacityBlocks` keys, and the memory of
//! a pod that has not been routed to for `forgetAfterMs` (a pod that went away, since
//! the router only ever learns of pods through routing) is dropped.
//!
//! A pod's memory describes one process of it: it is recorded with the pod's process
//! count and ignored once a new process serves the pod (its cache starts empty). Cache
//! clears that only KV events reveal do not touch it: this baseline sees no events.

use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::RwLock;
use serde::Deserialize;

use super::{
    parse_params, Candidate, Plugin, PluginContext, PluginError, SchedulingRequest, Scorer,
};
use crate::pods::{Pod, PodId};

pub const NAME: &str = "prefix";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Params {
    /// Blocks remembered per pod; defaults to the model's `podKvBlocks`.
    capacity_blocks: Option<usize>,
    /// Drop a pod's memory when nothing was routed to it for this long.
    forget_after_ms: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            capacity_blocks: None,
            forget_after_ms: 600_000,
        }
    }
}

pub fn build(
    params: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Scorer>, PluginError> {
    let p: Params = parse_params(NAME, params)?;
    let capacity = p.capacity_blocks.unwrap_or(ctx.pod_kv_blocks);
    if capacity == 0 || capacity >= NIL as usize {
        return Err(PluginError::params(
            NAME,
            &format!("capacityBlocks must be between 1 and {}", NIL - 1),
        ));
    }
    if p.forget_after_ms == 0 {
        return Err(PluginError::params(NAME, "forgetAfterMs must be > 0"));
    }
    Ok(Arc::new(Prefix {
        capacity,
        forget_after: Duration::from_millis(p.forget_after_ms),
        state: RwLock::new(State::default()),
    }))
}

pub struct Prefix {
    capacity: usize,
    forget_after: Duration,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    pods: HashMap<PodId, PodMemory>,
    next_sweep: Duration,
}

/// Link value meaning "none" in the LRU's slab.
const NIL: u32 = u32::MAX;

type BlockKey = (u32, u64);

struct Node {
    key: BlockKey,
    prev: u32,
    next: u32,
}

/// One pod's remembered blocks: a hash map into an intrusive doubly linked list kept
/// in a slab, most recently routed first, so touching and evicting are O(1).
struct PodMemory {
    slots: HashMap<BlockKey, u32>,
    nodes: Vec<Node>,
    head: u32,
    tail: u32,
    last_routed: Duration,
    /// The pod's process the memory describes ([`Pod::process`]).
    process: u32,
}

impl PodMemory {
    fn new(process: u32) -> Self {
        Self {
            slots: HashMap::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            last_routed: Duration::ZERO,
            process,
        }
    }

    /// Whether the memory describes `pod`'s current process.
    fn describes(&self, pod: &Pod) -> bool {
        self.process == pod.process()
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.slots.contains_key(key)
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let node = &self.nodes[slot as usize];
            (node.prev, node.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, slot: u32) {
        let old_head = self.head;
        {
            let node = &mut self.nodes[slot as usize];
            node.prev = NIL;
            node.next = old_head;
        }
        match old_head {
            NIL => self.tail = slot,
            h => self.nodes[h as usize].prev = slot,
        }
        self.head = slot;
    }

    /// Marks `key` most recently used, evicting the least recently used key when full.
    fn touch(&mut self, key: BlockKey, capacity: usize) {
        if let Some(&slot) = self.slots.get(&key) {
            self.unlink(slot);
            self.push_front(slot);
            return;
        }
        let slot = if self.nodes.len() < capacity {
            // Bounded by capacity < NIL, checked at build.
            let slot = self.nodes.len() as u32;
            self.nodes.push(Node {
                key,
                prev: NIL,
                next: NIL,
            });
            slot
        } else {
            let slot = self.tail;
            self.unlink(slot);
            let evicted = std::mem::replace(&mut self.nodes[slot as usize].key, key);
            self.slots.remove(&evicted);
            slot
        };
        self.slots.insert(key, slot);
        self.push_front(slot);
    }
}

impl Scorer for Prefix {
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &mut [Candidate], scores: &mut [f64]) {
        if req.block_keys.is_empty() {
            return;
        }
        let state = self.state.read();
        for (cand, score) in candidates.iter_mut().zip(scores.iter_mut()) {
            let Some(memory) = state
                .pods
                .get(&cand.pod.id)
                .filter(|memory| memory.describes(&cand.pod))
            else {
                continue;
            };
            let matched = req
                .block_keys
                .iter()
                .take_while(|&&key| memory.contains(&(req.scope, key)))
                .count();
            cand.cached_blocks = cand
                .cached_blocks
                .max(u32::try_from(matched).unwrap_or(u32::MAX));
            *score = matched as f64 / req.block_keys.len() as f64;
        }
    }
}

impl Plugin for Prefix {
    fn name(&self) -> &'static str {
        NAME
    }

    fn routed(&self, req: &SchedulingRequest<'_>, chosen: &Candidate) {
        let mut state = self.state.write();
        if req.now >= state.next_sweep {
            let forget_after = self.forget_after;
            state
                .pods
                .retain(|_, memory| memory.last_routed + forget_after > req.now);
            state.next_sweep = req.now + forget_after;
        }
        let process = chosen.pod.process();
        let memory = state
            .pods
            .entry(chosen.pod.id)
            .or_insert_with(|| PodMemory::new(process));
        if !memory.describes(&chosen.pod) {
            *memory = PodMemory::new(process);
        }
        memory.last_routed = req.now;
        // Only the head of a request longer than the LRU can ever match; record it last
        // block first so block 0 is the most recent and the prefix is evicted tail first,
        // as vLLM frees a request's blocks.
        let kept = req.block_keys.len().min(self.capacity);
        for &key in req.block_keys[..kept].iter().rev() {
            memory.touch((req.scope, key), self.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{candidates, context, params, request, scores};

    fn plugin(yaml: Option<&str>) -> Arc<dyn Scorer> {
        build(yaml.map(params).as_ref(), &context()).expect("valid params")
    }

    #[test]
    fn learns_from_routing_decisions() {
        let prefix = plugin(None);
        let mut cands = candidates(3);
        let routed = [1, 2, 3, 4];
        prefix.routed(&request(&routed), &cands[1]);

        let asked = [1, 2, 9, 9];
        assert_eq!(
            scores(prefix.as_ref(), &request(&asked), &mut cands),
            vec![0.0, 0.5, 0.0]
        );
        assert_eq!(cands[1].cached_blocks, 2);
    }

    #[test]
    fn scopes_are_kept_apart() {
        let prefix = plugin(None);
        let mut cands = candidates(1);
        let blocks = [1, 2];
        let mut req = request(&blocks);
        req.scope = 3;
        prefix.routed(&req, &cands[0]);
        assert_eq!(
            scores(prefix.as_ref(), &request(&blocks), &mut cands),
            vec![0.0]
        );
    }

    #[test]
    fn lru_evicts_least_recent_blocks_tail_first() {
        let prefix = plugin(Some("{capacityBlocks: 4}"));
        let mut cands = candidates(1);
        let a = [10, 11, 12];
        let b = [20, 21, 22];
        prefix.routed(&request(&a), &cands[0]);
        prefix.routed(&request(&b), &cands[0]);
        // a's head (10) was recorded after its tail, so it is what survives of a.
        assert_eq!(
            scores(prefix.as_ref(), &request(&a), &mut cands),
            vec![1.0 / 3.0]
        );
        assert_eq!(scores(prefix.as_ref(), &request(&b), &mut cands), vec![1.0]);

        // Routing a again refreshes 10 and re-adds 11 and 12, evicting b's tail.
        prefix.routed(&request(&a), &cands[0]);
        assert_eq!(scores(prefix.as_ref(), &request(&a), &mut cands), vec![1.0]);
        assert_eq!(
            scores(prefix.as_ref(), &request(&b), &mut cands),
            vec![1.0 / 3.0]
        );
    }

    #[test]
    fn a_request_longer_than_the_lru_keeps_its_head() {
        let prefix = plugin(Some("{capacityBlocks: 2}"));
        let mut cands = candidates(1);
        let long = [1, 2, 3, 4, 5];
        prefix.routed(&request(&long), &cands[0]);
        assert_eq!(
            scores(prefix.as_ref(), &request(&long), &mut cands),
            vec![0.4]
        );
    }

    #[test]
    fn forgets_pods_that_are_no_longer_routed_to() {
        let prefix = plugin(Some("{forgetAfterMs: 1000}"));
        let cands = candidates(2);
        let blocks = [1, 2];
        prefix.routed(&request(&blocks), &cands[0]);
        let mut later = request(&blocks);
        later.now = Duration::from_millis(1_500);
        prefix.routed(&later, &cands[1]);
        let mut fresh = candidates(2);
        assert_eq!(scores(prefix.as_ref(), &later, &mut fresh), vec![0.0, 1.0]);
    }

    #[test]
    fn a_new_process_starts_with_no_memory() {
        let prefix = plugin(None);
        let mut cands = candidates(2);
        let blocks = [7, 8];
        prefix.routed(&request(&blocks), &cands[0]);
        // Events may clear the cache without this baseline hearing of it...
        cands[0].pod.cache_cleared();
        assert_eq!(
            scores(prefix.as_ref(), &request(&blocks), &mut cands),
            vec![1.0, 0.0]
        );
        // ...but a new process is a new pod as far as its cache goes.
        cands[0].pod.process_replaced();
        let mut fresh = candidates(2);
        fresh[0] = Candidate::new(Arc::clone(&cands[0].pod));
        assert_eq!(
            scores(prefix.as_ref(), &request(&blocks), &mut fresh),
            vec![0.0, 0.0]
        );
        prefix.routed(&request(&blocks[..1]), &fresh[0]);
        assert_eq!(
            scores(prefix.as_ref(), &request(&blocks), &mut fresh),
            vec![0.5, 0.0]
        );
    }

    #[test]
    fn params_are_strict() {
        for bad in ["{capacityBlocks: 0}", "{forgetAfterMs: 0}", "{size: 3}"] {
            assert!(matches!(
                build(Some(&params(bad)), &context()),
                Err(PluginError::Params { .. })
            ));
        }
    }
}
