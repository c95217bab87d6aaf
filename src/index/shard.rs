//! One shard of the index: a slot table and a cell arena behind one lock.
//!
//! Cell layouts (see `arena::Cell`):
//! * block node: `wide` = block hash, `mid` = scope, `link` = holder word;
//! * holder group (a node with more than two holders): `wide` = 32 slots × (GPU bit, CPU bit),
//!   bit `2k` for GPU and `2k + 1` for CPU of slot `32 * group + k`; `mid` = group;
//!   `link` = next group cell + 1 (0 ends the chain);
//! * pod-list chunk: three node cells (`wide` low, `wide` high, `mid`), `link` = next chunk + 1.
//!
//! The holder word: bit 31 set means overflow (bits 0..30 = first group cell + 1); otherwise
//! bits 0..15 and 15..30 are two inline holder refs, `slot << 2 | tiers`, 0 meaning empty.
//! Bit 30 is the eviction clock's "stored since the hand last passed" flag in both forms.
//!
//! Each pod keeps, per shard, a list of the node cells it was added to (heads in the registry).
//! Entries go stale when the pod loses the block (removal, eviction); clearing a pod walks its
//! list and skips stale entries, so it costs O(blocks the pod held). Whenever a list gains a
//! stale entry or grows, it is compacted if more than about half of it is stale, which keeps
//! every list under `2 * live + 6` entries.
//!
//! Budget: all memory is the table's buckets plus the arena's pages. Growth of either is only
//! done when it fits the shard's share of the budget; otherwise the shard evicts blocks, the
//! least recently stored first as approximated by a second-chance clock over the table buckets.
//! Every eviction frees at least the node's cell, which any later need can reuse, so making
//! room always succeeds while anything is left to evict.

use super::arena::{Cell, CellArena};
use super::mix;
use super::registry::{ListHead, RegistryState};
use super::table::{SlotTable, BUCKET_BYTES};

const OVERFLOW: u32 = 1 << 31;
const RECENT: u32 = 1 << 30;
const REF_BITS: u32 = 15;
const REF_MASK: u32 = (1 << REF_BITS) - 1;
const CHAIN_MASK: u32 = (1 << 30) - 1;
/// Pod slots covered by one holder group (and one lookup bitset word).
pub(super) const GROUP_SLOTS: usize = 32;
const LIST_CHUNK: u32 = 3;
/// Pair mask: the GPU bit of every slot in a group word.
pub(super) const GPU_BITS: u64 = 0x5555_5555_5555_5555;

/// A block key with its mixed hash (which picked the shard and is the table hash).
#[derive(Clone, Copy, Default)]
pub(super) struct BlockKey {
    pub(super) hash: u64,
    pub(super) scope: u32,
    pub(super) mixed: u64,
}

#[inline]
fn refs(link: u32) -> [u32; 2] {
    [link & REF_MASK, (link >> REF_BITS) & REF_MASK]
}

#[inline]
fn make_ref(slot: u16, tiers: u32) -> u32 {
    (u32::from(slot) << 2) | tiers
}

#[inline]
fn ref_slot(r: u32) -> u16 {
    (r >> 2) as u16
}

#[inline]
fn inline_link(a: u32, b: u32, recent: u32) -> u32 {
    a | (b << REF_BITS) | recent
}

#[inline]
fn group_of(slot: u16) -> u32 {
    u32::from(slot) / GROUP_SLOTS as u32
}

#[inline]
fn pair_shift(slot: u16) -> u32 {
    2 * (u32::from(slot) % GROUP_SLOTS as u32)
}

/// Occupied (slot, tiers) pairs of one group word.
fn group_pairs(group: u32, bits: u64) -> impl Iterator<Item = (u16, u32)> {
    let mut held = (bits | (bits >> 1)) & GPU_BITS;
    std::iter::from_fn(move || {
        if held == 0 {
            return None;
        }
        let shift = held.trailing_zeros();
        held &= held - 1;
        let slot = group * GROUP_SLOTS as u32 + shift / 2;
        Some((slot as u16, ((bits >> shift) & 3) as u32))
    })
}

/// Counters a shard reports.
#[derive(Default, Clone, Copy)]
pub(super) struct ShardStats {
    pub(super) blocks: u64,
    pub(super) entries: u64,
    pub(super) bytes: usize,
    pub(super) evicted_blocks: u64,
    pub(super) evicted_entries: u64,
    pub(super) rejected: u64,
}

pub(super) struct Shard {
    /// Position of this shard, which picks its head in each pod's per-shard list heads.
    id: usize,
    seed: u64,
    budget: usize,
    table: SlotTable,
    cells: CellArena,
    /// Eviction clock position (a table bucket).
    hand: usize,
    entries: u64,
    evicted_blocks: u64,
    evicted_entries: u64,
    rejected: u64,
}

impl Shard {
    pub(super) fn new(id: usize, seed: u64, budget: usize) -> Self {
        Self {
            id,
            seed,
            budget,
            table: SlotTable::new(),
            cells: CellArena::new(),
            hand: 0,
            entries: 0,
            evicted_blocks: 0,
            evicted_entries: 0,
            rejected: 0,
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.table.bytes() + self.cells.bytes()
    }

    pub(super) fn stats(&self) -> ShardStats {
        ShardStats {
            blocks: self.table.len() as u64,
            entries: self.entries,
            bytes: self.bytes(),
            evicted_blocks: self.evicted_blocks,
            evicted_entries: self.evicted_entries,
            rejected: self.rejected,
        }
    }

    /// The node cell of `key`, if indexed.
    #[inline]
    pub(super) fn find(&self, key: &BlockKey) -> Option<u32> {
        let cells = &self.cells;
        self.table.find(key.mixed, |c| {
            let node = cells.get(c);
            node.wide == key.hash && node.mid == key.scope
        })
    }

    /// ORs the holders of the block at `node` into `hold` (one word per group, groups past its
    /// end ignored).
    #[inline]
    pub(super) fn holders_into(&self, node: u32, hold: &mut [u64]) {
        let link = self.cells.get(node).link;
        if link & OVERFLOW == 0 {
            for r in refs(link).into_iter().filter(|&r| r != 0) {
                let slot = ref_slot(r);
                if let Some(word) = hold.get_mut(group_of(slot) as usize) {
                    *word |= u64::from(r & 3) << pair_shift(slot);
                }
            }
        } else {
            let mut next = link & CHAIN_MASK;
            while next != 0 {
                let group = self.cells.get(next - 1);
                if let Some(word) = hold.get_mut(group.mid as usize) {
                    *word |= group.wide;
                }
                next = group.link;
            }
        }
    }

    /// The group cell for `group` in the chain starting at `next` (cell + 1).
    fn group_cell(&self, mut next: u32, group: u32) -> Option<u32> {
        while next != 0 {
            let cell = self.cells.get(next - 1);
            if cell.mid == group {
                return Some(next - 1);
            }
            next = cell.link;
        }
        None
    }

    /// Tiers `slot` holds at a node whose holder word is `link` (0 if it is not a holder).
    fn tiers_of(&self, link: u32, slot: u16) -> u32 {
        if link & OVERFLOW == 0 {
            refs(link)
                .into_iter()
                .find(|&r| r != 0 && ref_slot(r) == slot)
                .map_or(0, |r| r & 3)
        } else {
            self.group_cell(link & CHAIN_MASK, group_of(slot))
                .map_or(0, |g| {
                    ((self.cells.get(g).wide >> pair_shift(slot)) & 3) as u32
                })
        }
    }

    fn for_each_holder(&self, link: u32, mut f: impl FnMut(u16, u32)) {
        if link & OVERFLOW == 0 {
            for r in refs(link).into_iter().filter(|&r| r != 0) {
                f(ref_slot(r), r & 3);
            }
        } else {
            let mut next = link & CHAIN_MASK;
            while next != 0 {
                let group = *self.cells.get(next - 1);
                for (slot, tiers) in group_pairs(group.mid, group.wide) {
                    f(slot, tiers);
                }
                next = group.link;
            }
        }
    }

    /// Every block of the shard with its holders as (slot, tiers), in arena order; for
    /// snapshots.
    pub(super) fn for_each_block(&self, mut f: impl FnMut(u32, u64, &[(u16, u32)])) {
        let mut holders = Vec::new();
        for (_, cell) in self.cells.nodes() {
            holders.clear();
            self.for_each_holder(cell.link, |slot, tiers| holders.push((slot, tiers)));
            f(cell.mid, cell.wide, &holders);
        }
    }

    /// Every block `slot` holds in this shard, as (scope, hash, tiers), by walking the pod's
    /// list (O(blocks it holds)); for handing one pod's entries to another kvgate replica.
    pub(super) fn for_each_of_slot(
        &self,
        st: &RegistryState,
        slot: u16,
        mut f: impl FnMut(u32, u64, u32),
    ) {
        let head = &st.heads(slot)[self.id];
        let mut next = head.head();
        let mut fill = fill_of_first_chunk(head.len());
        while next != 0 {
            let chunk = *self.cells.get(next - 1);
            for entry in chunk_entries(&chunk).into_iter().take(fill) {
                if !self.cells.is_node(entry) {
                    continue;
                }
                let node = self.cells.get(entry);
                let tiers = self.tiers_of(node.link, slot);
                if tiers != 0 {
                    f(node.mid, node.wide, tiers);
                }
            }
            fill = LIST_CHUNK as usize;
            next = chunk.link;
        }
    }

    /// Changes the tiers of an existing holder (`tiers` non-zero).
    fn set_tiers(&mut self, node: u32, slot: u16, tiers: u32) {
        let link = self.cells.get(node).link;
        if link & OVERFLOW == 0 {
            let [a, b] = refs(link);
            let (a, b) = if a != 0 && ref_slot(a) == slot {
                (make_ref(slot, tiers), b)
            } else {
                (a, make_ref(slot, tiers))
            };
            self.cells.get_mut(node).link = inline_link(a, b, link & RECENT);
        } else if let Some(g) = self.group_cell(link & CHAIN_MASK, group_of(slot)) {
            let shift = pair_shift(slot);
            let cell = self.cells.get_mut(g);
            cell.wide = (cell.wide & !(3 << shift)) | (u64::from(tiers) << shift);
        }
    }

    /// Cells needed to add `slot` as a new holder of a node whose holder word is `link`.
    fn cells_to_add(&self, link: u32, slot: u16) -> usize {
        if link & OVERFLOW == 0 {
            let [a, b] = refs(link);
            if a == 0 || b == 0 {
                return 0;
            }
            let (ga, gb, gs) = (group_of(ref_slot(a)), group_of(ref_slot(b)), group_of(slot));
            1 + usize::from(gb != ga) + usize::from(gs != ga && gs != gb)
        } else {
            usize::from(self.group_cell(link & CHAIN_MASK, group_of(slot)).is_none())
        }
    }

    /// Sets `slot`'s tiers in the group chain `first` (cell + 1, 0 = empty), adding a group
    /// cell when needed. Returns the chain's head, or None when no cell was available.
    fn put_in_groups(&mut self, first: u32, slot: u16, tiers: u32) -> Option<u32> {
        if let Some(g) = self.group_cell(first, group_of(slot)) {
            self.cells.get_mut(g).wide |= u64::from(tiers) << pair_shift(slot);
            return Some(first);
        }
        let cell = self.cells.alloc()?;
        *self.cells.get_mut(cell) = Cell {
            wide: u64::from(tiers) << pair_shift(slot),
            mid: group_of(slot),
            link: first,
        };
        Some(cell + 1)
    }

    fn free_groups(&mut self, mut next: u32) {
        while next != 0 {
            let cell = next - 1;
            next = self.cells.get(cell).link;
            self.cells.free(cell);
        }
    }

    /// Adds `slot` as a holder of `node` (the caller reserved `cells_to_add` cells). Returns
    /// false, changing nothing, if a cell was missing after all.
    fn add_holder(&mut self, node: u32, slot: u16, tiers: u32) -> bool {
        let link = self.cells.get(node).link;
        let new = make_ref(slot, tiers);
        if link & OVERFLOW == 0 {
            let [a, b] = refs(link);
            let link = match (a, b) {
                (0, b) => inline_link(new, b, RECENT),
                (a, 0) => inline_link(a, new, RECENT),
                (a, b) => {
                    let mut first = 0;
                    for r in [a, b, new] {
                        match self.put_in_groups(first, ref_slot(r), r & 3) {
                            Some(head) => first = head,
                            None => {
                                self.free_groups(first);
                                return false;
                            }
                        }
                    }
                    OVERFLOW | RECENT | first
                }
            };
            self.cells.get_mut(node).link = link;
        } else {
            let Some(first) = self.put_in_groups(link & CHAIN_MASK, slot, tiers) else {
                return false;
            };
            self.cells.get_mut(node).link = OVERFLOW | RECENT | first;
        }
        true
    }

    /// Removes `slot` from `node`'s holders, dropping the node when it was the last one and
    /// going back to the inline form when at most two holders remain.
    fn remove_holder(&mut self, st: &RegistryState, node: u32, slot: u16) {
        let link = self.cells.get(node).link;
        if link & OVERFLOW == 0 {
            let [a, b] = refs(link).map(|r| if r != 0 && ref_slot(r) == slot { 0 } else { r });
            if a == 0 && b == 0 {
                self.drop_node(node);
            } else {
                self.cells.get_mut(node).link = inline_link(a, b, link & RECENT);
            }
        } else {
            let first = self.unlink_from_groups(link & CHAIN_MASK, slot);
            let mut kept = [0u32; 3];
            let mut count = 0;
            self.for_each_holder(OVERFLOW | first, |s, tiers| {
                if count < kept.len() {
                    kept[count] = make_ref(s, tiers);
                }
                count += 1;
            });
            let link = if count <= 2 {
                self.free_groups(first);
                inline_link(kept[0], kept[1], link & RECENT)
            } else {
                OVERFLOW | (link & RECENT) | first
            };
            self.cells.get_mut(node).link = link;
        }
        st.heads(slot)[self.id].add_live(-1);
        self.entries -= 1;
    }

    /// Clears `slot` in the chain `first`, freeing its group cell if it becomes empty.
    /// Returns the chain's head.
    fn unlink_from_groups(&mut self, first: u32, slot: u16) -> u32 {
        let group = group_of(slot);
        let mut prev: Option<u32> = None;
        let mut next = first;
        while next != 0 {
            let cell = next - 1;
            let current = *self.cells.get(cell);
            if current.mid == group {
                let bits = current.wide & !(3 << pair_shift(slot));
                if bits != 0 {
                    self.cells.get_mut(cell).wide = bits;
                    return first;
                }
                self.cells.free(cell);
                return match prev {
                    None => current.link,
                    Some(p) => {
                        self.cells.get_mut(p).link = current.link;
                        first
                    }
                };
            }
            prev = Some(cell);
            next = current.link;
        }
        first
    }

    /// Deletes a node that has no holders left.
    fn drop_node(&mut self, node: u32) {
        let cell = *self.cells.get(node);
        self.table.remove(mix(self.seed, cell.mid, cell.wide), node);
        self.cells.free(node);
    }

    /// Evicts a whole block: every holder loses it.
    fn evict(&mut self, st: &RegistryState, node: u32) {
        let cell = *self.cells.get(node);
        let mut holders = 0;
        self.for_each_holder(cell.link, |slot, _| {
            st.heads(slot)[self.id].add_live(-1);
            holders += 1;
        });
        self.table.remove(mix(self.seed, cell.mid, cell.wide), node);
        self.cells.free(node);
        self.entries -= holders;
        self.evicted_entries += holders;
        self.evicted_blocks += 1;
        // The group cells are still allocated here, so compaction cannot hand them out.
        if cell.link & OVERFLOW == 0 {
            for r in refs(cell.link).into_iter().filter(|&r| r != 0) {
                self.compact_if_stale(ref_slot(r), &st.heads(ref_slot(r))[self.id]);
            }
        } else {
            let mut next = cell.link & CHAIN_MASK;
            while next != 0 {
                let group = *self.cells.get(next - 1);
                for (slot, _) in group_pairs(group.mid, group.wide) {
                    self.compact_if_stale(slot, &st.heads(slot)[self.id]);
                }
                next = group.link;
            }
            self.free_groups(cell.link & CHAIN_MASK);
        }
    }

    /// Second-chance clock over the table buckets: a block stored since the hand last passed
    /// gets its flag cleared and is skipped once. Never picks `protect`.
    fn clock_victim(&mut self, protect: Option<u32>) -> Option<u32> {
        let buckets = self.table.buckets();
        if self.table.len() == 0 {
            return None;
        }
        for _ in 0..=2 * buckets {
            let pos = self.hand % buckets;
            self.hand = pos + 1;
            let Some(node) = self.table.cell_at(pos) else {
                continue;
            };
            if Some(node) == protect {
                continue;
            }
            let cell = self.cells.get_mut(node);
            if cell.link & RECENT != 0 {
                cell.link &= !RECENT;
                continue;
            }
            // Removing the entry shifts its successor into `pos`: look there next.
            self.hand = pos;
            return Some(node);
        }
        None
    }

    /// Doubles the table. The nodes are read in arena order, a sequential scan, rather than
    /// through the old buckets (a random read per block): this is the longest a writer holds
    /// the shard lock, so it is kept short.
    fn grow_table(&mut self) {
        let buckets = self.table.grown_buckets();
        let (cells, seed) = (&self.cells, self.seed);
        self.table.resize(buckets, || {
            cells
                .nodes()
                .map(|(c, node)| (mix(seed, node.mid, node.wide), c))
        });
        self.hand = 0;
    }

    /// Makes `cells` arena cells available and, with `insert`, room for that key in the table:
    /// by growing within the budget, else by evicting. False when nothing is left to evict (the
    /// caller drops the store).
    fn reserve(
        &mut self,
        st: &RegistryState,
        cells: usize,
        insert: Option<u64>,
        protect: Option<u32>,
    ) -> bool {
        loop {
            let table_ok = insert.is_none_or(|h| self.table.can_insert(h));
            let cells_ok = self.cells.available() >= cells;
            if table_ok && cells_ok {
                return true;
            }
            let table_growth = if table_ok {
                0
            } else {
                (self.table.grown_buckets() - self.table.buckets()) * BUCKET_BYTES
            };
            let cell_growth = if cells_ok {
                Some(0)
            } else {
                self.cells.growth_bytes(cells)
            };
            if let Some(cell_growth) = cell_growth {
                if self.bytes() + table_growth + cell_growth <= self.budget {
                    if !table_ok {
                        self.grow_table();
                    }
                    if !cells_ok {
                        self.cells.grow(cells);
                    }
                    continue;
                }
            }
            if !table_ok && self.table.has_room() {
                // A displacement overflow, not load: evicting arbitrary blocks would not help.
                return false;
            }
            match self.clock_victim(protect) {
                Some(victim) => self.evict(st, victim),
                None => return false,
            }
        }
    }

    /// Stores `slot` as a holder of `key` on `tiers` (idempotent; marks the block recent).
    pub(super) fn store(&mut self, st: &RegistryState, slot: u16, tiers: u32, key: &BlockKey) {
        let head = &st.heads(slot)[self.id];
        let node = match self.find(key) {
            Some(node) => {
                let link = self.cells.get(node).link;
                let held = self.tiers_of(link, slot);
                if held != 0 {
                    if held | tiers != held {
                        self.set_tiers(node, slot, held | tiers);
                    }
                    self.cells.get_mut(node).link |= RECENT;
                    return;
                }
                self.compact_if_stale(slot, head);
                let need = self.cells_to_add(link, slot) + usize::from(list_needs_cell(head));
                if !self.reserve(st, need, None, Some(node)) || !self.add_holder(node, slot, tiers)
                {
                    self.rejected += 1;
                    return;
                }
                node
            }
            None => {
                self.compact_if_stale(slot, head);
                let need = 1 + usize::from(list_needs_cell(head));
                if !self.reserve(st, need, Some(key.mixed), None) {
                    self.rejected += 1;
                    return;
                }
                let Some(node) = self.cells.alloc() else {
                    self.rejected += 1;
                    return;
                };
                *self.cells.get_mut(node) = Cell {
                    wide: key.hash,
                    mid: key.scope,
                    link: RECENT | make_ref(slot, tiers),
                };
                self.cells.set_node(node, true);
                if !self.table.insert(key.mixed, node) {
                    self.cells.free(node);
                    self.rejected += 1;
                    return;
                }
                node
            }
        };
        head.add_live(1);
        self.entries += 1;
        if !self.list_push(head, node) {
            // Unreachable after a successful reserve; undo rather than hold an unlisted entry.
            self.remove_holder(st, node, slot);
            self.rejected += 1;
        }
    }

    /// Removes `tiers` from `slot`'s hold on `key`; the entry goes when no tier is left.
    pub(super) fn remove(&mut self, st: &RegistryState, slot: u16, tiers: u32, key: &BlockKey) {
        let Some(node) = self.find(key) else {
            return;
        };
        let held = self.tiers_of(self.cells.get(node).link, slot);
        if held & tiers == 0 {
            return;
        }
        let left = held & !tiers;
        if left != 0 {
            self.set_tiers(node, slot, left);
        } else {
            self.remove_holder(st, node, slot);
            self.compact_if_stale(slot, &st.heads(slot)[self.id]);
        }
    }

    /// Drops every block `slot` holds in this shard, walking its list: O(list length).
    pub(super) fn clear_slot(&mut self, st: &RegistryState, slot: u16) {
        let head = &st.heads(slot)[self.id];
        let mut next = head.head();
        let mut fill = fill_of_first_chunk(head.len());
        while next != 0 {
            let chunk = *self.cells.get(next - 1);
            for entry in chunk_entries(&chunk).into_iter().take(fill) {
                if self.cells.is_node(entry) && self.tiers_of(self.cells.get(entry).link, slot) != 0
                {
                    self.remove_holder(st, entry, slot);
                }
            }
            fill = LIST_CHUNK as usize;
            next = chunk.link;
        }
        self.free_list(head);
        debug_assert_eq!(
            head.live(),
            0,
            "a held block was missing from the pod's list"
        );
        head.live.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn free_list(&mut self, head: &ListHead) {
        let mut next = head.head();
        while next != 0 {
            let cell = next - 1;
            next = self.cells.get(cell).link;
            self.cells.free(cell);
        }
        head.set(0, 0);
    }

    /// Appends `node` to a pod list. False when a needed chunk cell was not available.
    fn list_push(&mut self, head: &ListHead, node: u32) -> bool {
        let len = head.len();
        let mut first = head.head();
        if len % LIST_CHUNK == 0 {
            let Some(cell) = self.cells.alloc() else {
                return false;
            };
            self.cells.get_mut(cell).link = first;
            first = cell + 1;
        }
        let chunk = self.cells.get_mut(first - 1);
        match len % LIST_CHUNK {
            0 => chunk.wide = u64::from(node),
            1 => chunk.wide |= u64::from(node) << 32,
            _ => chunk.mid = node,
        }
        head.set(first, len + 1);
        true
    }

    fn compact_if_stale(&mut self, slot: u16, head: &ListHead) {
        if head.len() >= 2 * head.live() + 2 * LIST_CHUNK {
            self.compact(slot, head);
        }
    }

    /// Rewrites a pod list with only the blocks it still holds, once each.
    fn compact(&mut self, slot: u16, head: &ListHead) {
        let mut entries = Vec::with_capacity(head.len() as usize);
        let mut next = head.head();
        let mut fill = fill_of_first_chunk(head.len());
        while next != 0 {
            let chunk = *self.cells.get(next - 1);
            entries.extend(chunk_entries(&chunk).into_iter().take(fill));
            fill = LIST_CHUNK as usize;
            next = chunk.link;
        }
        self.free_list(head);
        // Sorted first, so the nodes are checked in address order, each once.
        entries.sort_unstable();
        entries.dedup();
        entries.retain(|&node| {
            self.cells.is_node(node) && self.tiers_of(self.cells.get(node).link, slot) != 0
        });
        for node in entries {
            // The cells just freed cover the shorter list.
            let pushed = self.list_push(head, node);
            debug_assert!(pushed);
        }
    }
}

fn list_needs_cell(head: &ListHead) -> bool {
    head.len() % LIST_CHUNK == 0
}

fn fill_of_first_chunk(len: u32) -> usize {
    if len == 0 {
        0
    } else {
        ((len - 1) % LIST_CHUNK + 1) as usize
    }
}

fn chunk_entries(chunk: &Cell) -> [u32; 3] {
    [chunk.wide as u32, (chunk.wide >> 32) as u32, chunk.mid]
}

#[cfg(test)]
pub(super) mod audit {
    //! Consistency checks of a shard against its own invariants, for tests.

    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Holders of one block as the shard stores them: (scope, hash) → slot → tiers.
    pub(crate) type Contents = BTreeMap<(u32, u64), BTreeMap<u16, u32>>;

    impl Shard {
        /// Checks every invariant and returns the shard's contents.
        pub(crate) fn audit(&self, st: &RegistryState) -> Contents {
            let mut contents = Contents::new();
            let mut group_cells = 0;
            let mut held_by: BTreeMap<u16, BTreeSet<u32>> = BTreeMap::new();
            let cells: Vec<u32> = self.table.cells().collect();
            assert_eq!(cells.len(), self.table.len());
            assert_eq!(
                self.cells.node_cells(),
                cells.len(),
                "node marks match the table"
            );
            for &node in &cells {
                assert!(self.cells.is_node(node));
                let cell = *self.cells.get(node);
                let key = BlockKey {
                    hash: cell.wide,
                    scope: cell.mid,
                    mixed: mix(self.seed, cell.mid, cell.wide),
                };
                assert_eq!(
                    self.find(&key),
                    Some(node),
                    "every node is reachable by its key"
                );
                let mut holders = BTreeMap::new();
                self.for_each_holder(cell.link, |slot, tiers| {
                    assert!(tiers != 0 && tiers <= 3);
                    assert!(
                        holders.insert(slot, tiers).is_none(),
                        "a holder appears once"
                    );
                    held_by.entry(slot).or_default().insert(node);
                });
                assert!(!holders.is_empty(), "no node without holders");
                if cell.link & OVERFLOW != 0 {
                    assert!(holders.len() > 2, "two holders or fewer are inline");
                    let mut next = cell.link & CHAIN_MASK;
                    let mut groups = BTreeSet::new();
                    while next != 0 {
                        let group = self.cells.get(next - 1);
                        assert!(!self.cells.is_node(next - 1));
                        assert!(group.wide != 0, "no empty group cell");
                        assert!(groups.insert(group.mid), "a group appears once");
                        group_cells += 1;
                        next = group.link;
                    }
                }
                assert!(contents.insert((cell.mid, cell.wide), holders).is_none());
            }
            let entries: usize = contents.values().map(BTreeMap::len).sum();
            assert_eq!(entries as u64, self.entries, "entry count is exact");
            let mut chunk_cells = 0;
            for (slot, heads) in st.slots() {
                let head = &heads[self.id];
                let held = held_by.remove(&slot).unwrap_or_default();
                assert_eq!(
                    head.live() as usize,
                    held.len(),
                    "live count of slot {slot}"
                );
                let mut listed = BTreeSet::new();
                let mut next = head.head();
                let mut fill = fill_of_first_chunk(head.len());
                let mut len = 0;
                while next != 0 {
                    let chunk = *self.cells.get(next - 1);
                    assert!(!self.cells.is_node(next - 1));
                    listed.extend(chunk_entries(&chunk).into_iter().take(fill));
                    len += fill;
                    chunk_cells += 1;
                    fill = LIST_CHUNK as usize;
                    next = chunk.link;
                }
                assert_eq!(len, head.len() as usize, "list length of slot {slot}");
                assert!(
                    head.len() < 2 * head.live() + 2 * LIST_CHUNK,
                    "list of slot {slot} is compacted"
                );
                assert!(
                    held.is_subset(&listed),
                    "every held block of slot {slot} is listed"
                );
            }
            assert!(held_by.is_empty(), "holders only for allocated slots");
            assert_eq!(
                self.cells.used(),
                cells.len() + group_cells + chunk_cells,
                "every used cell is a node, a group or a list chunk"
            );
            assert_eq!(
                self.cells.walk_free(),
                self.cells.free_len(),
                "free list length"
            );
            assert_eq!(self.bytes(), self.table.bytes() + self.cells.bytes());
            assert!(
                self.bytes() <= self.budget,
                "bytes within the shard's budget"
            );
            contents
        }
    }
}
