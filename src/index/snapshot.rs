//! A snapshot of the whole index, for handing it to the process that takes over in a
//! graceful upgrade (`crate::upgrade`).
//!
//! Pod ids are per process, so a snapshot names holders by the writing process's ids
//! and [`BlockIndex::restore`] maps each through the caller's function (a holder it
//! maps to `None` is dropped: the pod is gone). Restored blocks count as freshly
//! stored; the eviction order of the old index is not carried over.
//!
//! Format, little-endian: `KVIX`, version byte 1, then one record per block —
//! holder count `u16` (at least 1), scope `u32`, block hash `u64`, and per holder the
//! pod id `u32` and its tiers byte (bit 0: GPU, bit 1: offload) — and a final `u16` 0.

use std::collections::HashMap;
use std::io::{Read, Write};

use super::registry::Registry;
use super::{BlockIndex, PodId, ScopeId, Tier};

const MAGIC: &[u8; 4] = b"KVIX";
const VERSION: u8 = 1;
/// Hashes gathered per (pod, scope, tier) before they are stored as one batch.
const RESTORE_BATCH: usize = 4_096;
const GPU: u8 = 1;
const OFFLOAD: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("reading the index snapshot: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a kvgate index snapshot")]
    Magic,
    #[error("index snapshot version {0} is not supported (this kvgate reads {VERSION})")]
    Version(u8),
    #[error("index snapshot record has invalid tiers {0:#x}")]
    Tiers(u8),
}

/// What a snapshot or restore covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Distinct (scope, hash) blocks read or written.
    pub blocks: u64,
    /// (block, pod) entries written, or restored.
    pub entries: u64,
    /// Entries dropped on restore because their pod is not mapped.
    pub skipped: u64,
}

impl BlockIndex {
    /// Writes every block with its live holders. Each shard is read-locked while it is
    /// written: lookups go on, stores into that shard wait.
    pub fn snapshot(&self, w: &mut impl Write) -> std::io::Result<SnapshotStats> {
        w.write_all(MAGIC)?;
        w.write_all(&[VERSION])?;
        let mut stats = SnapshotStats::default();
        let mut record = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.0.read();
            let mut written = Ok(());
            shard.for_each_block(|scope, hash, holders| {
                if written.is_err() {
                    return;
                }
                record.clear();
                record.extend_from_slice(&[0, 0]);
                record.extend_from_slice(&scope.to_le_bytes());
                record.extend_from_slice(&hash.to_le_bytes());
                let mut live: u16 = 0;
                for &(slot, tiers) in holders {
                    let Some(pod) = Registry::tag_pod(self.registry.tag(usize::from(slot))) else {
                        continue;
                    };
                    record.extend_from_slice(&pod.to_le_bytes());
                    record.push(tiers as u8);
                    live += 1;
                }
                if live == 0 {
                    return;
                }
                record[..2].copy_from_slice(&live.to_le_bytes());
                stats.blocks += 1;
                stats.entries += u64::from(live);
                written = w.write_all(&record);
            });
            written?;
        }
        w.write_all(&0u16.to_le_bytes())?;
        Ok(stats)
    }

    /// Stores every entry of a snapshot under `remap(pod)`; entries of pods it maps to
    /// `None` are skipped. What was stored before an error stays stored.
    pub fn restore(
        &self,
        r: &mut impl Read,
        mut remap: impl FnMut(PodId) -> Option<PodId>,
    ) -> Result<SnapshotStats, SnapshotError> {
        let mut head = [0u8; 5];
        r.read_exact(&mut head)?;
        if &head[..4] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        if head[4] != VERSION {
            return Err(SnapshotError::Version(head[4]));
        }
        let mut stats = SnapshotStats::default();
        let mut pending: HashMap<(PodId, ScopeId, Tier), Vec<u64>> = HashMap::new();
        let mut pending_len = 0;
        loop {
            let holders = u16::from_le_bytes(read_array(r)?);
            if holders == 0 {
                break;
            }
            let scope = u32::from_le_bytes(read_array(r)?);
            let hash = u64::from_le_bytes(read_array(r)?);
            stats.blocks += 1;
            for _ in 0..holders {
                let pod = u32::from_le_bytes(read_array(r)?);
                let [tiers] = read_array(r)?;
                if tiers == 0 || tiers & !(GPU | OFFLOAD) != 0 {
                    return Err(SnapshotError::Tiers(tiers));
                }
                let Some(target) = remap(pod) else {
                    stats.skipped += 1;
                    continue;
                };
                stats.entries += 1;
                for (bit, tier) in [(GPU, Tier::Gpu), (OFFLOAD, Tier::Cpu)] {
                    if tiers & bit != 0 {
                        pending.entry((target, scope, tier)).or_default().push(hash);
                        pending_len += 1;
                    }
                }
            }
            if pending_len >= RESTORE_BATCH {
                self.store_pending(&mut pending);
                pending_len = 0;
            }
        }
        self.store_pending(&mut pending);
        Ok(stats)
    }

    fn store_pending(&self, pending: &mut HashMap<(PodId, ScopeId, Tier), Vec<u64>>) {
        for ((pod, scope, tier), hashes) in pending.iter_mut() {
            self.store(*pod, *scope, *tier, hashes);
            hashes.clear();
        }
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{IndexConfig, PrefixMatch};

    fn index() -> BlockIndex {
        BlockIndex::new(IndexConfig {
            budget_bytes: 4 << 20,
            shards: 8,
        })
    }

    fn prefix(index: &BlockIndex, scope: ScopeId, hashes: &[u64], pod: PodId) -> (u32, u32) {
        let mut found = PrefixMatch::new();
        index.lookup(scope, hashes, &mut found);
        let p = found.get(pod);
        (p.gpu_blocks, p.any_blocks)
    }

    #[test]
    fn restores_every_entry_under_the_new_ids() {
        let old = index();
        let chain: Vec<u64> = (1..=40).collect();
        // Four holders of the first blocks (beyond the two inline ones), two scopes,
        // both tiers, a retired pod.
        for pod in 0..4 {
            old.store(pod, 7, Tier::Gpu, &chain[..10 + pod as usize]);
        }
        old.store(1, 7, Tier::Cpu, &chain);
        old.store(2, 9, Tier::Gpu, &chain[..5]);
        old.store(5, 7, Tier::Gpu, &chain);
        old.retire_pod(5);
        let mut bytes = Vec::new();
        let written = old.snapshot(&mut bytes).expect("snapshot");
        assert_eq!(written.blocks, 40 + 5);
        assert_eq!(written.entries, (10 + 11 + 12 + 13) + (40 - 11) + 5);

        // Ids move by 100; pod 3 is gone in the new process.
        let new = index();
        let restored = new
            .restore(&mut bytes.as_slice(), |pod| (pod != 3).then_some(pod + 100))
            .expect("restore");
        assert_eq!(restored.blocks, written.blocks);
        assert_eq!(restored.skipped, 13);
        assert_eq!(restored.entries, written.entries - 13);
        assert_eq!(prefix(&new, 7, &chain, 100), (10, 10));
        assert_eq!(prefix(&new, 7, &chain, 101), (11, 40));
        assert_eq!(prefix(&new, 7, &chain, 102), (12, 12));
        assert_eq!(prefix(&new, 9, &chain, 102), (5, 5));
        assert_eq!(prefix(&new, 7, &chain, 103), (0, 0));
        assert_eq!(prefix(&new, 7, &chain, 105), (0, 0));
        assert_eq!(new.stats().entries, restored.entries);
    }

    #[test]
    fn damaged_snapshots_are_refused() {
        let old = index();
        old.store(0, 1, Tier::Gpu, &[1, 2, 3]);
        let mut bytes = Vec::new();
        old.snapshot(&mut bytes).expect("snapshot");
        let new = index();
        assert!(matches!(
            new.restore(&mut &bytes[..bytes.len() - 1], Some),
            Err(SnapshotError::Io(_))
        ));
        let mut other = bytes.clone();
        other[4] = 9;
        assert!(matches!(
            new.restore(&mut other.as_slice(), Some),
            Err(SnapshotError::Version(9))
        ));
        assert!(matches!(
            new.restore(&mut &b"JUNK\x01"[..], Some),
            Err(SnapshotError::Magic)
        ));
    }
}
