//! Configuration from the cluster: models whose routing is described by an
//! `InferenceTrafficPolicy` (`inferenceextension.alibabacloud.com/v1alpha1`, the resource
//! ACK's Gateway with Inference Extension reads) and the `InferencePool` it names.
//!
//! kvgate's YAML lists such models under `trafficPolicies:` with only what the resources do
//! not say (the served model name, the vLLM release and hash algorithm); the policy supplies
//! the rest:
//!
//! | policy field | kvgate |
//! |---|---|
//! | `poolRef.name` | discovery: the pods the InferencePool (v1 or v1alpha2) selects |
//! | `profile.single.trafficPolicy.prefixCache.mode` | `tracking` → `trackingProfile` (precise), `estimation` → `estimationProfile` (approximate) |
//! | `…trackingConfig.indexerConfig.tokenProcessorConfig.blockSize` | `blockSize` |
//! | `…tokenProcessorConfig.hashSeed` (an integer) | `hashSeed` (the string vLLM reads from `PYTHONHASHSEED`) |
//! | `…tokenProcessorConfig.model` (a hub name) | `tokenizer`/`tokenizerConfig` in the directory `tokenizers` maps it to, or `<tokenizerRoot>/<hub name>`, or `<tokenizerRoot>/<last segment>` |
//!
//! The policies are watched ([`watch::PolicyWatcher`]); a change is applied like a hot reload of
//! the file (all or nothing, by [`crate::reload::Reloader`]), so a policy kvgate cannot honour
//! leaves the previous one serving. Each outcome is reported on the policy as a Kubernetes
//! Event, in the log, and in `kvgate_traffic_policy_applied{policy}`.

mod policy;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ChatTemplateContentFormat, Config, LoraAdapterConfig, ModelConfig};
use crate::discovery::{DiscoveryConfig, KubeDiscoveryConfig};
use crate::hash::HashAlgo;
use crate::vllm::VllmRelease;

pub use policy::{PolicyError, PrefixCacheMode, TrafficPolicy};
pub use watch::{startup, ClusterLink, Outcome, PolicyObjects, PolicyWatcher, StartupError};

/// `trafficPolicies:` in kvgate's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPoliciesConfig {
    /// Namespace of the policies and their pools; defaults to the client's (in-cluster: the
    /// pod's own, else the kubeconfig context's).
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub context: Option<String>,
    /// Hub name (the policy's `model`) → the directory holding that model's `tokenizer.json`
    /// and `tokenizer_config.json`, e.g. where the model volume is mounted.
    #[serde(default)]
    pub tokenizers: BTreeMap<String, PathBuf>,
    /// A directory of model directories (the model volume): a hub name not in `tokenizers`
    /// is looked up as `<root>/<hub name>`, then `<root>/<its last path segment>`.
    #[serde(default)]
    pub tokenizer_root: Option<PathBuf>,
    /// The profile a `tracking` (precise) policy selects.
    #[serde(default = "tracking_profile")]
    pub tracking_profile: String,
    /// The profile an `estimation` (approximate) policy selects.
    #[serde(default = "estimation_profile")]
    pub estimation_profile: String,
    pub models: Vec<PolicyModelConfig>,
}

fn tracking_profile() -> String {
    "default".into()
}

fn estimation_profile() -> String {
    "approximate".into()
}

/// One model routed by a policy: what kvgate needs that the policy does not say.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyModelConfig {
    /// The `model` name clients send (vLLM's `--served-model-name`).
    pub name: String,
    /// The InferenceTrafficPolicy's name.
    pub policy: String,
    /// vLLM's `--prefix-caching-hash-algo` (not in the policy: it follows from the release).
    pub hash_algo: HashAlgo,
    pub vllm_release: VllmRelease,
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// vLLM's template flags, as on a model of `models`.
    #[serde(default)]
    pub default_chat_template_kwargs: Option<crate::tokenize::JsonObject>,
    #[serde(default)]
    pub chat_template_content_format: ChatTemplateContentFormat,
    #[serde(default = "crate::config::default_token_cache_bytes")]
    pub token_cache_bytes: usize,
    #[serde(default)]
    pub pod_kv_blocks: Option<usize>,
    #[serde(default)]
    pub lora_adapters: Vec<LoraAdapterConfig>,
}

impl TrafficPoliciesConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.models.is_empty() {
            return Err("trafficPolicies.models is empty".into());
        }
        let mut policies = std::collections::HashSet::new();
        for model in &self.models {
            if model.name.is_empty() || model.policy.is_empty() {
                return Err("trafficPolicies.models: name and policy must not be empty".into());
            }
            if !policies.insert(model.policy.as_str()) {
                return Err(format!(
                    "trafficPolicies.models: policy {:?} is named twice",
                    model.policy
                ));
            }
        }
        if self.namespace.as_deref().is_some_and(str::is_empty) {
            return Err("trafficPolicies.namespace must not be empty".into());
        }
        Ok(())
    }

    /// Relative paths are relative to the config file.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.tokenizers.values_mut().for_each(fix);
        if let Some(root) = self.tokenizer_root.as_mut() {
            fix(root);
        }
        for model in &mut self.models {
            if let Some(template) = model.chat_template.as_mut() {
                fix(template);
            }
        }
    }

    /// The directory of a hub model's tokenizer files.
    fn tokenizer_dir(&self, hub: &str) -> Result<PathBuf, PolicyError> {
        if let Some(dir) = self.tokenizers.get(hub) {
            return Ok(dir.clone());
        }
        let mut tried = Vec::new();
        if let Some(root) = &self.tokenizer_root {
            let last = hub.rsplit('/').next().unwrap_or(hub);
            for candidate in [root.join(hub), root.join(last)] {
                if candidate.join("tokenizer.json").is_file() {
                    return Ok(candidate);
                }
                tried.push(candidate.display().to_string());
            }
        }
        Err(PolicyError::Unhonourable(format!(
            "no tokenizer for model {hub:?}: add it to trafficPolicies.tokenizers{}",
            if tried.is_empty() {
                " or set trafficPolicies.tokenizerRoot".to_string()
            } else {
                format!(" (looked for tokenizer.json in {})", tried.join(", "))
            }
        )))
    }

    /// The model config a policy describes, with what the YAML adds.
    fn model(
        &self,
        model: &PolicyModelConfig,
        policy: &TrafficPolicy,
    ) -> Result<ModelConfig, PolicyError> {
        let dir = self.tokenizer_dir(&policy.hub_model)?;
        let tokenizer = dir.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(PolicyError::Unhonourable(format!(
                "model {:?}: {} is not a file",
                policy.hub_model,
                tokenizer.display()
            )));
        }
        let tokenizer_config = Some(dir.join("tokenizer_config.json")).filter(|p| p.is_file());
        let profile = match policy.mode {
            PrefixCacheMode::Tracking => &self.tracking_profile,
            PrefixCacheMode::Estimation => &self.estimation_profile,
        };
        Ok(ModelConfig {
            name: model.name.clone(),
            tokenizer,
            tokenizer_config,
            chat_template: model.chat_template.clone(),
            default_chat_template_kwargs: model.default_chat_template_kwargs.clone(),
            chat_template_content_format: model.chat_template_content_format,
            token_cache_bytes: model.token_cache_bytes,
            block_size: policy.block_size,
            hash_algo: model.hash_algo,
            hash_seed: policy.hash_seed.clone(),
            vllm_release: model.vllm_release,
            pod_kv_blocks: model
                .pod_kv_blocks
                .unwrap_or_else(crate::config::default_pod_kv_blocks),
            lora_adapters: model.lora_adapters.clone(),
            adapter_splits: std::collections::BTreeMap::new(),
            profile: profile.clone(),
            discovery: DiscoveryConfig::Kubernetes(KubeDiscoveryConfig {
                namespace: self.namespace.clone(),
                service: None,
                label_selector: None,
                inference_pool: Some(policy.pool.clone()),
                port: None,
                events_port: None,
                replay_port: None,
                kubeconfig: self.kubeconfig.clone(),
                context: self.context.clone(),
                role_label: None,
            }),
            flow_control: None,
        })
    }
}

/// Why the cluster's policies could not be applied, naming the policy.
#[derive(Debug, thiserror::Error)]
#[error("InferenceTrafficPolicy {policy:?}: {source}")]
pub struct PolicyRefused {
    pub policy: String,
    #[source]
    pub source: PolicyError,
}

/// The config to run: the file's, with one model per policy completed from the cluster.
pub fn compose(mut config: Config, objects: &PolicyObjects) -> Result<Config, PolicyRefused> {
    let Some(policies) = config.traffic_policies.clone() else {
        return Ok(config);
    };
    for model in &policies.models {
        let refused = |source| PolicyRefused {
            policy: model.policy.clone(),
            source,
        };
        let object = objects
            .get(&model.policy)
            .ok_or_else(|| refused(PolicyError::Missing))?;
        let policy = TrafficPolicy::from_object(object).map_err(refused)?;
        let resolved = policies.model(model, &policy).map_err(refused)?;
        config.models.push(resolved);
    }
    config.validate().map_err(|e| PolicyRefused {
        policy: policies
            .models
            .iter()
            .map(|m| m.policy.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        source: PolicyError::Unhonourable(e.to_string()),
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOKENIZER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.tokenizers/qwen3");

    fn config(extra: &str) -> Config {
        let yaml = format!(
            "profiles:\n  default: {{scorers: [{{name: kv-cache}}, {{name: load}}]}}\n  approximate: {{scorers: [{{name: prefix}}]}}\n\
             trafficPolicies:\n  namespace: default\n  tokenizers: {{\"Qwen/Qwen3-32B\": {TOKENIZER_DIR}}}\n{extra}  models:\n    \
             - {{name: Qwen3-32B, policy: inference-policy, hashAlgo: sha256_cbor_64bit, vllmRelease: \"0.10.1.1\"}}\n"
        );
        let config = Config::parse(&yaml).expect("parses");
        config.validate().expect("valid without models of its own");
        config
    }

    /// The seed's policy, as ACK's guide writes it.
    fn seed_policy(mode: &str, block_size: u64) -> serde_json::Value {
        json!({
            "apiVersion": "inferenceextension.alibabacloud.com/v1alpha1",
            "kind": "InferenceTrafficPolicy",
            "metadata": {"name": "inference-policy", "namespace": "default"},
            "spec": {
                "poolRef": {"name": "qwen-inference-pool"},
                "profile": {"single": {"trafficPolicy": {"prefixCache": {
                    "mode": mode,
                    "trackingConfig": {"indexerConfig": {"tokenProcessorConfig": {
                        "blockSize": block_size, "hashSeed": 42, "model": "Qwen/Qwen3-32B"
                    }}}
                }}}}
            }
        })
    }

    fn objects(policy: serde_json::Value) -> PolicyObjects {
        PolicyObjects::from_iter([("inference-policy".to_string(), policy)])
    }

    #[test]
    fn the_seed_policy_configures_the_model() {
        let composed = compose(config(""), &objects(seed_policy("tracking", 64))).expect("ok");
        let model = composed.model("Qwen3-32B").expect("model from the policy");
        assert_eq!(model.block_size, 64);
        assert_eq!(model.hash_seed.as_deref(), Some("42"));
        assert_eq!(model.hash_algo, HashAlgo::Sha256Cbor64bit);
        assert_eq!(model.profile, "default");
        assert_eq!(
            model.tokenizer,
            Path::new(TOKENIZER_DIR).join("tokenizer.json")
        );
        assert!(model.tokenizer_config.is_some());
        match &model.discovery {
            DiscoveryConfig::Kubernetes(k) => {
                assert_eq!(k.inference_pool.as_deref(), Some("qwen-inference-pool"));
                assert_eq!(k.namespace.as_deref(), Some("default"));
            }
            other => panic!("{other:?}"),
        }
        let approximate = compose(config(""), &objects(seed_policy("estimation", 64))).expect("ok");
        assert_eq!(approximate.models[0].profile, "approximate");
    }

    #[test]
    fn the_model_volume_convention_finds_the_tokenizer() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("Qwen3-32B");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::copy(
            Path::new(TOKENIZER_DIR).join("tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .expect("copy");
        let mut config = config("");
        let policies = config.traffic_policies.as_mut().expect("set");
        policies.tokenizers.clear();
        policies.tokenizer_root = Some(root.path().to_path_buf());
        let composed = compose(config.clone(), &objects(seed_policy("tracking", 64))).expect("ok");
        assert_eq!(composed.models[0].tokenizer, dir.join("tokenizer.json"));
        assert_eq!(composed.models[0].tokenizer_config, None);
        config
            .traffic_policies
            .as_mut()
            .expect("set")
            .tokenizer_root = None;
        let err = compose(config, &objects(seed_policy("tracking", 64))).unwrap_err();
        assert!(err.to_string().contains("no tokenizer"), "{err}");
    }

    #[test]
    fn policies_kvgate_cannot_honour_are_refused_with_the_reason() {
        let cases = [
            (seed_policy("tracking", 0), "blockSize"),
            (seed_policy("magic", 64), "mode"),
            (
                {
                    let mut p = seed_policy("tracking", 64);
                    p["spec"]["profile"]["pd"] = json!({"prefill": {}, "decode": {}});
                    p
                },
                "pd",
            ),
            (
                {
                    let mut p = seed_policy("tracking", 64);
                    p["spec"]["profile"]["single"]["trafficPolicy"]["prefixCache"]
                        ["trackingConfig"]["indexerConfig"]["tokenProcessorConfig"]["hashSeed"] =
                        json!(-1);
                    p
                },
                "hashSeed",
            ),
            (
                {
                    let mut p = seed_policy("tracking", 64);
                    p["spec"]["poolRef"] = json!({});
                    p
                },
                "poolRef",
            ),
        ];
        for (policy, field) in cases {
            let err = compose(config(""), &objects(policy))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(field) && err.contains("inference-policy"),
                "{field}: {err}"
            );
        }
        let err = compose(config(""), &PolicyObjects::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
    }
}
