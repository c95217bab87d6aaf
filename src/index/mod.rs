//! Block index: which pods hold which KV-cache blocks.
//!
//! Keyed by (scope, block hash) exactly as the KV events carry the hash; the value is the set of
//! pods holding the block, each on the GPU tier, an offload tier, or both. A lookup walks a
//! request's block hashes from block 0 once and reports, per pod, how many leading blocks it
//! holds consecutively.
//!
//! # Layout
//! The key space is split over `shards` shards (a power of two) by a seeded mix of scope and
//! hash; each shard is one `parking_lot::RwLock` holding a Robin Hood table of 4-byte buckets
//! and an arena of 16-byte cells (see `shard`, `table`, `arena`). A block is one cell (hash,
//! scope, and up to two holders inline as 15-bit slot+tier refs); a block held by more pods
//! moves its holders to bitset cells of 32 pods each. Pods are known by a dense slot
//! (`registry`), at most [`MAX_PODS`] live at once, reused after a pod is retired.
//!
//! Writers and lookups lock the shards of a window of 8 block hashes at a time (in ascending
//! shard order), briefly; lookups take only shard read locks, never a global lock. Table
//! growth is the longest a writer holds a shard (a rehash of that shard's blocks), which is
//! why the default has many shards.
//!
//! # Byte accounting
//! `IndexStats::bytes` is exact: the sum over shards of table buckets × 4 plus arena pages
//! (4 KiB each) plus the page vector's capacity × 48. Per block-pod entry that is one node cell
//! (16 B) and one table bucket (4 B at load 7/16..7/8, so 4.6–9.1 B) per block, plus a third of
//! a cell (5.3 B) per entry for the pod's list, plus one 16-byte cell per 32-pod group for blocks
//! held by three pods or more. Each shard keeps its bytes within `budget_bytes / shards`:
//! growth beyond that is replaced by evicting blocks, least recently stored first (a
//! second-chance clock), so freed cells are reused rather than memory allocated. The registry's
//! own memory (pod maps, 12 B per live pod per shard of list heads, 64 KiB of slot tags) is
//! reported separately as `registry_bytes`.
//!
//! # Pod lifetime
//! `clear_pod` (AllBlocksCleared, an unrecoverable event gap) drops everything a pod holds,
//! walking its per-shard lists: O(blocks the pod held). `retire_pod` does the same and marks
//! the pod id retired first, so a late event for it can no longer store anything: ids are
//! never reused, so the mark is permanent.
//!
//! `IndexTargets` (`targets`) says which index ids hold a pod's blocks when that is not just
//! its own id (one per data-parallel rank, publishers adopted after discovery listed them).

mod arena;
mod prefix;
mod registry;
mod shard;
mod snapshot;
mod table;
mod targets;
#[cfg(test)]
mod tests;

pub use prefix::{PodPrefix, PrefixMatch};
pub use snapshot::{SnapshotError, SnapshotStats};
pub use targets::IndexTargets;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use registry::Registry;
use shard::{BlockKey, Shard, GROUP_SLOTS};

/// Dense id handed out by the pod registry; a pod incarnation gets a fresh id, never reused.
pub type PodId = u32;
/// Model (+ LoRA adapter) scope, interned by the caller.
pub type ScopeId = u32;

/// Most pods the index tracks at once (retired pods do not count once cleared).
pub const MAX_PODS: usize = 1 << 13;
/// Upper bound on the shard count.
pub const MAX_SHARDS: usize = 1 << 12;
/// Smallest budget share a shard is given; fewer shards are used below it.
pub const MIN_SHARD_BUDGET: usize = 8 << 10;

/// Where a pod holds a block: its GPU block pool, or any offload medium (CPU, storage).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Tier {
    Gpu,
    Cpu,
}

impl Tier {
    /// The tier of an event's `medium`: absent (releases before 0.10.2) or `"GPU"` is the GPU
    /// pool; every other medium is an offload tier.
    pub fn from_medium(medium: Option<&str>) -> Self {
        match medium {
            None => Tier::Gpu,
            Some(m) if m.eq_ignore_ascii_case("gpu") => Tier::Gpu,
            Some(_) => Tier::Cpu,
        }
    }

    #[inline]
    fn bits(self) -> u32 {
        match self {
            Tier::Gpu => 1,
            Tier::Cpu => 2,
        }
    }
}

/// Index sizing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexConfig {
    /// Most bytes the block storage may take (exact accounting, see the module docs).
    pub budget_bytes: usize,
    /// Lock shards; rounded up to a power of two, at most `MAX_SHARDS`, and reduced so each
    /// shard gets at least `MIN_SHARD_BUDGET`.
    pub shards: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            budget_bytes: 1 << 30,
            shards: 256,
        }
    }
}

/// Counters and sizes of the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// (block, pod) pairs.
    pub entries: u64,
    /// Distinct (scope, block hash) keys.
    pub blocks: u64,
    /// Exact bytes of block storage (tables and arenas), always at most `budget_bytes`.
    pub bytes: usize,
    /// Exact bytes of the pod registry (maps, list heads, slot tags), outside the budget.
    pub registry_bytes: usize,
    /// Blocks evicted to stay within the budget.
    pub evicted_blocks: u64,
    /// (block, pod) pairs those evictions removed.
    pub evicted_entries: u64,
    /// Stores dropped because nothing could be evicted to make room.
    pub rejected: u64,
    pub budget_bytes: usize,
    pub shards: usize,
    /// Live (not retired) pods.
    pub pods: usize,
}

#[repr(align(128))]
struct Padded<T>(T);

/// Block hashes handled under one set of shard locks.
pub(super) const WINDOW: usize = 8;

/// Up to `WINDOW` keys with their shards, and those shards sorted and deduplicated (the lock
/// order: every path that holds several shard locks takes them in ascending order, and paths
/// that take one at a time hold no other, so no cycle can form).
#[derive(Default)]
struct Window {
    keys: [BlockKey; WINDOW],
    shard_of: [u16; WINDOW],
    blocks: usize,
    order: [u16; WINDOW],
    shards: usize,
}

impl Window {
    fn shard_at(&self, i: usize) -> Option<usize> {
        (i < self.shards).then(|| usize::from(self.order[i]))
    }

    /// Index into the lock array of block `j`'s shard.
    #[inline]
    fn guard_of(&self, j: usize) -> usize {
        let shard = self.shard_of[j];
        self.order[..self.shards]
            .iter()
            .position(|&s| s == shard)
            .unwrap_or(WINDOW)
    }
}

/// The block index. `Send + Sync`; share it as `Arc<BlockIndex>`.
pub struct BlockIndex {
    shards: Box<[Padded<RwLock<Shard>>]>,
    shard_mask: u64,
    seed: u64,
    registry: Registry,
    budget: usize,
}

/// Mixes scope and block hash into the table hash: low bits pick the home bucket, bits 32..
/// the shard, the top bits the bucket tag. Seeded per index so crafted hashes cannot pile up.
#[inline]
fn mix(seed: u64, scope: ScopeId, hash: u64) -> u64 {
    let mut x = hash ^ seed ^ u64::from(scope).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x = (x ^ (x >> 33)).wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

fn shard_count(cfg: &IndexConfig) -> usize {
    let mut shards = cfg.shards.clamp(1, MAX_SHARDS).next_power_of_two();
    while shards > 1 && cfg.budget_bytes / shards < MIN_SHARD_BUDGET {
        shards /= 2;
    }
    shards
}

impl BlockIndex {
    pub fn new(cfg: IndexConfig) -> Self {
        Self::with_seed(cfg, rand::random())
    }

    fn with_seed(cfg: IndexConfig, seed: u64) -> Self {
        let shards = shard_count(&cfg);
        let share = cfg.budget_bytes / shards;
        Self {
            shards: (0..shards)
                .map(|id| Padded(RwLock::new(Shard::new(id, seed, share))))
                .collect(),
            shard_mask: shards as u64 - 1,
            seed,
            registry: Registry::new(shards),
            budget: cfg.budget_bytes,
        }
    }

    /// Fills `w` with the keys and shards of up to `WINDOW` block hashes.
    #[inline]
    fn fill_window(&self, w: &mut Window, scope: ScopeId, hashes: &[u64]) {
        w.blocks = 0;
        w.shards = 0;
        for &hash in hashes.iter().take(WINDOW) {
            let mixed = mix(self.seed, scope, hash);
            let shard = ((mixed >> 32) & self.shard_mask) as u16;
            w.keys[w.blocks] = BlockKey { hash, scope, mixed };
            w.shard_of[w.blocks] = shard;
            w.blocks += 1;
            if w.order[..w.shards].contains(&shard) {
                continue;
            }
            let mut i = w.shards;
            while i > 0 && w.order[i - 1] > shard {
                w.order[i] = w.order[i - 1];
                i -= 1;
            }
            w.order[i] = shard;
            w.shards += 1;
        }
    }

    /// Write-locks the window's shards (ascending, like every multi-shard locker) and runs
    /// `f` on each block with its shard. Every block is probed first: with the locks already
    /// held those lookups are plain independent loads, so their cache misses overlap instead of
    /// being serialised by one lock acquisition per block.
    fn for_each_window_mut(
        &self,
        scope: ScopeId,
        hashes: &[u64],
        mut f: impl FnMut(&mut Shard, &BlockKey),
    ) {
        let mut w = Window::default();
        for chunk in hashes.chunks(WINDOW) {
            self.fill_window(&mut w, scope, chunk);
            let mut guards: [Option<RwLockWriteGuard<'_, Shard>>; WINDOW] =
                std::array::from_fn(|i| w.shard_at(i).map(|s| self.shards[s].0.write()));
            for j in 0..w.blocks {
                if let Some(shard) = guards[w.guard_of(j)].as_deref() {
                    std::hint::black_box(shard.find(&w.keys[j]));
                }
            }
            for j in 0..w.blocks {
                if let Some(shard) = guards[w.guard_of(j)].as_deref_mut() {
                    f(shard, &w.keys[j]);
                }
            }
        }
    }

    /// Records that `pod` holds `hashes` on `tier`. Idempotent; refreshes the blocks' recency.
    /// Ignored for a retired pod.
    pub fn store(&self, pod: PodId, scope: ScopeId, tier: Tier, hashes: &[u64]) {
        if hashes.is_empty() {
            return;
        }
        self.registry.with_pod(pod, true, |st, slot| {
            self.for_each_window_mut(scope, hashes, |shard, key| {
                shard.store(st, slot, tier.bits(), key);
            });
        });
    }

    /// Records that `pod` no longer holds `hashes` on `tier` (it may still hold them on the
    /// other). Several hashes per call cost less per hash than one call each.
    pub fn remove(&self, pod: PodId, scope: ScopeId, tier: Tier, hashes: &[u64]) {
        if hashes.is_empty() {
            return;
        }
        self.registry.with_pod(pod, false, |st, slot| {
            self.for_each_window_mut(scope, hashes, |shard, key| {
                shard.remove(st, slot, tier.bits(), key);
            });
        });
    }

    /// Drops every block `pod` holds (AllBlocksCleared, or an unrecoverable event gap).
    /// O(blocks the pod held); later stores for the pod are applied as usual.
    pub fn clear_pod(&self, pod: PodId) {
        self.registry.with_pod(pod, false, |st, slot| {
            for shard in self.shards.iter() {
                shard.0.write().clear_slot(st, slot);
            }
        });
    }

    /// The pod is gone: drops its blocks and ignores any later store for this id.
    pub fn retire_pod(&self, pod: PodId) {
        let Some(slot) = self.registry.retire(pod) else {
            return;
        };
        {
            let st = self.registry.read();
            for shard in self.shards.iter() {
                shard.0.write().clear_slot(&st, slot);
            }
        }
        self.registry.release(slot);
    }

    /// For each pod, how many leading blocks of `hashes` it holds consecutively (GPU tier and
    /// any tier). One pass from block 0, stopping when no pod matches any more. Allocation-free
    /// once `out` has seen the current number of pods. Shards are read-locked a window of
    /// blocks at a time (ascending), so the window's cache misses overlap.
    pub fn lookup(&self, scope: ScopeId, hashes: &[u64], out: &mut PrefixMatch) {
        out.begin(self.registry.high().div_ceil(GROUP_SLOTS));
        let mut scanned = 0;
        let mut w = Window::default();
        for chunk in hashes.chunks(WINDOW) {
            self.fill_window(&mut w, scope, chunk);
            {
                let guards: [Option<RwLockReadGuard<'_, Shard>>; WINDOW] =
                    std::array::from_fn(|i| w.shard_at(i).map(|s| self.shards[s].0.read()));
                // Find every node of the window, then read every holder set: each pass is a
                // run of independent loads, so the window's cache misses overlap.
                let mut nodes = [None; WINDOW];
                for (j, node) in nodes.iter_mut().enumerate().take(w.blocks) {
                    *node = guards[w.guard_of(j)]
                        .as_deref()
                        .and_then(|shard| shard.find(&w.keys[j]));
                }
                for (j, node) in nodes.iter().enumerate().take(w.blocks) {
                    if let (Some(shard), Some(node)) = (guards[w.guard_of(j)].as_deref(), node) {
                        shard.holders_into(*node, out.hold(j));
                    }
                }
            }
            for j in 0..w.blocks {
                if !out.advance(scanned, j, &self.registry) {
                    out.finish(scanned, &self.registry);
                    return;
                }
                scanned += 1;
            }
        }
        out.finish(scanned, &self.registry);
    }

    /// Every block `pod` holds, as (scope, tier, hash) — a block on both tiers is reported
    /// once per tier. Each shard is read-locked while it is walked.
    pub fn for_each_block_of(&self, pod: PodId, mut f: impl FnMut(ScopeId, Tier, u64)) {
        self.registry.with_pod(pod, false, |st, slot| {
            for shard in self.shards.iter() {
                shard
                    .0
                    .read()
                    .for_each_of_slot(st, slot, |scope, hash, tiers| {
                        for tier in [Tier::Gpu, Tier::Cpu] {
                            if tiers & tier.bits() != 0 {
                                f(scope, tier, hash);
                            }
                        }
                    });
            }
        });
    }

    /// Blocks `pod` holds (on any tier), over all scopes.
    pub fn pod_block_count(&self, pod: PodId) -> usize {
        self.registry
            .with_pod(pod, false, |st, slot| {
                st.heads(slot).iter().map(|h| h.live() as usize).sum()
            })
            .unwrap_or(0)
    }

    pub fn stats(&self) -> IndexStats {
        let mut stats = IndexStats {
            budget_bytes: self.budget,
            shards: self.shards.len(),
            registry_bytes: self.registry.bytes(),
            pods: self.registry.pods(),
            ..IndexStats::default()
        };
        for shard in self.shards.iter() {
            let s = shard.0.read().stats();
            stats.entries += s.entries;
            stats.blocks += s.blocks;
            stats.bytes += s.bytes;
            stats.evicted_blocks += s.evicted_blocks;
            stats.evicted_entries += s.evicted_entries;
            stats.rejected += s.rejected;
        }
        stats
    }
}

impl std::fmt::Debug for BlockIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockIndex")
            .field("stats", &self.stats())
            .finish()
    }
}
