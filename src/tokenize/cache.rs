//! Bounded, concurrent caches of token ids.
//!
//! Both caches are sharded behind `RwLock`s: lookups take a shard's read lock
//! only, so threads tokenizing different requests rarely contend.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use parking_lot::RwLock;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const SHARDS: usize = 16;

/// Bytes of a long piece between two prefix checkpoints: a piece that starts with text
/// seen before tokenizes at most about this much of the seen text again.
pub(crate) const CHUNK_BYTES: usize = 4096;

/// Per-record and per-key bookkeeping, counted so that many tiny pieces cannot exceed
/// the budget unnoticed.
const RECORD_OVERHEAD_BYTES: usize = 96;
const KEY_OVERHEAD_BYTES: usize = 32;

const CHUNK_SEED: u64 = 0x6b76_6761_7465_0001;
const WHOLE_TAG: u64 = 0x6b76_6761_7465_00ff;

/// The lookup keys of a piece: one per whole [`CHUNK_BYTES`] chunk, each chained over
/// every chunk before it (so a key names a whole prefix), and one for the whole text.
/// Keys only find candidates: a candidate's text is compared before it is used, so a
/// hash collision costs a comparison, never another text's ids.
pub(crate) struct PieceKeys {
    chunks: Vec<u64>,
    whole: u64,
}

impl PieceKeys {
    /// `chunked`: whether the tokenizer can reuse a prefix (see `cuts`).
    pub(crate) fn new(text: &str, chunked: bool) -> Self {
        let bytes = text.as_bytes();
        if !chunked {
            return PieceKeys {
                chunks: Vec::new(),
                whole: xxh3_64_with_seed(bytes, WHOLE_TAG),
            };
        }
        let mut chain = CHUNK_SEED;
        let mut chunks = Vec::with_capacity(bytes.len() / CHUNK_BYTES);
        let whole_chunks = bytes.chunks_exact(CHUNK_BYTES);
        let tail = whole_chunks.remainder();
        for chunk in whole_chunks {
            chain = xxh3_64_with_seed(chunk, chain);
            chunks.push(chain);
        }
        PieceKeys {
            chunks,
            whole: xxh3_64_with_seed(tail, chain ^ WHOLE_TAG),
        }
    }

    /// Pieces sharing their first chunk share a shard, so every prefix of a piece is
    /// found in the shard the piece is looked up in.
    fn shard_key(&self) -> u64 {
        self.chunks.first().copied().unwrap_or(self.whole)
    }
}

/// Where tokenizing may resume in a piece that agrees with a record on the chunks up to
/// this one: `ids` ids encode `text[..cut]`, and `cut` is a safe cut for every text
/// agreeing with the record up to the chunk's end. `cut == 0`: no cut in reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub(crate) cut: usize,
    pub(crate) ids: usize,
}

/// One piece seen before: its text (to verify candidates), ids and checkpoints.
pub(crate) struct Record {
    text: Box<str>,
    ids: Box<[u32]>,
    /// One per whole chunk, in order.
    checkpoints: Box<[Checkpoint]>,
    /// The keys this record was entered under: its chunk keys, then its whole key.
    keys: Box<[u64]>,
    weight: usize,
    referenced: AtomicBool,
}

impl Record {
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub(crate) fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }
}

/// What a key points at: a record as a whole, or one of its chunk checkpoints.
struct Slot {
    record: Arc<Record>,
    chunk: Option<usize>,
}

#[derive(Default)]
struct PieceShard {
    slots: HashMap<u64, Slot>,
    clock: VecDeque<Arc<Record>>,
    weight: usize,
}

/// The longest part of a piece the cache can vouch for.
pub(crate) enum Lookup {
    /// The same text: every id.
    Whole(Arc<Record>),
    /// The first `chunks` chunks agree with `record`: resume at its checkpoint `chunks - 1`.
    Prefix {
        record: Arc<Record>,
        chunks: usize,
    },
    Miss,
}

/// Cache hit counts since load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Pieces whose whole text was seen before.
    pub hits: u64,
    /// Pieces that reused the ids of a prefix seen before and tokenized the rest.
    pub prefix_hits: u64,
    /// Pieces tokenized from scratch.
    pub misses: u64,
}

/// Pieces of text seen before → their token ids, bounded in bytes (text, ids and
/// bookkeeping all counted). A piece whose whole text was seen costs a hash and a
/// comparison; one that starts with a seen text reuses that text's ids up to the last
/// checkpoint it agrees with.
///
/// Eviction is CLOCK (second chance): a hit marks a record, and the sweep spares marked
/// records once. Long conversations keep their earlier turns.
pub(crate) struct PieceCache {
    shards: Box<[RwLock<PieceShard>]>,
    shard_budget: usize,
    hits: AtomicU64,
    prefix_hits: AtomicU64,
    misses: AtomicU64,
}

impl PieceCache {
    /// A cache holding about `capacity_bytes` bytes.
    pub(crate) fn new(capacity_bytes: usize) -> Self {
        PieceCache {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(PieceShard::default()))
                .collect(),
            shard_budget: capacity_bytes / SHARDS,
            hits: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, keys: &PieceKeys) -> &RwLock<PieceShard> {
        &self.shards[(keys.shard_key() as usize) % SHARDS]
    }

    /// The whole piece, or the longest verified prefix with a usable checkpoint.
    pub(crate) fn lookup(&self, text: &str, keys: &PieceKeys) -> Lookup {
        let shard = self.shard(keys).read();
        if let Some(slot) = shard.slots.get(&keys.whole) {
            if slot.chunk.is_none() && *slot.record.text == *text {
                slot.record.referenced.store(true, Ordering::Relaxed);
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Whole(Arc::clone(&slot.record));
            }
        }
        let bytes = text.as_bytes();
        for (chunk, key) in keys.chunks.iter().enumerate().rev() {
            let Some(Slot {
                record,
                chunk: Some(at),
            }) = shard.slots.get(key)
            else {
                continue;
            };
            let agreed = (chunk + 1) * CHUNK_BYTES;
            let usable = *at == chunk
                && record.checkpoints[chunk].cut > 0
                && record.text.as_bytes().get(..agreed) == bytes.get(..agreed);
            if usable {
                record.referenced.store(true, Ordering::Relaxed);
                self.prefix_hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Prefix {
                    record: Arc::clone(record),
                    chunks: chunk + 1,
                };
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss
    }

    fn weight(text: &str, ids: &[u32], checkpoints: &[Checkpoint]) -> usize {
        RECORD_OVERHEAD_BYTES
            + text.len()
            + std::mem::size_of_val(ids)
            + std::mem::size_of_val(checkpoints)
            + (checkpoints.len() + 1) * (KEY_OVERHEAD_BYTES + std::mem::size_of::<u64>())
    }

    /// Whether a piece of this size may enter: one record never takes more than a
    /// quarter of a shard, so a huge document cannot flush the rest.
    pub(crate) fn admits(&self, text: &str, ids: &[u32], checkpoints: &[Checkpoint]) -> bool {
        Self::weight(text, ids, checkpoints) <= self.shard_budget / 4
    }

    /// Enters a piece; `checkpoints` has one entry per whole chunk of `text`.
    pub(crate) fn insert(
        &self,
        keys: &PieceKeys,
        text: &str,
        ids: &[u32],
        checkpoints: Vec<Checkpoint>,
    ) {
        debug_assert_eq!(checkpoints.len(), keys.chunks.len());
        if !self.admits(text, ids, &checkpoints) {
            return;
        }
        let weight = Self::weight(text, ids, &checkpoints);
        let mut entered: Vec<u64> = keys
            .chunks
            .iter()
            .zip(&checkpoints)
            .filter(|(_, checkpoint)| checkpoint.cut > 0)
            .map(|(key, _)| *key)
            .collect();
        entered.push(keys.whole);
        let record = Arc::new(Record {
            text: text.into(),
            ids: ids.into(),
            checkpoints: checkpoints.into(),
            keys: entered.into(),
            weight,
            referenced: AtomicBool::new(false),
        });
        let mut shard = self.shard(keys).write();
        if let Some(slot) = shard.slots.get(&keys.whole) {
            if slot.chunk.is_none() && *slot.record.text == *text {
                return;
            }
        }
        // A newer record takes over the keys of the prefixes it shares with older ones.
        for (chunk, key) in keys.chunks.iter().enumerate() {
            if record.checkpoints[chunk].cut > 0 {
                let slot = Slot {
                    record: Arc::clone(&record),
                    chunk: Some(chunk),
                };
                shard.slots.insert(*key, slot);
            }
        }
        shard.slots.insert(
            keys.whole,
            Slot {
                record: Arc::clone(&record),
                chunk: None,
            },
        );
        shard.weight += weight;
        shard.clock.push_back(record);
        // Every record is spared at most once per sweep, so this ends.
        let mut spared = 0;
        while shard.weight > self.shard_budget {
            let Some(candidate) = shard.clock.pop_front() else {
                break;
            };
            if candidate.referenced.swap(false, Ordering::Relaxed) && spared <= shard.clock.len() {
                spared += 1;
                shard.clock.push_back(candidate);
                continue;
            }
            shard.weight -= candidate.weight;
            for key in candidate.keys.iter() {
                if shard
                    .slots
                    .get(key)
                    .is_some_and(|slot| Arc::ptr_eq(&slot.record, &candidate))
                {
                    shard.slots.remove(key);
                }
            }
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            prefix_hits: self.prefix_hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Bytes held, bookkeeping included.
    pub(crate) fn held_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.read().weight).sum()
    }

    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            *shard.write() = PieceShard::default();
        }
    }
}

/// Pre-tokenized word → token ids. Words repeat heavily within and across
/// documents, so this spares most calls into the model even on new text.
/// One shard of the word cache: word → ids.
type WordShard = HashTable<(Box<str>, Box<[u32]>)>;

pub(crate) struct WordCache {
    shards: Box<[RwLock<WordShard>]>,
    shard_entries: usize,
    hasher: DefaultHashBuilder,
}

/// Longer words are rare enough that caching them costs more than it saves.
pub(crate) const MAX_CACHED_WORD_BYTES: usize = 256;

impl WordCache {
    pub(crate) fn new(max_entries: usize) -> Self {
        WordCache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            shard_entries: (max_entries / SHARDS).max(1),
            hasher: DefaultHashBuilder::default(),
        }
    }

    pub(crate) fn hash(&self, word: &str) -> u64 {
        self.hasher.hash_one(word)
    }

    fn shard(&self, hash: u64) -> &RwLock<WordShard> {
        &self.shards[(hash >> 60) as usize % SHARDS]
    }

    /// Appends the word's ids to `out` if cached.
    pub(crate) fn extend_from(&self, hash: u64, word: &str, out: &mut Vec<u32>) -> bool {
        let shard = self.shard(hash).read();
        match shard.find(hash, |(w, _)| **w == *word) {
            Some((_, ids)) => {
                out.extend_from_slice(ids);
                true
            }
            None => false,
        }
    }

    pub(crate) fn insert(&self, hash: u64, word: &str, ids: &[u32]) {
        if word.len() > MAX_CACHED_WORD_BYTES {
            return;
        }
        let mut shard = self.shard(hash).write();
        if shard.find(hash, |(w, _)| **w == *word).is_some() {
            return;
        }
        // Word frequencies are Zipfian: starting over keeps the common words hot.
        if shard.len() >= self.shard_entries {
            shard.clear();
        }
        let hasher = &self.hasher;
        shard.insert_unique(hash, (word.into(), ids.into()), |(w, _)| {
            hasher.hash_one(&**w)
        });
    }

    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            shard.write().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(i: u32) -> String {
        format!("piece {i} ").repeat(3)
    }

    fn checkpoints(keys: &PieceKeys) -> Vec<Checkpoint> {
        (0..keys.chunks.len())
            .map(|i| Checkpoint { cut: i + 1, ids: i })
            .collect()
    }

    #[test]
    fn piece_cache_is_bounded_in_bytes_and_keeps_hot_records() {
        let budget = SHARDS * 4096;
        let cache = PieceCache::new(budget);
        let hot = piece(u32::MAX);
        let hot_keys = PieceKeys::new(&hot, true);
        cache.insert(&hot_keys, &hot, &[1; 40], Vec::new());
        for i in 0..10_000u32 {
            let text = piece(i);
            cache.insert(&PieceKeys::new(&text, true), &text, &[i; 40], Vec::new());
            assert!(
                matches!(cache.lookup(&hot, &hot_keys), Lookup::Whole(r) if r.ids() == [1; 40]),
                "hot record evicted after {i} inserts"
            );
        }
        assert!(cache.held_bytes() <= budget);
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 10_000,
                prefix_hits: 0,
                misses: 0
            }
        );
        let big = "x".repeat(budget / SHARDS / 4);
        assert!(!cache.admits(&big, &[], &[]));
        cache.clear();
        assert!(matches!(cache.lookup(&hot, &hot_keys), Lookup::Miss));
        assert_eq!(cache.held_bytes(), 0);
    }

    #[test]
    fn a_key_collision_never_returns_another_texts_ids() {
        let cache = PieceCache::new(64 << 20);
        let seen = "a seen text ".repeat(1000);
        let seen_keys = PieceKeys::new(&seen, true);
        cache.insert(&seen_keys, &seen, &[7; 3000], checkpoints(&seen_keys));
        // Another text that hashed to the same keys: every candidate is compared first.
        let other = "other words ".repeat(1000);
        let forged = PieceKeys {
            chunks: seen_keys.chunks.clone(),
            whole: seen_keys.whole,
        };
        assert!(matches!(cache.lookup(&other, &forged), Lookup::Miss));
        // Same keys, same length, one byte apart at the very end.
        let mut last_byte = seen.clone();
        last_byte.pop();
        last_byte.push('!');
        assert!(matches!(
            cache.lookup(&last_byte, &forged),
            Lookup::Prefix { chunks, .. } if chunks == seen_keys.chunks.len()
        ));
        assert!(matches!(cache.lookup(&seen, &seen_keys), Lookup::Whole(_)));
    }

    #[test]
    fn the_longest_agreeing_prefix_is_found() {
        let cache = PieceCache::new(64 << 20);
        let document: String = (0..3000).map(|i| format!("w{i} ")).collect();
        let keys = PieceKeys::new(&document, true);
        assert!(keys.chunks.len() >= 4);
        cache.insert(&keys, &document, &[1; 10], checkpoints(&keys));
        for agreed_chunks in 1..keys.chunks.len() {
            let mut text = document[..agreed_chunks * CHUNK_BYTES + 7].to_owned();
            text.push_str("a different continuation");
            text.push_str(&document);
            assert!(matches!(
                cache.lookup(&text, &PieceKeys::new(&text, true)),
                Lookup::Prefix { chunks, .. } if chunks == agreed_chunks
            ));
        }
        let other_start = format!("X{}", &document[1..]);
        assert!(matches!(
            cache.lookup(&other_start, &PieceKeys::new(&other_start, true)),
            Lookup::Miss
        ));
    }

    #[test]
    fn word_cache_round_trip_and_bound() {
        let cache = WordCache::new(SHARDS * 4);
        let mut out = Vec::new();
        for i in 0..1000u32 {
            let word = format!("w{i}");
            cache.insert(cache.hash(&word), &word, &[i, i + 1]);
        }
        let shard_sizes: usize = cache.shards.iter().map(|s| s.read().len()).sum();
        assert!(shard_sizes <= SHARDS * 4);
        let word = "fresh";
        let hash = cache.hash(word);
        assert!(!cache.extend_from(hash, word, &mut out));
        cache.insert(hash, word, &[7, 8]);
        assert!(cache.extend_from(hash, word, &mut out));
        assert_eq!(out, [7, 8]);
        cache.insert(hash, &"x".repeat(MAX_CACHED_WORD_BYTES + 1), &[1]);
    }
}
