//! The fields of an `InferenceTrafficPolicy` kvgate reads, checked for what kvgate can honour.
//!
//! Fields kvgate does not read are left alone (the resource is ACK's and may grow), but a
//! profile kvgate does not implement (prefill/decode disaggregation, `pd`) or a value it cannot
//! use refuses the whole policy: routing as if it were not there would silently ignore what
//! the operator asked for.

use serde::Deserialize;
use serde_json::Value;

/// How the policy tracks prefix caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixCacheMode {
    /// Precise: from the pods' KV events.
    Tracking,
    /// Approximate: from the gateway's own routing history.
    Estimation,
}

/// What one policy configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficPolicy {
    /// The InferencePool (same namespace).
    pub pool: String,
    pub mode: PrefixCacheMode,
    pub block_size: usize,
    /// `hashSeed` as vLLM reads `PYTHONHASHSEED`: the integer's decimal string.
    pub hash_seed: Option<String>,
    /// The model's hub name, e.g. `Qwen/Qwen3-32B`.
    pub hub_model: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("not found in the cluster")]
    Missing,
    #[error("cannot be honoured: {0}")]
    Unhonourable(String),
}

fn unhonourable(message: impl Into<String>) -> PolicyError {
    PolicyError::Unhonourable(message.into())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    pool_ref: Option<PoolRef>,
    profile: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolRef {
    name: Option<String>,
    group: Option<String>,
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Single {
    traffic_policy: Option<SingleTraffic>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SingleTraffic {
    prefix_cache: Option<PrefixCache>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PrefixCache {
    mode: Option<String>,
    tracking_config: Option<TrackingConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrackingConfig {
    indexer_config: Option<IndexerConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexerConfig {
    token_processor_config: Option<TokenProcessorConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenProcessorConfig {
    block_size: Option<Value>,
    hash_seed: Option<Value>,
    model: Option<String>,
}

const POOL_GROUPS: [&str; 2] = [
    "inference.networking.x-k8s.io",
    "inference.networking.k8s.io",
];
const PROCESSOR: &str =
    "spec.profile.single.trafficPolicy.prefixCache.trackingConfig.indexerConfig.tokenProcessorConfig";

impl TrafficPolicy {
    /// Reads a policy object (as the apiserver returns it).
    pub fn from_object(object: &Value) -> Result<Self, PolicyError> {
        let spec = object
            .get("spec")
            .ok_or_else(|| unhonourable("it has no spec"))?;
        let spec =
            Spec::deserialize(spec).map_err(|e| unhonourable(format!("malformed spec: {e}")))?;
        let pool_ref = spec
            .pool_ref
            .ok_or_else(|| unhonourable("spec.poolRef is missing"))?;
        let pool = pool_ref
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| unhonourable("spec.poolRef.name is missing"))?;
        if let Some(group) = pool_ref.group.filter(|g| !g.is_empty()) {
            if !POOL_GROUPS.contains(&group.as_str()) {
                return Err(unhonourable(format!(
                    "spec.poolRef.group {group:?} is not an InferencePool group ({})",
                    POOL_GROUPS.join(", ")
                )));
            }
        }
        if let Some(kind) = pool_ref.kind.filter(|k| k != "InferencePool") {
            return Err(unhonourable(format!(
                "spec.poolRef.kind {kind:?}: only an InferencePool can be routed to"
            )));
        }
        let profile = spec
            .profile
            .ok_or_else(|| unhonourable("spec.profile is missing"))?;
        if let Some(other) = profile.keys().find(|k| *k != "single") {
            return Err(unhonourable(format!(
                "spec.profile.{other}: kvgate routes plain vLLM deployments (profile `single`) only"
            )));
        }
        let single = profile
            .get("single")
            .ok_or_else(|| unhonourable("spec.profile.single is missing"))?;
        let single = Single::deserialize(single)
            .map_err(|e| unhonourable(format!("malformed spec.profile.single: {e}")))?;
        let prefix_cache = single
            .traffic_policy
            .and_then(|t| t.prefix_cache)
            .ok_or_else(|| {
                unhonourable("spec.profile.single.trafficPolicy.prefixCache is missing")
            })?;
        let mode = match prefix_cache.mode.as_deref() {
            Some("tracking") => PrefixCacheMode::Tracking,
            Some("estimation") => PrefixCacheMode::Estimation,
            other => {
                return Err(unhonourable(format!(
                    "spec.profile.single.trafficPolicy.prefixCache.mode {other:?}: \
                     kvgate supports `tracking` (precise) and `estimation` (approximate)"
                )))
            }
        };
        // kvgate tokenizes in both modes, so it needs the model and block size either way.
        let processor = prefix_cache
            .tracking_config
            .and_then(|t| t.indexer_config)
            .and_then(|i| i.token_processor_config)
            .ok_or_else(|| unhonourable(format!("{PROCESSOR} is missing")))?;
        let block_size = processor
            .block_size
            .as_ref()
            .and_then(Value::as_u64)
            .filter(|&b| (1..=4096).contains(&b))
            .ok_or_else(|| {
                unhonourable(format!(
                    "{PROCESSOR}.blockSize must be an integer between 1 and 4096 (vLLM's \
                     --block-size), got {}",
                    processor
                        .block_size
                        .as_ref()
                        .map_or("nothing".into(), Value::to_string)
                ))
            })?;
        let hash_seed = match &processor.hash_seed {
            None | Some(Value::Null) => None,
            Some(seed) => Some(
                seed.as_u64()
                    .filter(|&s| s <= u64::from(u32::MAX))
                    .map(|s| s.to_string())
                    .ok_or_else(|| {
                        unhonourable(format!(
                            "{PROCESSOR}.hashSeed must be an integer between 0 and 4294967295 \
                             (PYTHONHASHSEED), got {seed}"
                        ))
                    })?,
            ),
        };
        let hub_model = processor
            .model
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| unhonourable(format!("{PROCESSOR}.model is missing")))?;
        Ok(Self {
            pool,
            mode,
            block_size: block_size as usize,
            hash_seed,
            hub_model,
        })
    }
}
