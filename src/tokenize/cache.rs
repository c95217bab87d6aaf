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

const SHARDS: usize = 16;

/// Per-entry bookkeeping, counted in token-id units so that many tiny
/// segments cannot exceed the budget unnoticed.
const ENTRY_OVERHEAD: usize = 16;

/// Segment text (by 128-bit hash) → token ids, bounded by total token ids held.
///
/// Eviction is CLOCK (second chance): a hit marks an entry, and the sweep
/// spares marked entries once. Long conversations keep their earlier turns.
pub(crate) struct SegmentCache {
    shards: Box<[RwLock<SegmentShard>]>,
    shard_budget: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct SegmentShard {
    entries: HashMap<u128, SegmentEntry>,
    clock: VecDeque<u128>,
    weight: usize,
}

struct SegmentEntry {
    ids: Arc<[u32]>,
    referenced: AtomicBool,
}

impl SegmentCache {
    /// A cache holding about `capacity_tokens` token ids.
    pub(crate) fn new(capacity_tokens: usize) -> Self {
        SegmentCache {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(SegmentShard::default()))
                .collect(),
            shard_budget: capacity_tokens / SHARDS,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The key of a segment's text.
    pub(crate) fn key(text: &str) -> u128 {
        xxhash_rust::xxh3::xxh3_128(text.as_bytes())
    }

    fn shard(&self, key: u128) -> &RwLock<SegmentShard> {
        &self.shards[(key as usize) % SHARDS]
    }

    pub(crate) fn get(&self, key: u128) -> Option<Arc<[u32]>> {
        let shard = self.shard(key).read();
        match shard.entries.get(&key) {
            Some(entry) => {
                entry.referenced.store(true, Ordering::Relaxed);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.ids.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether a segment of this many ids may enter: one segment never takes
    /// more than an eighth of a shard, so a huge document cannot flush the rest.
    pub(crate) fn admits(&self, len: usize) -> bool {
        len + ENTRY_OVERHEAD <= self.shard_budget / 8
    }

    pub(crate) fn insert(&self, key: u128, ids: Arc<[u32]>) {
        if !self.admits(ids.len()) {
            return;
        }
        let mut shard = self.shard(key).write();
        if shard.entries.contains_key(&key) {
            return;
        }
        shard.weight += ids.len() + ENTRY_OVERHEAD;
        shard.entries.insert(
            key,
            SegmentEntry {
                ids,
                referenced: AtomicBool::new(false),
            },
        );
        shard.clock.push_back(key);
        // Every entry is spared at most once per sweep, so this ends.
        let mut spared = 0;
        while shard.weight > self.shard_budget {
            let Some(candidate) = shard.clock.pop_front() else {
                break;
            };
            let Some(entry) = shard.entries.get(&candidate) else {
                continue;
            };
            if entry.referenced.swap(false, Ordering::Relaxed) && spared < shard.clock.len() + 1 {
                spared += 1;
                shard.clock.push_back(candidate);
                continue;
            }
            if let Some(evicted) = shard.entries.remove(&candidate) {
                shard.weight -= evicted.ids.len() + ENTRY_OVERHEAD;
            }
        }
    }

    pub(crate) fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Total token ids held.
    pub(crate) fn held_tokens(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let shard = s.read();
                shard.weight - shard.entries.len() * ENTRY_OVERHEAD
            })
            .sum()
    }

    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            *shard.write() = SegmentShard::default();
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

    #[test]
    fn segment_cache_is_bounded_and_keeps_hot_entries() {
        let cache = SegmentCache::new(SHARDS * 800);
        let hot = SegmentCache::key("hot");
        cache.insert(hot, vec![1; 40].into());
        for i in 0..10_000u32 {
            let key = SegmentCache::key(&format!("cold {i}"));
            cache.insert(key, vec![i; 40].into());
            assert!(
                cache.get(hot).is_some(),
                "hot entry evicted after {i} inserts"
            );
        }
        assert!(cache.held_tokens() <= SHARDS * 800);
        let (hits, misses) = cache.stats();
        assert_eq!((hits, misses), (10_000, 0));
        assert!(cache.get(SegmentCache::key("absent")).is_none());
        assert!(!cache.admits(200));
        cache.clear();
        assert!(cache.get(hot).is_none());
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
