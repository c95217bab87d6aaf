//! Result of a prefix lookup, reused across lookups so the hot path does not allocate.
//!
//! The scan keeps, per group of 32 pod slots, one word of (GPU-still-matching,
//! any-tier-still-matching) bit pairs, in the same pair layout as the shard's holder groups.
//! Each block then costs a few word operations per group: `alive &= held`, and every bit that
//! drops out records the block index at which that pod's run ended.

use super::registry::Registry;
use super::shard::{GPU_BITS, GROUP_SLOTS};
use super::{PodId, WINDOW};

/// How far one pod matches a request's block hashes, counted from block 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPrefix {
    /// Leading blocks the pod holds on its GPU tier, consecutively.
    pub gpu_blocks: u32,
    /// Leading blocks the pod holds on any tier (each block on GPU or on an offload tier).
    pub any_blocks: u32,
}

/// Per-pod prefix lengths from `BlockIndex::lookup`. Keep one per worker and pass it to every
/// lookup: its buffers grow to the number of pod slots once and are then reused.
#[derive(Default)]
pub struct PrefixMatch {
    groups: usize,
    alive: Vec<u64>,
    started: Vec<u64>,
    hold: Vec<u64>,
    /// Per bit position of the group words: where that pod's GPU / any-tier run ended.
    lens: Vec<u32>,
    /// Registry tag of each starting slot at block 0, to detect a slot changing pods mid-lookup.
    tags: Vec<u64>,
    results: Vec<(PodId, PodPrefix)>,
    longest: u32,
}

impl PrefixMatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the last result (a lookup does this itself).
    pub fn clear(&mut self) {
        self.results.clear();
        self.longest = 0;
    }

    /// Pods holding at least block 0, with their prefix lengths, in pod-slot order.
    pub fn iter(&self) -> impl Iterator<Item = (PodId, PodPrefix)> + '_ {
        self.results.iter().copied()
    }

    /// The prefix of `pod` (zero when it does not hold block 0).
    pub fn get(&self, pod: PodId) -> PodPrefix {
        self.results
            .iter()
            .find(|(p, _)| *p == pod)
            .map_or_else(PodPrefix::default, |(_, prefix)| *prefix)
    }

    /// The longest any-tier prefix over all pods, in blocks.
    pub fn longest(&self) -> usize {
        self.longest as usize
    }

    /// Pods in the result.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Starts a lookup over `groups` slot groups.
    pub(super) fn begin(&mut self, groups: usize) {
        self.clear();
        if self.alive.len() < groups {
            self.alive.resize(groups, 0);
            self.started.resize(groups, 0);
            self.hold.resize(groups * WINDOW, 0);
            self.lens.resize(groups * 2 * GROUP_SLOTS, 0);
            self.tags.resize(groups * GROUP_SLOTS, 0);
        }
        self.groups = groups;
        self.alive[..groups].fill(0);
        self.started[..groups].fill(0);
        self.hold[..groups * WINDOW].fill(0);
    }

    /// Where the shard ORs the holders of the window's block `row`.
    #[inline]
    pub(super) fn hold(&mut self, row: usize) -> &mut [u64] {
        &mut self.hold[row * self.groups..(row + 1) * self.groups]
    }

    /// Applies the holders of block `block` (from hold row `row`, which it clears). Returns
    /// whether any pod still matches.
    #[inline]
    pub(super) fn advance(&mut self, block: u32, row: usize, registry: &Registry) -> bool {
        let mut matching = false;
        for g in 0..self.groups {
            let h = std::mem::take(&mut self.hold[row * self.groups + g]);
            // GPU bits stay; the any bit of a pair is GPU | CPU.
            let held = (h & GPU_BITS) | (((h | (h >> 1)) & GPU_BITS) << 1);
            let base = g * 2 * GROUP_SLOTS;
            if block == 0 {
                if held == 0 {
                    continue;
                }
                self.alive[g] = held;
                self.started[g] = held;
                let mut pods = (held >> 1) & GPU_BITS;
                while pods != 0 {
                    let shift = pods.trailing_zeros() as usize;
                    pods &= pods - 1;
                    self.lens[base + shift] = 0;
                    self.lens[base + shift + 1] = 0;
                    let slot = g * GROUP_SLOTS + shift / 2;
                    self.tags[slot] = registry.tag(slot);
                }
                matching = true;
            } else {
                let alive = self.alive[g];
                if alive == 0 {
                    continue;
                }
                let mut dropped = alive & !held;
                while dropped != 0 {
                    let bit = dropped.trailing_zeros() as usize;
                    dropped &= dropped - 1;
                    self.lens[base + bit] = block;
                }
                self.alive[g] = alive & held;
                matching |= self.alive[g] != 0;
            }
        }
        matching
    }

    /// Closes the runs still open after `blocks` blocks and collects the per-pod results.
    pub(super) fn finish(&mut self, blocks: u32, registry: &Registry) {
        for g in 0..self.groups {
            let base = g * 2 * GROUP_SLOTS;
            let mut alive = std::mem::take(&mut self.alive[g]);
            while alive != 0 {
                let bit = alive.trailing_zeros() as usize;
                alive &= alive - 1;
                self.lens[base + bit] = blocks;
            }
            let mut pods = (self.started[g] >> 1) & GPU_BITS;
            while pods != 0 {
                let shift = pods.trailing_zeros() as usize;
                pods &= pods - 1;
                let slot = g * GROUP_SLOTS + shift / 2;
                let tag = self.tags[slot];
                // A slot retired (or retired and reused) during the lookup is left out.
                let Some(pod) = Registry::tag_pod(tag).filter(|_| registry.tag(slot) == tag) else {
                    continue;
                };
                let prefix = PodPrefix {
                    gpu_blocks: self.lens[base + shift],
                    any_blocks: self.lens[base + shift + 1],
                };
                self.longest = self.longest.max(prefix.any_blocks);
                self.results.push((pod, prefix));
            }
        }
    }
}
