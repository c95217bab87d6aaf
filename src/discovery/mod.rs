//! Pod discovery: which vLLM pods serve a model, as a stream of full snapshots.
//!
//! A source (a static list, or Kubernetes EndpointSlices / Endpoints / an InferencePool's pods)
//! runs until shutdown and publishes every change on a `watch` channel as the complete, sorted
//! list of READY endpoints. Consumers diff snapshots by [`PodEndpoint::key`]; a restarted pod has
//! a new key, so its index state is never confused with its previous incarnation's.
//!
//! Errors talking to the apiserver never empty the snapshot: the last known list stays until a
//! fresh list or watch event says otherwise.

mod feed;
mod kube;
mod static_list;

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;

pub use self::feed::DiscoveryFeed;
pub use self::kube::{client as kube_client, KubeDiscoveryConfig, PortRef};
pub use self::static_list::StaticPod;

/// One serving endpoint of a model, as discovery sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodEndpoint {
    /// Stable identity of this pod incarnation: `<namespace>/<pod name>/<pod uid>` (Kubernetes)
    /// or the HTTP address (static). A restart (new UID) gives a new key.
    pub key: String,
    /// Pod name or address, for logs.
    pub name: String,
    /// Where the pod serves the OpenAI API.
    pub http: SocketAddr,
    /// Connect mode: the pod's ZMQ PUB endpoint, e.g. `tcp://10.0.0.5:5557`.
    pub events: Option<String>,
    /// The pod's ZMQ ROUTER replay endpoint, when configured.
    pub replay: Option<String>,
    /// What the pod puts in its topic `kv@<topic_host>@<model>`: the pod IP.
    pub topic_host: String,
    /// Which leg of a disaggregated request the pod serves.
    pub role: PodRole,
}

/// A pod's part in prefill/decode disaggregation (llm-d's `llm-d.ai/role` values).
/// Aggregated profiles use every pod whatever its role; a disaggregated profile picks
/// its decode pod among `decode` and `both` pods, its prefill pod among `prefill` and `both`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodRole {
    Prefill,
    Decode,
    #[default]
    Both,
}

/// The two legs of a disaggregated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    Prefill,
    Decode,
}

impl PodRole {
    /// The role a `llm-d.ai/role` label value names (`prefill`, `decode`, `both`).
    pub fn from_label(value: &str) -> Option<Self> {
        match value {
            "prefill" => Some(Self::Prefill),
            "decode" => Some(Self::Decode),
            "both" => Some(Self::Both),
            _ => None,
        }
    }

    pub fn serves(self, leg: Leg) -> bool {
        matches!(
            (self, leg),
            (Self::Both, _) | (Self::Prefill, Leg::Prefill) | (Self::Decode, Leg::Decode)
        )
    }
}

/// A full snapshot of a model's ready endpoints, sorted by key.
pub type Snapshot = Arc<Vec<PodEndpoint>>;

/// Where one model's pods come from. Embedded in the central config as `discovery:`, written
/// `{static: {pods: [...]}}` or `{kubernetes: {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DiscoverySource")]
pub enum DiscoveryConfig {
    /// A fixed list of pods.
    Static { pods: Vec<StaticPod> },
    /// Pods found through the Kubernetes API.
    Kubernetes(KubeDiscoveryConfig),
}

/// The written form: a map with exactly one key. YAML serde crates read externally tagged
/// enums only as `!tags`, so the one-of is checked here instead.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoverySource {
    #[serde(rename = "static")]
    static_list: Option<StaticSource>,
    kubernetes: Option<KubeDiscoveryConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticSource {
    pods: Vec<StaticPod>,
}

impl TryFrom<DiscoverySource> for DiscoveryConfig {
    type Error = String;

    fn try_from(source: DiscoverySource) -> Result<Self, String> {
        match (source.static_list, source.kubernetes) {
            (Some(list), None) => Ok(Self::Static { pods: list.pods }),
            (None, Some(kube)) => Ok(Self::Kubernetes(kube)),
            _ => Err("discovery needs exactly one of `static` or `kubernetes`".into()),
        }
    }
}

impl DiscoveryConfig {
    /// Checks what serde cannot: the combinations of fields that make a usable source.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        match self {
            Self::Static { pods } => static_list::validate(pods),
            Self::Kubernetes(cfg) => cfg.validate(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid discovery config: {0}")]
    InvalidConfig(String),
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: ::kube::config::KubeconfigError,
    },
    #[error("cannot load Kubernetes client config (kubeconfig or in-cluster): {0}")]
    InferConfig(#[from] ::kube::config::InferConfigError),
    #[error("cannot build Kubernetes client: {0}")]
    Client(#[source] ::kube::Error),
}

/// The shutdown signal: Pingora's `ShutdownWatch` (`true` means stop). A dropped sender stops too.
pub type Shutdown = watch::Receiver<bool>;

/// Runs one model's discovery until `shutdown`, publishing every change as a full snapshot of
/// ready endpoints on `tx`. Returns an error only for problems no retry can fix (an invalid
/// config, an unreadable kubeconfig); apiserver errors are retried with backoff forever.
pub async fn run_discovery(
    cfg: DiscoveryConfig,
    model: String,
    tx: watch::Sender<Snapshot>,
    shutdown: Shutdown,
) -> Result<(), DiscoveryError> {
    cfg.validate()?;
    let publisher = Publisher { tx, model };
    match cfg {
        DiscoveryConfig::Static { pods } => {
            static_list::run(&pods, &publisher, shutdown).await;
            Ok(())
        }
        DiscoveryConfig::Kubernetes(kube_cfg) => kube::run(kube_cfg, &publisher, shutdown).await,
    }
}

/// Publishes snapshots for one model, only when they differ from the last one.
struct Publisher {
    tx: watch::Sender<Snapshot>,
    model: String,
}

impl Publisher {
    fn publish(&self, mut endpoints: Vec<PodEndpoint>) {
        endpoints.sort_by(|a, b| a.key.cmp(&b.key));
        // The same pod can sit in two EndpointSlices while the controller rebalances them.
        endpoints.dedup_by(|a, b| a.key == b.key);
        self.tx.send_if_modified(|current| {
            if **current == endpoints {
                return false;
            }
            let added = endpoints.iter().filter(|e| !contains_key(current, &e.key));
            let removed = current.iter().filter(|e| !contains_key(&endpoints, &e.key));
            tracing::info!(
                model = %self.model,
                ready = endpoints.len(),
                added = ?added.map(|e| e.key.as_str()).collect::<Vec<_>>(),
                removed = ?removed.map(|e| e.key.as_str()).collect::<Vec<_>>(),
                "discovery snapshot changed"
            );
            *current = Arc::new(endpoints);
            true
        });
    }
}

fn contains_key(sorted: &[PodEndpoint], key: &str) -> bool {
    sorted.binary_search_by(|e| e.key.as_str().cmp(key)).is_ok()
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn cancelled(shutdown: &mut Shutdown) {
    // An Err from wait_for means the sender was dropped: nobody can ever ask to continue.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(key: &str, port: u16) -> PodEndpoint {
        PodEndpoint {
            key: key.into(),
            name: key.into(),
            http: SocketAddr::from(([10, 0, 0, 1], port)),
            events: None,
            replay: None,
            topic_host: "10.0.0.1".into(),
            role: Default::default(),
        }
    }

    #[test]
    fn publisher_sorts_dedups_and_skips_unchanged_snapshots() {
        let (tx, mut rx) = watch::channel(Arc::new(Vec::new()));
        let publisher = Publisher {
            tx,
            model: "m".into(),
        };
        publisher.publish(vec![endpoint("b", 1), endpoint("a", 2), endpoint("b", 1)]);
        assert!(rx.has_changed().unwrap());
        let keys: Vec<_> = rx
            .borrow_and_update()
            .iter()
            .map(|e| e.key.clone())
            .collect();
        assert_eq!(keys, ["a", "b"]);
        publisher.publish(vec![endpoint("a", 2), endpoint("b", 1)]);
        assert!(
            !rx.has_changed().unwrap(),
            "an identical snapshot must not wake consumers"
        );
        publisher.publish(vec![endpoint("a", 2)]);
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn exactly_one_source() {
        let parse = |yaml: &str| yaml_serde::from_str::<DiscoveryConfig>(yaml);
        assert!(parse("static: {pods: []}").is_ok());
        assert!(parse("{}").is_err());
        assert!(parse("{static: {pods: []}, kubernetes: {service: s, port: 1}}").is_err());
        assert!(parse("static: {pods: [{http: '10.0.0.1:8000', extra: 1}]}").is_err());
    }
}
