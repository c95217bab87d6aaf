//! The pod's paged KV block pool with automatic prefix caching, shaped like
//! vLLM v1's `BlockPool`.
//!
//! Every physical block is either referenced by running requests (pinned) or
//! sits in one free queue ordered by eviction priority (head first). A freed
//! block keeps its cache key, so it can still be hit until it is handed out
//! again; handing it out evicts the key. All operations are O(1): the free
//! queue is a doubly-linked list threaded through the block table by index.

use hashbrown::HashMap;

/// End of the free queue.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Block {
    /// Prefix-cache key while this block is the registered copy of a full,
    /// computed block.
    key: Option<u64>,
    ref_count: u32,
    prev: u32,
    next: u32,
}

#[derive(Debug)]
pub(crate) struct BlockPool {
    blocks: Vec<Block>,
    cached: HashMap<u64, u32>,
    free_head: u32,
    free_tail: u32,
    free_len: u32,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks, all free and uncached. `num_blocks` must
    /// be below `u32::MAX` (the caller validates it).
    pub(crate) fn new(num_blocks: u32) -> Self {
        let blocks = (0..num_blocks)
            .map(|slot| Block {
                key: None,
                ref_count: 0,
                prev: if slot == 0 { NIL } else { slot - 1 },
                next: if slot + 1 == num_blocks {
                    NIL
                } else {
                    slot + 1
                },
            })
            .collect();
        Self {
            blocks,
            cached: HashMap::new(),
            free_head: if num_blocks == 0 { NIL } else { 0 },
            free_tail: num_blocks.checked_sub(1).unwrap_or(NIL),
            free_len: num_blocks,
        }
    }

    pub(crate) fn num_blocks(&self) -> u32 {
        self.free_len + self.num_used()
    }

    /// Blocks that can be handed out, cached ones included.
    pub(crate) fn num_free(&self) -> u32 {
        self.free_len
    }

    fn num_used(&self) -> u32 {
        u32::try_from(self.blocks.len()).unwrap_or(u32::MAX) - self.free_len
    }

    pub(crate) fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// The block holding `key`, if cached.
    pub(crate) fn lookup(&self, key: u64) -> Option<u32> {
        self.cached.get(&key).copied()
    }

    pub(crate) fn is_free(&self, slot: u32) -> bool {
        self.blocks[slot as usize].ref_count == 0
    }

    pub(crate) fn cached_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.cached.keys().copied()
    }

    /// Takes a reference on a cached block (a prefix hit), pulling it out of
    /// the free queue if nobody held it.
    pub(crate) fn touch(&mut self, slot: u32) {
        if self.blocks[slot as usize].ref_count == 0 {
            self.unlink(slot);
        }
        self.blocks[slot as usize].ref_count += 1;
    }

    /// Hands out the block at the head of the free queue with one reference.
    /// Returns it and the key it was evicted from, if it was cached.
    pub(crate) fn allocate(&mut self) -> Option<(u32, Option<u64>)> {
        let slot = self.free_head;
        if slot == NIL {
            return None;
        }
        self.unlink(slot);
        let block = &mut self.blocks[slot as usize];
        block.ref_count = 1;
        let evicted = block.key.take();
        if let Some(key) = evicted {
            self.cached.remove(&key);
        }
        Some((slot, evicted))
    }

    /// Drops one reference; the last one appends the block to the tail of the
    /// free queue (evicted last), keeping its key.
    pub(crate) fn release(&mut self, slot: u32) {
        let block = &mut self.blocks[slot as usize];
        block.ref_count = block.ref_count.saturating_sub(1);
        if block.ref_count == 0 {
            self.push_back(slot);
        }
    }

    /// Registers a just-computed full block under `key`. Returns false when
    /// another block already holds `key` (two requests computed the same
    /// block concurrently): this copy then stays private to its request.
    pub(crate) fn register(&mut self, slot: u32, key: u64) -> bool {
        match self.cached.entry(key) {
            hashbrown::hash_map::Entry::Occupied(_) => false,
            hashbrown::hash_map::Entry::Vacant(entry) => {
                entry.insert(slot);
                self.blocks[slot as usize].key = Some(key);
                true
            }
        }
    }

    /// Forgets every cached key, as vLLM's `reset_prefix_cache`: only when no
    /// block is in use. Returns whether it did.
    pub(crate) fn clear_cache(&mut self) -> bool {
        if self.num_used() != 0 {
            return false;
        }
        for block in &mut self.blocks {
            block.key = None;
        }
        self.cached.clear();
        true
    }

    fn unlink(&mut self, slot: u32) {
        let Block { prev, next, .. } = self.blocks[slot as usize];
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let block = &mut self.blocks[slot as usize];
        block.prev = NIL;
        block.next = NIL;
        self.free_len -= 1;
    }

    fn push_back(&mut self, slot: u32) {
        let tail = self.free_tail;
        {
            let block = &mut self.blocks[slot as usize];
            block.prev = tail;
            block.next = NIL;
        }
        if tail == NIL {
            self.free_head = slot;
        } else {
            self.blocks[tail as usize].next = slot;
        }
        self.free_tail = slot;
        self.free_len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_in_queue_order_and_evicts_lru_first() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate().map(|(slot, _)| slot);
        let b = pool.allocate().map(|(slot, _)| slot);
        assert_eq!((a, b), (Some(0), Some(1)));
        assert!(pool.register(0, 100));
        assert!(pool.register(1, 101));
        pool.release(1);
        pool.release(0);
        // Free queue: 2 (never used), 1, 0.
        assert_eq!(pool.allocate(), Some((2, None)));
        assert_eq!(pool.allocate(), Some((1, Some(101))));
        assert_eq!(pool.lookup(101), None);
        assert_eq!(pool.lookup(100), Some(0));
        assert_eq!(pool.allocate(), Some((0, Some(100))));
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.num_cached(), 0);
    }

    #[test]
    fn touching_a_free_cached_block_pins_it() {
        let mut pool = BlockPool::new(2);
        assert_eq!(pool.allocate(), Some((0, None)));
        assert!(pool.register(0, 7));
        pool.release(0);
        assert_eq!(pool.num_free(), 2);
        pool.touch(0);
        pool.touch(0);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.allocate(), Some((1, None)));
        assert_eq!(pool.allocate(), None);
        pool.release(0);
        assert!(!pool.is_free(0));
        pool.release(0);
        assert!(pool.is_free(0));
        assert_eq!(pool.allocate(), Some((0, Some(7))));
    }

    #[test]
    fn duplicate_keys_stay_private_and_clear_needs_an_idle_pool() {
        let mut pool = BlockPool::new(2);
        assert!(pool.allocate().is_some() && pool.allocate().is_some());
        assert!(pool.register(0, 9));
        assert!(!pool.register(1, 9));
        assert_eq!(pool.lookup(9), Some(0));
        assert!(!pool.clear_cache());
        pool.release(0);
        pool.release(1);
        assert!(pool.clear_cache());
        assert_eq!(pool.lookup(9), None);
        assert_eq!(pool.num_blocks(), 2);
    }
}
