//! Robin Hood hash table from a block key to the arena cell holding its node.
//!
//! A bucket is one `u32`: `(cell + 1) << 8 | tag << 6 | displacement`, 0 meaning empty. The key
//! itself lives in the node cell, which keeps a bucket at 4 bytes. Robin Hood order means a probe
//! only has to compare keys at buckets whose displacement equals the probe distance (those share
//! its home bucket); the 2-bit tag drops three quarters of those, so a lookup reads about one
//! node. Deletion shifts the cluster back instead of leaving tombstones, so capacity, probe
//! lengths and the byte count depend only on the live entries. The table never grows by itself:
//! the shard decides (against its byte budget) whether to grow it or to evict.

/// Cells addressable from a bucket (24 bits, minus the empty encoding).
pub(super) const MAX_CELLS: u32 = (1 << 24) - 1;
const DIST_BITS: u32 = 6;
const MAX_DIST: u32 = (1 << DIST_BITS) - 1;
const TAG_BITS: u32 = 2;
const CELL_SHIFT: u32 = DIST_BITS + TAG_BITS;
/// Buckets of the first allocation.
const MIN_BUCKETS: usize = 64;
pub(super) const BUCKET_BYTES: usize = std::mem::size_of::<u32>();

#[inline]
fn dist(bucket: u32) -> u32 {
    bucket & MAX_DIST
}

#[inline]
fn tag_of(bucket: u32) -> u32 {
    (bucket >> DIST_BITS) & ((1 << TAG_BITS) - 1)
}

#[inline]
fn cell_of(bucket: u32) -> u32 {
    (bucket >> CELL_SHIFT) - 1
}

/// The tag comes from the top bits of the key hash; homes use the low bits and shard selection
/// the middle ones, so the three are independent.
#[inline]
fn tag(hash: u64) -> u32 {
    (hash >> (64 - TAG_BITS)) as u32
}

#[inline]
fn encode(cell: u32, tag: u32, dist: u32) -> u32 {
    ((cell + 1) << CELL_SHIFT) | (tag << DIST_BITS) | dist
}

/// Most entries a table of `buckets` buckets holds (load factor 7/8).
#[inline]
fn max_len(buckets: usize) -> usize {
    buckets - buckets / 8
}

pub(super) struct SlotTable {
    buckets: Box<[u32]>,
    len: usize,
}

impl SlotTable {
    pub(super) fn new() -> Self {
        Self {
            buckets: Box::new([]),
            len: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn buckets(&self) -> usize {
        self.buckets.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.buckets.len() * BUCKET_BYTES
    }

    /// Whether one more entry fits under the load factor (displacement aside).
    pub(super) fn has_room(&self) -> bool {
        self.len < max_len(self.buckets.len())
    }

    /// Bucket count the next growth step allocates.
    pub(super) fn grown_buckets(&self) -> usize {
        (self.buckets.len() * 2).max(MIN_BUCKETS)
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// The cell stored at bucket `pos`, if any (the eviction clock walks buckets).
    #[inline]
    pub(super) fn cell_at(&self, pos: usize) -> Option<u32> {
        match self.buckets.get(pos) {
            Some(&b) if b != 0 => Some(cell_of(b)),
            _ => None,
        }
    }

    /// Finds the cell of the key with hash `hash`; `is_key` confirms a candidate cell.
    #[inline]
    pub(super) fn find(&self, hash: u64, is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        self.find_pos(hash, is_key)
            .map(|pos| cell_of(self.buckets[pos]))
    }

    #[inline]
    fn find_pos(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.mask();
        let want = tag(hash);
        let mut pos = hash as usize & mask;
        let mut d = 0;
        // Ends: every bucket's displacement is at most MAX_DIST, and the load factor keeps empties.
        loop {
            let b = self.buckets[pos];
            if b == 0 || dist(b) < d {
                return None;
            }
            if dist(b) == d && tag_of(b) == want && is_key(cell_of(b)) {
                return Some(pos);
            }
            pos = (pos + 1) & mask;
            d += 1;
        }
    }

    /// Where a new key would land and at which displacement, if neither it nor any entry it
    /// pushes along would exceed the displacement the bucket can encode.
    fn plan(&self, hash: u64) -> Option<(usize, u32)> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut pos = hash as usize & mask;
        let mut d = 0;
        loop {
            let b = self.buckets[pos];
            if b == 0 {
                return Some((pos, d));
            }
            if dist(b) < d {
                break;
            }
            pos = (pos + 1) & mask;
            d += 1;
            if d > MAX_DIST {
                return None;
            }
        }
        let mut p = pos;
        loop {
            let b = self.buckets[p];
            if b == 0 {
                return Some((pos, d));
            }
            if dist(b) == MAX_DIST {
                return None;
            }
            p = (p + 1) & mask;
        }
    }

    /// Whether `insert` would succeed without growing.
    pub(super) fn can_insert(&self, hash: u64) -> bool {
        self.has_room() && self.plan(hash).is_some()
    }

    /// Inserts a key known to be absent. Returns false (and changes nothing) when the table has
    /// no room: see `can_insert`.
    pub(super) fn insert(&mut self, hash: u64, cell: u32) -> bool {
        if !self.has_room() {
            return false;
        }
        let Some((pos, d)) = self.plan(hash) else {
            return false;
        };
        let mask = self.mask();
        let mut carry = encode(cell, tag(hash), d);
        let mut p = pos;
        loop {
            let b = self.buckets[p];
            self.buckets[p] = carry;
            if b == 0 {
                break;
            }
            // `plan` checked that every shifted entry stays within MAX_DIST.
            carry = b + 1;
            p = (p + 1) & mask;
        }
        self.len += 1;
        true
    }

    /// Removes the entry pointing at `cell` (found through its key hash). Returns whether it was there.
    pub(super) fn remove(&mut self, hash: u64, cell: u32) -> bool {
        let Some(pos) = self.find_pos(hash, |c| c == cell) else {
            return false;
        };
        let mask = self.mask();
        let mut p = pos;
        loop {
            let next = (p + 1) & mask;
            let b = self.buckets[next];
            if b == 0 || dist(b) == 0 {
                self.buckets[p] = 0;
                break;
            }
            self.buckets[p] = b - 1;
            p = next;
        }
        self.len -= 1;
        true
    }

    /// Rebuilds the table with `buckets` buckets (a power of two) from `entries()`, every
    /// (key hash, cell) pair the table should hold. Should an entry not fit (a displacement
    /// overflow, which needs a freak cluster at a load of at most 7/16), it doubles again
    /// rather than lose it.
    pub(super) fn resize<I: Iterator<Item = (u64, u32)>>(
        &mut self,
        buckets: usize,
        entries: impl Fn() -> I,
    ) {
        self.buckets = Box::new([]);
        let mut size = buckets.max(MIN_BUCKETS);
        'build: loop {
            self.buckets = vec![0; size].into_boxed_slice();
            self.len = 0;
            for (hash, cell) in entries() {
                if !self.insert(hash, cell) {
                    size *= 2;
                    continue 'build;
                }
            }
            return;
        }
    }

    /// Every stored cell, in bucket order (consistency checks).
    #[cfg(test)]
    pub(super) fn cells(&self) -> impl Iterator<Item = u32> + '_ {
        self.buckets
            .iter()
            .filter(|&&b| b != 0)
            .map(|&b| cell_of(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn scramble(x: u64) -> u64 {
        let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    /// Inserts, finds and removes thousands of keys against a HashMap, growing like the shard does.
    #[test]
    fn matches_a_hash_map_through_growth_and_removal() {
        let mut table = SlotTable::new();
        let mut model: HashMap<u32, u64> = HashMap::new();
        let keys: Vec<u64> = (0..5000).map(scramble).collect();
        for (cell, &h) in keys.iter().enumerate() {
            let cell = cell as u32;
            if !table.can_insert(h) {
                let live: Vec<(u64, u32)> = model.iter().map(|(&c, &h)| (h, c)).collect();
                table.resize(table.grown_buckets(), || live.iter().copied());
            }
            assert!(table.insert(h, cell));
            model.insert(cell, h);
        }
        assert_eq!(table.len(), 5000);
        assert!(table.len() <= max_len(table.buckets()));
        for (&cell, &h) in &model {
            assert_eq!(table.find(h, |c| c == cell), Some(cell));
        }
        for cell in (0..5000u32).step_by(3) {
            assert!(table.remove(keys[cell as usize], cell));
            model.remove(&cell);
        }
        assert!(!table.remove(keys[0], 0), "already removed");
        assert_eq!(table.len(), model.len());
        for (cell, &h) in keys.iter().enumerate() {
            let cell = cell as u32;
            let expected = model.contains_key(&cell).then_some(cell);
            assert_eq!(table.find(h, |c| c == cell), expected);
        }
        let mut stored: Vec<u32> = table.cells().collect();
        stored.sort_unstable();
        let mut live: Vec<u32> = model.keys().copied().collect();
        live.sort_unstable();
        assert_eq!(stored, live);
    }

    /// Keys with one home collide; the tag and the key check keep them apart.
    #[test]
    fn colliding_homes_stay_distinct() {
        let mut table = SlotTable::new();
        table.resize(64, std::iter::empty);
        let hashes: Vec<u64> = (0..40u64).map(|i| (i << 62) | (i << 40) | 5).collect();
        for (cell, &h) in hashes.iter().enumerate() {
            assert!(table.insert(h, cell as u32));
        }
        for (cell, &h) in hashes.iter().enumerate() {
            assert_eq!(table.find(h, |c| c == cell as u32), Some(cell as u32));
        }
        assert!(table.remove(hashes[3], 3));
        assert_eq!(table.find(hashes[3], |c| c == 3), None);
        for (cell, &h) in hashes.iter().enumerate().skip(4) {
            assert_eq!(table.find(h, |c| c == cell as u32), Some(cell as u32));
        }
    }

    #[test]
    fn refuses_to_overfill() {
        let mut table = SlotTable::new();
        assert!(!table.can_insert(1));
        assert!(!table.insert(1, 0));
        table.resize(64, std::iter::empty);
        let mut n = 0;
        while table.can_insert(scramble(n)) {
            assert!(table.insert(scramble(n), n as u32));
            n += 1;
        }
        assert!(table.len() <= max_len(64));
        assert!(!table.insert(scramble(n), n as u32));
    }
}
