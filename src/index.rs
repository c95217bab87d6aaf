//! TEMPORARY interface shim until the `index` branch merges (replaced whole).
pub type PodId = u32;
pub type ScopeId = u32;
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tier {
    Gpu,
    Cpu,
}
pub struct IndexConfig {
    pub budget_bytes: usize,
    pub shards: usize,
}
#[derive(Default)]
pub struct BlockIndex {
    map: parking_lot::Mutex<std::collections::HashMap<(ScopeId, u64), Vec<(PodId, Tier)>>>,
}
#[derive(Clone, Copy, Default, Debug)]
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
}
impl BlockIndex {
    pub fn new(_c: IndexConfig) -> Self {
        Self::default()
    }
    pub fn store(&self, pod: PodId, scope: ScopeId, tier: Tier, hashes: &[u64]) {
        let mut m = self.map.lock();
        for h in hashes {
            let e = m.entry((scope, *h)).or_default();
            if !e.contains(&(pod, tier)) {
                e.push((pod, tier));
            }
        }
    }
    pub fn lookup(&self, scope: ScopeId, hashes: &[u64], out: &mut PrefixMatch) {
        out.v.clear();
        let m = self.map.lock();
        let mut pods: Vec<PodId> = m
            .get(&(scope, hashes.first().copied().unwrap_or(0)))
            .map(|v| v.iter().map(|x| x.0).collect())
            .unwrap_or_default();
        pods.dedup();
        for p in pods {
            let mut n = 0;
            for h in hashes {
                if m.get(&(scope, *h))
                    .is_some_and(|v| v.iter().any(|x| x.0 == p))
                {
                    n += 1
                } else {
                    break;
                }
            }
            out.v.push((
                p,
                PodPrefix {
                    gpu_blocks: n,
                    any_blocks: n,
                },
            ));
        }
    }
}
