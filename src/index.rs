//! TEMPORARY interface shim until the `index` branch merges (replaced whole).
//! Extended on the `ingest` branch with the rest of the final API (remove, clear_pod,
//! retire_pod, pod_block_count, stats, Tier::from_medium) so ingestion builds and tests.
use std::collections::{HashMap, HashSet};

pub type PodId = u32;
pub type ScopeId = u32;
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Tier {
    Gpu,
    Cpu,
}
impl Tier {
    pub fn from_medium(medium: Option<&str>) -> Self {
        match medium {
            None => Tier::Gpu,
            Some(m) if m.eq_ignore_ascii_case("gpu") => Tier::Gpu,
            Some(_) => Tier::Cpu,
        }
    }
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexConfig {
    pub budget_bytes: usize,
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub entries: u64,
    pub blocks: u64,
    pub pods: usize,
}
#[derive(Default)]
struct Inner {
    map: HashMap<(ScopeId, u64), Vec<(PodId, Tier)>>,
    retired: HashSet<PodId>,
}
#[derive(Default)]
pub struct BlockIndex {
    inner: parking_lot::RwLock<Inner>,
}
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct PodPrefix {
    pub gpu_blocks: u32,
    pub any_blocks: u32,
}
#[derive(Default)]
pub struct PrefixMatch {
    v: Vec<(PodId, PodPrefix)>,
}
impl PrefixMatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self, pod: PodId) -> PodPrefix {
        self.v
            .iter()
            .find(|x| x.0 == pod)
            .map(|x| x.1)
            .unwrap_or_default()
    }
    pub fn iter(&self) -> impl Iterator<Item = (PodId, PodPrefix)> + '_ {
        self.v.iter().copied()
    }
}
impl BlockIndex {
    pub fn new(_c: IndexConfig) -> Self {
        Self::default()
    }
    pub fn store(&self, pod: PodId, scope: ScopeId, tier: Tier, hashes: &[u64]) {
        let mut m = self.inner.write();
        if m.retired.contains(&pod) {
            return;
        }
        for h in hashes {
            let e = m.map.entry((scope, *h)).or_default();
            if !e.contains(&(pod, tier)) {
                e.push((pod, tier));
            }
        }
    }
    pub fn remove(&self, pod: PodId, scope: ScopeId, tier: Tier, hashes: &[u64]) {
        let mut m = self.inner.write();
        for h in hashes {
            if let Some(e) = m.map.get_mut(&(scope, *h)) {
                e.retain(|x| *x != (pod, tier));
                if e.is_empty() {
                    m.map.remove(&(scope, *h));
                }
            }
        }
    }
    pub fn clear_pod(&self, pod: PodId) {
        let mut m = self.inner.write();
        m.map.retain(|_, e| {
            e.retain(|x| x.0 != pod);
            !e.is_empty()
        });
    }
    pub fn retire_pod(&self, pod: PodId) {
        self.inner.write().retired.insert(pod);
        self.clear_pod(pod);
    }
    pub fn pod_block_count(&self, pod: PodId) -> usize {
        let m = self.inner.read();
        m.map
            .values()
            .filter(|e| e.iter().any(|x| x.0 == pod))
            .count()
    }
    pub fn stats(&self) -> IndexStats {
        let m = self.inner.read();
        let mut pods = HashSet::new();
        let mut entries = 0;
        for e in m.map.values() {
            let mut seen = HashSet::new();
            for x in e {
                pods.insert(x.0);
                if seen.insert(x.0) {
                    entries += 1;
                }
            }
        }
        IndexStats {
            entries,
            blocks: m.map.len() as u64,
            pods: pods.len(),
        }
    }
    pub fn lookup(&self, scope: ScopeId, hashes: &[u64], out: &mut PrefixMatch) {
        out.v.clear();
        let m = self.inner.read();
        let Some(first) = hashes.first().and_then(|h| m.map.get(&(scope, *h))) else {
            return;
        };
        let mut pods: Vec<PodId> = first.iter().map(|x| x.0).collect();
        pods.sort_unstable();
        pods.dedup();
        for p in pods {
            let mut prefix = PodPrefix::default();
            let mut gpu_run = true;
            for h in hashes {
                let holders = m.map.get(&(scope, *h));
                let any = holders.is_some_and(|v| v.iter().any(|x| x.0 == p));
                if !any {
                    break;
                }
                prefix.any_blocks += 1;
                gpu_run &= holders.is_some_and(|v| v.contains(&(p, Tier::Gpu)));
                if gpu_run {
                    prefix.gpu_blocks += 1;
                }
            }
            out.v.push((p, prefix));
        }
    }
}

/// Snapshot of the index for a graceful upgrade (the `index` branch's
/// `src/index/snapshot.rs` replaces this with the same interface).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("reading the index snapshot: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a kvgate index snapshot (version {0})")]
    Format(u8),
}
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub entries: u64,
    pub skipped: u64,
}
const SNAPSHOT_MAGIC: &[u8; 4] = b"KVIX";
impl BlockIndex {
    pub fn snapshot(&self, w: &mut impl std::io::Write) -> std::io::Result<SnapshotStats> {
        let m = self.inner.read();
        let mut runs: HashMap<(PodId, ScopeId, Tier), Vec<u64>> = HashMap::new();
        for ((scope, hash), holders) in &m.map {
            for (pod, tier) in holders {
                runs.entry((*pod, *scope, *tier)).or_default().push(*hash);
            }
        }
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&[1])?;
        let mut stats = SnapshotStats::default();
        for ((pod, scope, tier), hashes) in runs {
            w.write_all(&pod.to_le_bytes())?;
            w.write_all(&scope.to_le_bytes())?;
            w.write_all(&[(tier == Tier::Cpu) as u8])?;
            w.write_all(&(hashes.len() as u32).to_le_bytes())?;
            for h in &hashes {
                w.write_all(&h.to_le_bytes())?;
            }
            stats.entries += hashes.len() as u64;
        }
        w.write_all(&u32::MAX.to_le_bytes())?;
        Ok(stats)
    }
    pub fn restore(
        &self,
        r: &mut impl std::io::Read,
        mut remap: impl FnMut(PodId) -> Option<PodId>,
    ) -> Result<SnapshotStats, SnapshotError> {
        let mut head = [0u8; 5];
        r.read_exact(&mut head)?;
        if &head[..4] != SNAPSHOT_MAGIC || head[4] != 1 {
            return Err(SnapshotError::Format(head[4]));
        }
        let mut stats = SnapshotStats::default();
        let mut word = [0u8; 4];
        loop {
            r.read_exact(&mut word)?;
            let pod = u32::from_le_bytes(word);
            if pod == u32::MAX {
                return Ok(stats);
            }
            r.read_exact(&mut word)?;
            let scope = u32::from_le_bytes(word);
            let mut tier = [0u8; 1];
            r.read_exact(&mut tier)?;
            let tier = if tier[0] == 1 { Tier::Cpu } else { Tier::Gpu };
            r.read_exact(&mut word)?;
            let count = u32::from_le_bytes(word) as usize;
            let mut hashes = Vec::with_capacity(count.min(1 << 16));
            let mut h = [0u8; 8];
            for _ in 0..count {
                r.read_exact(&mut h)?;
                hashes.push(u64::from_le_bytes(h));
            }
            match remap(pod) {
                Some(target) => {
                    self.store(target, scope, tier, &hashes);
                    stats.entries += count as u64;
                }
                None => stats.skipped += count as u64,
            }
        }
    }
}
