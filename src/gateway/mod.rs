//! The proxy's shared state. What a config reload may change (tokenizers, hashers,
//! schedulers, adapter routes, server tunables) lives in one [`GatewayState`] behind an
//! `ArcSwap`, swapped whole; what must outlive a reload (the block index, the pods and
//! their load accounting, index scopes) sits beside it.

pub mod split;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;

use self::split::AdapterSplit;
use crate::config::{Config, ModelConfig};
use crate::flow::FlowControl;
use crate::hash::{BlockHasher, HashConfigError, LoraKey};
use crate::index::{BlockIndex, IndexConfig, IndexTargets, ScopeId};
use crate::plugins::{PluginContext, PluginError};
use crate::pods::{PodChanges, PodRegistry};
use crate::scheduler::ModelScheduler;
use crate::scope::scope_id;
use crate::tokenize::{ModelTokenizer, TokenizerLoadError};

/// Index shards: enough that concurrent event batches and lookups rarely meet on one lock.
const INDEX_SHARDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("model {model:?}: cannot load its tokenizer: {source}")]
    Tokenizer {
        model: String,
        source: TokenizerLoadError,
    },
    #[error("model {model:?}: hash settings: {source}")]
    Hash {
        model: String,
        source: HashConfigError,
    },
    #[error("model {model:?}: scheduling profiles: {source}")]
    Plugin { model: String, source: PluginError },
}

/// Everything one served model needs on the request path.
pub struct ModelRuntime {
    pub name: String,
    pub tokenizer: ModelTokenizer,
    pub hasher: BlockHasher,
    pub scheduler: ModelScheduler,
    pub block_size: usize,
}

/// Where a requested `model` name goes: a base model, or a LoRA adapter on one.
pub struct Route {
    pub model: Arc<ModelRuntime>,
    pub lora: Option<LoraKey>,
    pub scope: ScopeId,
}

/// The reloadable part.
pub struct GatewayState {
    pub config: Arc<Config>,
    routes: HashMap<String, Route>,
    /// Canary splits by the name clients send.
    splits: HashMap<String, AdapterSplit>,
    /// `GET /v1/models`, rendered once per config.
    models_json: Bytes,
}

impl GatewayState {
    /// The route for a requested `model` (served name or adapter name).
    pub fn route(&self, requested: &str) -> Option<&Route> {
        self.routes.get(requested)
    }

    /// The canary split a requested `model` names, if any.
    pub fn split(&self, requested: &str) -> Option<&AdapterSplit> {
        self.splits.get(requested)
    }

    /// The only base model, when exactly one is configured (used for requests that name none).
    pub fn sole_model(&self) -> Option<&str> {
        match self.config.models.as_slice() {
            [only] => Some(only.name.as_str()),
            _ => None,
        }
    }

    pub fn models_json(&self) -> Bytes {
        self.models_json.clone()
    }
}

pub struct Gateway {
    pub index: Arc<BlockIndex>,
    /// Index ids of pods whose blocks are not only under their own id (data-parallel
    /// ranks); event ingestion writes it, the kv-cache scorer reads it.
    pub targets: Arc<IndexTargets>,
    pub pods: Arc<PodRegistry>,
    /// Requests waiting for a saturated model's pods; its queues outlive reloads.
    pub flow: Arc<FlowControl>,
    state: ArcSwap<GatewayState>,
    epoch: Instant,
    /// The process is handing over to a new one or stopping: responses close their
    /// connections so clients reconnect to whichever process still listens.
    draining: AtomicBool,
    active: Arc<AtomicUsize>,
}

/// One request being handled; counted until dropped.
#[derive(Debug)]
pub struct ActiveRequest(Arc<AtomicUsize>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gateway {
    pub fn build(config: Config) -> Result<Self, GatewayError> {
        let index = Arc::new(BlockIndex::new(IndexConfig {
            budget_bytes: config.index.budget_bytes,
            shards: INDEX_SHARDS,
        }));
        let pods = Arc::new(PodRegistry::new(
            config.models.iter().map(|m| m.name.as_str()),
        ));
        let targets = Arc::new(IndexTargets::default());
        let state = build_state(config, &index, &targets)?;
        let epoch = Instant::now();
        let flow = Arc::new(FlowControl::new(
            &state.config,
            Arc::clone(&pods),
            epoch,
            Arc::clone(crate::metrics::global()),
        ));
        Ok(Self {
            index,
            targets,
            pods,
            flow,
            state: ArcSwap::from_pointee(state),
            epoch,
            draining: AtomicBool::new(false),
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The current reloadable state; cheap, lock-free.
    pub fn state(&self) -> Arc<GatewayState> {
        self.state.load_full()
    }

    /// Builds the new state completely before swapping, so a bad config leaves the
    /// running one untouched. Pods, their load and the index carry over; models may come
    /// and go: the pods of a dropped model are returned as removed.
    pub fn reload(&self, config: Config) -> Result<PodChanges, GatewayError> {
        let state = build_state(config, &self.index, &self.targets)?;
        let changes = self
            .pods
            .set_models(state.config.models.iter().map(|m| m.name.as_str()));
        self.flow.configure(&state.config);
        self.state.store(Arc::new(state));
        Ok(changes)
    }

    /// The index scope of a model or one of its adapters (also for event ingestion, which
    /// learns the adapter from `lora_name`).
    pub fn scope(&self, model: &str, adapter: Option<&str>) -> ScopeId {
        scope_id(model, adapter)
    }

    /// Counts a request until the returned guard drops.
    pub fn begin_request(&self) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(Arc::clone(&self.active))
    }

    /// Requests being handled right now.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Monotonic time since start: the clock of pod ejection and scheduling decisions.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }
}

fn build_state(
    config: Config,
    index: &Arc<BlockIndex>,
    targets: &Arc<IndexTargets>,
) -> Result<GatewayState, GatewayError> {
    let mut routes = HashMap::new();
    let mut splits = HashMap::new();
    for model in &config.models {
        for (name, targets) in &model.adapter_splits {
            splits.insert(name.clone(), AdapterSplit::new(targets));
        }
        let runtime = Arc::new(build_model(&config, model, index, targets)?);
        routes.insert(
            model.name.clone(),
            Route {
                model: Arc::clone(&runtime),
                lora: None,
                scope: scope_id(&model.name, None),
            },
        );
        for adapter in &model.lora_adapters {
            routes.insert(
                adapter.name.clone(),
                Route {
                    model: Arc::clone(&runtime),
                    lora: Some(adapter.hash_key()),
                    scope: scope_id(&model.name, Some(&adapter.name)),
                },
            );
        }
    }
    let models_json = render_models(&config);
    Ok(GatewayState {
        config: Arc::new(config),
        routes,
        splits,
        models_json,
    })
}

fn build_model(
    config: &Config,
    model: &ModelConfig,
    index: &Arc<BlockIndex>,
    targets: &Arc<IndexTargets>,
) -> Result<ModelRuntime, GatewayError> {
    let tokenizer = ModelTokenizer::for_model(model).map_err(|source| GatewayError::Tokenizer {
        model: model.name.clone(),
        source,
    })?;
    let hasher = BlockHasher::new(&model.hash_settings()).map_err(|source| GatewayError::Hash {
        model: model.name.clone(),
        source,
    })?;
    let ctx = PluginContext {
        index: Arc::clone(index),
        targets: Arc::clone(targets),
        block_size: model.block_size,
        pod_kv_blocks: model.pod_kv_blocks,
    };
    let scheduler =
        ModelScheduler::build(&config.profiles, &model.profile, &ctx).map_err(|source| {
            GatewayError::Plugin {
                model: model.name.clone(),
                source,
            }
        })?;
    Ok(ModelRuntime {
        name: model.name.clone(),
        tokenizer,
        hasher,
        scheduler,
        block_size: model.block_size,
    })
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelCard<'a>>,
}

/// One entry of `GET /v1/models`, shaped like vLLM's.
#[derive(Serialize)]
struct ModelCard<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: &'a str,
    parent: Option<&'a str>,
}

fn render_models(config: &Config) -> Bytes {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut data = Vec::new();
    for model in &config.models {
        data.push(ModelCard {
            id: &model.name,
            object: "model",
            created,
            owned_by: "kvgate",
            root: &model.name,
            parent: None,
        });
        for adapter in &model.lora_adapters {
            data.push(ModelCard {
                id: &adapter.name,
                object: "model",
                created,
                owned_by: "kvgate",
                root: if adapter.path.is_empty() {
                    &adapter.name
                } else {
                    &adapter.path
                },
                parent: Some(&model.name),
            });
        }
    }
    // Serializing plain strings and integers cannot fail.
    Bytes::from(
        serde_json::to_vec(&ModelList {
            object: "list",
            data,
        })
        .unwrap_or_default(),
    )
}
