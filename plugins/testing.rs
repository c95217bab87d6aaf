//! Fixtures shared by the plugins' unit tests: real `Pod`s with distinct stable keys.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::{Candidate, PluginContext, SchedulingRequest};
use crate::discovery::PodEndpoint;
use crate::index::{BlockIndex, IndexConfig};
use crate::pods::Pod;

pub const BLOCK_SIZE: usize = 16;

pub fn endpoint(i: u32) -> PodEndpoint {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, (i % 250) as u8 + 1));
    PodEndpoint {
        key: format!("default/vllm-{i}"),
        name: format!("vllm-{i}"),
        http: SocketAddr::new(ip, 8000),
        events: None,
        replay: None,
        topic_host: ip.to_string(),
        role: Default::default(),
    }
}

pub fn candidates(n: u32) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate::new(Arc::new(Pod::new(i, endpoint(i)))))
        .collect()
}

pub fn request(blocks: &[u64]) -> SchedulingRequest<'_> {
    SchedulingRequest {
        request_id: "req-1",
        model: "qwen3",
        scope: 0,
        adapter: None,
        block_keys: blocks,
        block_size: BLOCK_SIZE,
        prompt_tokens: blocks.len() * BLOCK_SIZE,
        session: None,
        now: Duration::ZERO,
    }
}

pub fn context() -> PluginContext {
    PluginContext {
        index: Arc::new(BlockIndex::new(IndexConfig {
            budget_bytes: 1 << 20,
            shards: 1,
        })),
        targets: Arc::default(),
        block_size: BLOCK_SIZE,
        pod_kv_blocks: 1_024,
    }
}

pub fn params(yaml: &str) -> yaml_serde::Value {
    yaml_serde::from_str(yaml).expect("test params are valid YAML")
}

/// Runs a scorer over `candidates` and returns its scores.
pub fn scores(
    plugin: &dyn super::Scorer,
    req: &SchedulingRequest<'_>,
    candidates: &mut [Candidate],
) -> Vec<f64> {
    let mut out = vec![0.0; candidates.len()];
    plugin.score(req, candidates, &mut out);
    out
}
