//! Pod registry: maps each live pod id to a small slot, remembers retired ids (the epoch rule),
//! and owns the per-(pod, shard) list heads.
//!
//! Slots, not pod ids, are what the block nodes store: 13 bits, reused once a retired pod's
//! entries are all gone, so pod ids can grow without bound while the node encoding and the
//! lookup bitsets stay small and dense. Lookups never take the registry lock: they read the
//! slot → pod mapping from atomics and check at the end that a slot was not handed to another
//! pod in the meantime.
//!
//! Writers (store, remove, clear) hold the registry read lock for a whole call. Retiring takes
//! the write lock once to mark the id retired and unmap it, which waits out every store already
//! in flight for that pod; any later store for the id sees the mark and is dropped. The slot is
//! cleared shard by shard without the write lock and only then freed for reuse.

use super::{PodId, MAX_PODS};
use hashbrown::{HashMap, HashSet};
use parking_lot::{RwLock, RwLockReadGuard, RwLockUpgradableReadGuard};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Where one pod's list of held blocks in one shard starts. Mutated only under that shard's
/// write lock; atomics (relaxed) because the heads live here, shared under the registry lock.
#[derive(Default)]
pub(super) struct ListHead {
    /// First (partly filled) chunk as `cell + 1`; 0 when the list is empty.
    pub(super) head: AtomicU32,
    /// Entries in the list, stale ones included.
    pub(super) len: AtomicU32,
    /// Blocks of this shard the pod holds (exact).
    pub(super) live: AtomicU32,
}

impl ListHead {
    pub(super) fn head(&self) -> u32 {
        self.head.load(Ordering::Relaxed)
    }
    pub(super) fn len(&self) -> u32 {
        self.len.load(Ordering::Relaxed)
    }
    pub(super) fn live(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }
    pub(super) fn set(&self, head: u32, len: u32) {
        self.head.store(head, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
    }
    pub(super) fn add_live(&self, delta: i32) {
        let live = self.live().wrapping_add_signed(delta);
        self.live.store(live, Ordering::Relaxed);
    }
}

pub(super) struct RegistryState {
    by_pod: HashMap<PodId, u16>,
    retired: HashSet<PodId>,
    used: Vec<u64>,
    /// Per slot, one list head per shard.
    lists: Vec<Box<[ListHead]>>,
}

impl RegistryState {
    /// Heads of `slot` in every shard; the slot must be allocated (a node or a list refers to it).
    #[inline]
    pub(super) fn heads(&self, slot: u16) -> &[ListHead] {
        &self.lists[usize::from(slot)]
    }

    /// Allocated slots and their heads.
    #[cfg(test)]
    pub(super) fn slots(&self) -> impl Iterator<Item = (u16, &[ListHead])> {
        self.lists
            .iter()
            .enumerate()
            .map(|(slot, heads)| (slot as u16, &heads[..]))
    }

    fn lowest_free_slot(&self) -> Option<u16> {
        self.used
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)
            .map(|(i, w)| (i * 64 + w.trailing_ones() as usize) as u16)
    }

    fn bytes(&self, shards: usize) -> usize {
        self.by_pod.allocation_size()
            + self.retired.allocation_size()
            + self.used.capacity() * 8
            + self.lists.capacity() * std::mem::size_of::<Box<[ListHead]>>()
            + self.lists.len() * shards * std::mem::size_of::<ListHead>()
    }
}

pub(super) struct Registry {
    state: RwLock<RegistryState>,
    /// Per slot: `1 << 32 | pod` while a live pod has it, 0 otherwise.
    tags: Box<[AtomicU64]>,
    /// One past the highest slot ever handed out.
    high: AtomicU32,
    shards: usize,
}

const LIVE: u64 = 1 << 32;

impl Registry {
    pub(super) fn new(shards: usize) -> Self {
        Self {
            state: RwLock::new(RegistryState {
                by_pod: HashMap::new(),
                retired: HashSet::new(),
                used: vec![0; MAX_PODS / 64],
                lists: Vec::new(),
            }),
            tags: (0..MAX_PODS).map(|_| AtomicU64::new(0)).collect(),
            high: AtomicU32::new(0),
            shards,
        }
    }

    /// Runs `f` with the pod's slot while holding the read lock, registering the pod first if
    /// `register` is set. None when the pod is retired, unknown (and not registered), or no
    /// slot is free.
    pub(super) fn with_pod<R>(
        &self,
        pod: PodId,
        register: bool,
        f: impl FnOnce(&RegistryState, u16) -> R,
    ) -> Option<R> {
        {
            let state = self.state.read();
            if let Some(&slot) = state.by_pod.get(&pod) {
                return Some(f(&state, slot));
            }
            if !register || state.retired.contains(&pod) {
                return None;
            }
        }
        let state = self.state.upgradable_read();
        if state.retired.contains(&pod) {
            return None;
        }
        if let Some(&slot) = state.by_pod.get(&pod) {
            let state = RwLockUpgradableReadGuard::downgrade(state);
            return Some(f(&state, slot));
        }
        let mut state = RwLockUpgradableReadGuard::upgrade(state);
        let Some(slot) = state.lowest_free_slot() else {
            tracing::warn!(
                pod,
                max_pods = MAX_PODS,
                "block index: every pod slot is taken; this pod's blocks are not indexed"
            );
            return None;
        };
        let index = usize::from(slot);
        state.used[index / 64] |= 1 << (index % 64);
        while state.lists.len() <= index {
            let heads = (0..self.shards).map(|_| ListHead::default()).collect();
            state.lists.push(heads);
        }
        state.by_pod.insert(pod, slot);
        self.tags[index].store(LIVE | u64::from(pod), Ordering::Release);
        self.high.fetch_max(u32::from(slot) + 1, Ordering::Release);
        let state = parking_lot::RwLockWriteGuard::downgrade(state);
        Some(f(&state, slot))
    }

    /// Marks `pod` retired and unmaps it; returns its slot, which the caller clears and then
    /// hands to `release`. None when the pod had no slot (it is still marked retired).
    pub(super) fn retire(&self, pod: PodId) -> Option<u16> {
        let mut state = self.state.write();
        state.retired.insert(pod);
        let slot = state.by_pod.remove(&pod)?;
        self.tags[usize::from(slot)].store(0, Ordering::Release);
        Some(slot)
    }

    /// Frees a retired pod's slot once its entries are gone from every shard.
    pub(super) fn release(&self, slot: u16) {
        let mut state = self.state.write();
        let index = usize::from(slot);
        state.used[index / 64] &= !(1 << (index % 64));
    }

    pub(super) fn read(&self) -> RwLockReadGuard<'_, RegistryState> {
        self.state.read()
    }

    /// The tag of `slot` (`1 << 32 | pod` while live, else 0); lock-free, for lookups.
    #[inline]
    pub(super) fn tag(&self, slot: usize) -> u64 {
        self.tags.get(slot).map_or(0, |t| t.load(Ordering::Acquire))
    }

    /// The pod a tag names, if it is live.
    #[inline]
    pub(super) fn tag_pod(tag: u64) -> Option<PodId> {
        (tag & LIVE != 0).then_some(tag as PodId)
    }

    /// One past the highest slot ever handed out.
    #[inline]
    pub(super) fn high(&self) -> usize {
        self.high.load(Ordering::Acquire) as usize
    }

    /// Live (not retired) pods.
    pub(super) fn pods(&self) -> usize {
        self.state.read().by_pod.len()
    }

    /// Exact bytes of the registry's own allocations (id maps, slot bitmap, list heads).
    pub(super) fn bytes(&self) -> usize {
        self.state.read().bytes(self.shards) + self.tags.len() * std::mem::size_of::<AtomicU64>()
    }
}
