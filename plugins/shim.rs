//! TEMPORARY plugin shims until the `plugins` branch merges (deleted then): just enough of
//! `healthy`, `kv-cache`, `load` and `max-score` for the proxy's tests to run a default profile.
use std::sync::Arc;

use super::{Candidate, Plugin, PluginContext, PluginError, Roles, SchedulingRequest};
use crate::index::{BlockIndex, PrefixMatch};
use crate::pods::EventTrust;

pub struct Healthy;
impl Plugin for Healthy {
    fn name(&self) -> &'static str {
        "healthy"
    }
    fn roles(&self) -> Roles {
        Roles::FILTER
    }
    fn filter(&self, req: &SchedulingRequest<'_>, candidates: &mut Vec<Candidate>) {
        let now = req.now.as_millis() as u64;
        candidates.retain(|c| c.pod.is_healthy(now));
    }
}

pub struct KvCache {
    index: Arc<BlockIndex>,
}
impl Plugin for KvCache {
    fn name(&self) -> &'static str {
        "kv-cache"
    }
    fn roles(&self) -> Roles {
        Roles::SCORER
    }
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &mut [Candidate], scores: &mut [f64]) {
        if req.block_keys.is_empty() {
            return;
        }
        let mut found = PrefixMatch::new();
        self.index.lookup(req.scope, req.block_keys, &mut found);
        for (c, s) in candidates.iter_mut().zip(scores.iter_mut()) {
            if c.pod.trust() == EventTrust::Untrusted {
                continue;
            }
            let blocks = found.get(c.pod.id).gpu_blocks;
            c.cached_blocks = c.cached_blocks.max(blocks);
            *s = blocks as f64 / req.block_keys.len() as f64;
        }
    }
}

pub struct Load;
impl Plugin for Load {
    fn name(&self) -> &'static str {
        "load"
    }
    fn roles(&self) -> Roles {
        Roles::SCORER
    }
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        candidates: &mut [Candidate],
        scores: &mut [f64],
    ) {
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            *s = 1.0 / (1.0 + c.pod.in_flight() as f64);
        }
    }
}

pub struct MaxScore;
impl Plugin for MaxScore {
    fn name(&self) -> &'static str {
        "max-score"
    }
    fn roles(&self) -> Roles {
        Roles::PICKER
    }
    fn pick(
        &self,
        _req: &SchedulingRequest<'_>,
        candidates: &[Candidate],
        totals: &[f64],
        order: &mut Vec<usize>,
    ) {
        order.extend(0..candidates.len());
        order.sort_by(|&a, &b| totals[b].total_cmp(&totals[a]));
    }
}

pub fn healthy(
    _: Option<&yaml_serde::Value>,
    _: &PluginContext,
) -> Result<Arc<dyn Plugin>, PluginError> {
    Ok(Arc::new(Healthy))
}
pub fn kv_cache(
    _: Option<&yaml_serde::Value>,
    ctx: &PluginContext,
) -> Result<Arc<dyn Plugin>, PluginError> {
    Ok(Arc::new(KvCache {
        index: Arc::clone(&ctx.index),
    }))
}
pub fn load(
    _: Option<&yaml_serde::Value>,
    _: &PluginContext,
) -> Result<Arc<dyn Plugin>, PluginError> {
    Ok(Arc::new(Load))
}
pub fn max_score(
    _: Option<&yaml_serde::Value>,
    _: &PluginContext,
) -> Result<Arc<dyn Plugin>, PluginError> {
    Ok(Arc::new(MaxScore))
}
