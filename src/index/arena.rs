//! Paged arena of 16-byte cells, the one allocator of a shard.
//!
//! Block nodes, overflow holder groups and pod-list chunks are all one cell, so any cell freed
//! by an eviction can serve any later need: the byte budget then only has to cap how many pages
//! exist, and eviction is always able to make room. Pages are fixed-size (no copying growth, at
//! most one partly used page of slack), and free cells are threaded through their `link` field.
//! A per-page bitmap marks which cells are live block nodes, so a stale reference (a pod list
//! entry whose block was evicted and whose cell was reused) is recognised without reading the
//! cell as something it is not.

use super::table::MAX_CELLS;

/// Cells per page (4 KiB of cells).
pub(super) const PAGE_CELLS: usize = 256;
const PAGE_SHIFT: u32 = PAGE_CELLS.trailing_zeros();
const NODE_WORDS: usize = PAGE_CELLS / 64;
pub(super) const CELL_BYTES: usize = std::mem::size_of::<Cell>();
pub(super) const PAGE_BYTES: usize = PAGE_CELLS * CELL_BYTES;
/// Bytes of one entry of the page vector (the cell pointer plus the node bitmap).
pub(super) const PAGE_ENTRY_BYTES: usize = std::mem::size_of::<Page>();

/// One arena cell. Its fields mean different things depending on what the cell holds; the
/// shard module documents each use.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(C)]
pub(super) struct Cell {
    pub(super) wide: u64,
    pub(super) mid: u32,
    pub(super) link: u32,
}

struct Page {
    cells: Box<[Cell]>,
    nodes: [u64; NODE_WORDS],
}

pub(super) struct CellArena {
    pages: Vec<Page>,
    /// Head of the free list as `cell + 1`; 0 when empty.
    free_head: u32,
    free_len: usize,
    /// Cells handed out at least once; the rest of the last page is untouched.
    high: usize,
}

impl CellArena {
    pub(super) fn new() -> Self {
        Self {
            pages: Vec::new(),
            free_head: 0,
            free_len: 0,
            high: 0,
        }
    }

    /// Exact bytes allocated: the page vector's capacity and every page.
    pub(super) fn bytes(&self) -> usize {
        self.pages.capacity() * PAGE_ENTRY_BYTES + self.pages.len() * PAGE_BYTES
    }

    /// Cells that can be allocated without growing.
    pub(super) fn available(&self) -> usize {
        self.free_len + self.pages.len() * PAGE_CELLS - self.high
    }

    /// Cells in use.
    #[cfg(test)]
    pub(super) fn used(&self) -> usize {
        self.high - self.free_len
    }

    fn pages_for(&self, cells: usize) -> usize {
        cells.saturating_sub(self.available()).div_ceil(PAGE_CELLS)
    }

    fn page_vec_capacity_for(&self, pages: usize) -> usize {
        let needed = self.pages.len() + pages;
        if needed <= self.pages.capacity() {
            self.pages.capacity()
        } else {
            needed.max(self.pages.capacity() * 2).max(4)
        }
    }

    /// Bytes `grow(cells)` would allocate, or None when the arena cannot address that many cells.
    pub(super) fn growth_bytes(&self, cells: usize) -> Option<usize> {
        let pages = self.pages_for(cells);
        if pages == 0 {
            return Some(0);
        }
        if (self.pages.len() + pages) * PAGE_CELLS > MAX_CELLS as usize {
            return None;
        }
        let capacity = self.page_vec_capacity_for(pages);
        Some(pages * PAGE_BYTES + (capacity - self.pages.capacity()) * PAGE_ENTRY_BYTES)
    }

    /// Adds pages until `cells` cells are available (the caller checked `growth_bytes`).
    pub(super) fn grow(&mut self, cells: usize) {
        let pages = self.pages_for(cells);
        if pages == 0 {
            return;
        }
        let capacity = self.page_vec_capacity_for(pages);
        self.pages.reserve_exact(capacity - self.pages.len());
        for _ in 0..pages {
            self.pages.push(Page {
                cells: vec![Cell::default(); PAGE_CELLS].into_boxed_slice(),
                nodes: [0; NODE_WORDS],
            });
        }
    }

    /// Takes a cell (zeroed), or None when none is available.
    pub(super) fn alloc(&mut self) -> Option<u32> {
        let cell = if self.free_head != 0 {
            let cell = self.free_head - 1;
            self.free_head = self.get(cell).link;
            self.free_len -= 1;
            cell
        } else if self.high < self.pages.len() * PAGE_CELLS {
            self.high += 1;
            (self.high - 1) as u32
        } else {
            return None;
        };
        *self.get_mut(cell) = Cell::default();
        Some(cell)
    }

    /// Returns a cell to the free list (and clears its node mark).
    pub(super) fn free(&mut self, cell: u32) {
        self.set_node(cell, false);
        let head = self.free_head;
        *self.get_mut(cell) = Cell {
            wide: 0,
            mid: 0,
            link: head,
        };
        self.free_head = cell + 1;
        self.free_len += 1;
    }

    #[inline]
    pub(super) fn get(&self, cell: u32) -> &Cell {
        let cell = cell as usize;
        &self.pages[cell >> PAGE_SHIFT].cells[cell & (PAGE_CELLS - 1)]
    }

    #[inline]
    pub(super) fn get_mut(&mut self, cell: u32) -> &mut Cell {
        let cell = cell as usize;
        &mut self.pages[cell >> PAGE_SHIFT].cells[cell & (PAGE_CELLS - 1)]
    }

    /// Whether `cell` currently holds a block node (false for anything else, or out of range).
    #[inline]
    pub(super) fn is_node(&self, cell: u32) -> bool {
        let cell = cell as usize;
        self.pages.get(cell >> PAGE_SHIFT).is_some_and(|page| {
            let bit = cell & (PAGE_CELLS - 1);
            page.nodes[bit / 64] & (1 << (bit % 64)) != 0
        })
    }

    pub(super) fn set_node(&mut self, cell: u32, node: bool) {
        let cell = cell as usize;
        let page = &mut self.pages[cell >> PAGE_SHIFT];
        let bit = cell & (PAGE_CELLS - 1);
        if node {
            page.nodes[bit / 64] |= 1 << (bit % 64);
        } else {
            page.nodes[bit / 64] &= !(1 << (bit % 64));
        }
    }

    /// Every node cell with its index, in address order (a sequential scan).
    pub(super) fn nodes(&self) -> impl Iterator<Item = (u32, &Cell)> + '_ {
        self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.nodes.iter().enumerate().flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let i = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    Some(((p * PAGE_CELLS + i) as u32, &page.cells[i]))
                })
            })
        })
    }

    /// Number of cells marked as nodes (consistency checks).
    #[cfg(test)]
    pub(super) fn node_cells(&self) -> usize {
        self.pages
            .iter()
            .flat_map(|p| p.nodes.iter())
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// Length of the free list as counted (consistency checks).
    #[cfg(test)]
    pub(super) fn free_len(&self) -> usize {
        self.free_len
    }

    /// Length of the free list, walked (consistency checks).
    #[cfg(test)]
    pub(super) fn walk_free(&self) -> usize {
        let mut n = 0;
        let mut head = self.free_head;
        while head != 0 {
            n += 1;
            head = self.get(head - 1).link;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_pages_and_recycles_cells() {
        let mut arena = CellArena::new();
        assert_eq!(arena.bytes(), 0);
        assert_eq!(arena.alloc(), None);
        let growth = arena.growth_bytes(1).unwrap();
        assert_eq!(growth, PAGE_BYTES + 4 * PAGE_ENTRY_BYTES);
        arena.grow(1);
        assert_eq!(arena.bytes(), growth);
        assert_eq!(arena.available(), PAGE_CELLS);
        let cells: Vec<u32> = (0..PAGE_CELLS).map(|_| arena.alloc().unwrap()).collect();
        assert_eq!(cells, (0..PAGE_CELLS as u32).collect::<Vec<_>>());
        assert_eq!(arena.alloc(), None);
        arena.get_mut(7).wide = 99;
        arena.set_node(7, true);
        assert!(arena.is_node(7) && !arena.is_node(8) && !arena.is_node(1 << 20));
        arena.free(7);
        assert!(!arena.is_node(7));
        arena.free(9);
        assert_eq!(arena.available(), 2);
        assert_eq!(arena.walk_free(), 2);
        assert_eq!(arena.alloc(), Some(9));
        let reused = arena.alloc().unwrap();
        assert_eq!(reused, 7);
        assert_eq!(
            *arena.get(7),
            Cell::default(),
            "a reused cell comes back zeroed"
        );
        assert_eq!(arena.used(), PAGE_CELLS);
        assert_eq!(arena.growth_bytes(PAGE_CELLS + 1), Some(2 * PAGE_BYTES));
    }
}
