//! Kubernetes discovery: a Service's EndpointSlices (core Endpoints where EndpointSlices are
//! not served), or the pods an InferencePool selects: the GA `inference.networking.k8s.io/v1`
//! (`selector.matchLabels`, `targetPorts`) or the older `inference.networking.x-k8s.io/v1alpha2`
//! that ACK's Gateway with Inference Extension serves (`selector` as plain labels,
//! `targetPortNumber`). Clusters run either, or both; the pool is looked up under every version
//! the apiserver serves.
//!
//! Everything rides on `kube::runtime::watcher`, which lists, watches from the list's
//! resourceVersion, resumes from the last seen one (bookmarks keep it fresh) and re-lists on
//! 410 Gone. Each watched object contributes the ready endpoints it names; a re-list replaces
//! the whole table at `InitDone`, so a snapshot is never published half-listed, and an error
//! publishes nothing, so the last known snapshot stays while the apiserver is unreachable.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{
    EndpointPort as CoreEndpointPort, Endpoints, ObjectReference, Pod,
};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config, Resource, ResourceExt};
use serde::Deserialize;

use super::{cancelled, DiscoveryError, PodEndpoint, PodRole, Publisher, Shutdown};

/// The pod label that gives a pod's prefill/decode role, as llm-d labels its pods.
pub const DEFAULT_ROLE_LABEL: &str = "llm-d.ai/role";
/// The label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The InferencePool API versions, in order of preference when a pool of one name exists
/// under both.
const INFERENCE_POOL_VERSIONS: [PoolVersion; 2] = [PoolVersion::V1, PoolVersion::V1Alpha2];

/// One InferencePool API version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolVersion {
    /// `inference.networking.k8s.io/v1`: `selector.matchLabels`, `targetPorts: [{number}]`.
    V1,
    /// `inference.networking.x-k8s.io/v1alpha2`: `selector` (labels), `targetPortNumber`.
    V1Alpha2,
}

impl PoolVersion {
    fn group_version(self) -> (&'static str, &'static str) {
        match self {
            Self::V1 => ("inference.networking.k8s.io", "v1"),
            Self::V1Alpha2 => ("inference.networking.x-k8s.io", "v1alpha2"),
        }
    }

    fn resource(self) -> ApiResource {
        let (group, version) = self.group_version();
        let gvk = GroupVersionKind::gvk(group, version, "InferencePool");
        ApiResource::from_gvk_with_plural(&gvk, "inferencepools")
    }
}

/// A pod port: a number (the pod's own port, i.e. the Service's targetPort), or a name (the
/// Service port's name for EndpointSlices and Endpoints, the container port's name for pods).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// How to find one model's pods through the Kubernetes API.
///
/// Pick the pods with `service` and/or `labelSelector` (matched against EndpointSlices, or
/// Endpoints objects on a cluster without EndpointSlices), or with `inferencePool`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeDiscoveryConfig {
    /// Defaults to the client's namespace: the pod's own in-cluster, else the kubeconfig context's.
    pub namespace: Option<String>,
    /// The Service whose endpoints are the model's pods.
    pub service: Option<String>,
    /// A label selector (`app=vllm,tier in (a,b)`) for the EndpointSlices (or Endpoints).
    pub label_selector: Option<String>,
    /// An InferencePool whose `spec.selector` picks the pods.
    pub inference_pool: Option<String>,
    /// The pods' OpenAI HTTP port. Required unless `inferencePool` is set, whose first
    /// `targetPorts` entry is the default.
    pub port: Option<PortRef>,
    /// Connect mode: each pod's ZMQ PUB port (`tcp://<pod IP>:<eventsPort>`).
    pub events_port: Option<u16>,
    /// Each pod's ZMQ ROUTER replay port.
    pub replay_port: Option<u16>,
    /// A kubeconfig file; without it the standard inference applies (`$KUBECONFIG` or
    /// `~/.kube/config`, else the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// A kubeconfig context other than the current one.
    pub context: Option<String>,
    /// The pod label whose value (`prefill`, `decode`, `both`) is the pod's role in
    /// disaggregated profiles; read where kvgate watches the pods themselves
    /// (`inferencePool`). Default `llm-d.ai/role`; unlabelled pods are `both`.
    #[serde(default)]
    pub role_label: Option<String>,
}

impl KubeDiscoveryConfig {
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        let invalid = |msg: &str| Err(DiscoveryError::InvalidConfig(msg.to_string()));
        let blank = |value: &Option<String>| value.as_deref().is_some_and(|v| v.trim().is_empty());
        if blank(&self.namespace)
            || blank(&self.service)
            || blank(&self.label_selector)
            || blank(&self.inference_pool)
            || blank(&self.role_label)
        {
            return invalid(
                "namespace, service, labelSelector, inferencePool and roleLabel must not be empty",
            );
        }
        if self.role_label.is_some() && self.inference_pool.is_none() {
            return invalid(
                "roleLabel needs inferencePool: EndpointSlices and Endpoints do not carry pod labels",
            );
        }
        let by_endpoints = self.service.is_some() || self.label_selector.is_some();
        match (by_endpoints, self.inference_pool.is_some()) {
            (true, true) => {
                return invalid(
                    "inferencePool excludes service and labelSelector: it selects the pods itself",
                )
            }
            (false, false) => return invalid("set service, labelSelector or inferencePool"),
            (true, false) if self.port.is_none() => {
                return invalid("port is required with service or labelSelector")
            }
            _ => {}
        }
        if matches!(self.port, Some(PortRef::Number(0)))
            || self.events_port == Some(0)
            || self.replay_port == Some(0)
        {
            return invalid("ports must not be 0");
        }
        if matches!(&self.port, Some(PortRef::Name(name)) if name.is_empty()) {
            return invalid("port name must not be empty");
        }
        Ok(())
    }

    /// The EndpointSlice label selector: the Service's slices, narrowed by `labelSelector`.
    fn slice_selector(&self) -> String {
        let service = self
            .service
            .as_ref()
            .map(|s| format!("{SERVICE_NAME_LABEL}={s}"));
        service
            .into_iter()
            .chain(self.label_selector.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The Endpoints watch: the object named after the Service, narrowed by `labelSelector`.
    fn endpoints_watch(&self) -> watcher::Config {
        let mut wc = watcher::Config::default();
        if let Some(service) = &self.service {
            wc = wc.fields(&format!("metadata.name={service}"));
        }
        if let Some(selector) = &self.label_selector {
            wc = wc.labels(selector);
        }
        wc
    }
}

/// What every endpoint of this source shares.
struct Shape {
    events_port: Option<u16>,
    replay_port: Option<u16>,
    role_label: String,
}

impl Shape {
    fn endpoint(
        &self,
        namespace: &str,
        pod: Option<PodRef<'_>>,
        ip: IpAddr,
        port: u16,
        role: PodRole,
    ) -> PodEndpoint {
        let topic_host = ip.to_string();
        let (name, uid) = match pod {
            Some(pod) => (pod.name.to_string(), pod.uid),
            // An endpoint without a pod behind it (a hand-written slice): its address is all
            // the identity there is.
            None => (topic_host.clone(), ""),
        };
        let zmq = |port: u16| format!("tcp://{}", SocketAddr::new(ip, port));
        PodEndpoint {
            key: format!("{namespace}/{name}/{uid}"),
            name,
            http: SocketAddr::new(ip, port),
            events: self.events_port.map(zmq),
            replay: self.replay_port.map(zmq),
            topic_host,
            role,
        }
    }
}

#[derive(Clone, Copy)]
struct PodRef<'a> {
    name: &'a str,
    uid: &'a str,
}

impl<'a> PodRef<'a> {
    fn from_target(target: Option<&'a ObjectReference>) -> Option<Self> {
        let target = target?;
        Some(Self {
            name: target.name.as_deref()?,
            uid: target.uid.as_deref().unwrap_or(""),
        })
    }
}

/// Ready per the EndpointSlice API: a missing `ready` means ready; a terminating endpoint is
/// never ready, even if it is still serving.
fn slice_endpoint_ready(conditions: Option<&EndpointConditions>) -> bool {
    conditions.is_none_or(|c| c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false))
}

fn slice_port(port: &PortRef, ports: Option<&[EndpointPort]>) -> Option<u16> {
    match port {
        PortRef::Number(n) => Some(*n),
        PortRef::Name(name) => ports?
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.port?).ok()),
    }
}

fn slice_endpoints(slice: &EndpointSlice, port: &PortRef, shape: &Shape) -> Vec<PodEndpoint> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Vec::new();
    }
    let Some(port) = slice_port(port, slice.ports.as_deref()) else {
        tracing::warn!(slice = %slice.name_any(), ?port, "EndpointSlice has no such port; skipped");
        return Vec::new();
    };
    let namespace = slice.namespace().unwrap_or_default();
    slice
        .endpoints
        .iter()
        .filter(|e| slice_endpoint_ready(e.conditions.as_ref()))
        .filter_map(|e| {
            // The API lets consumers use the first address; the rest are fungible.
            let address = e.addresses.first()?;
            let Ok(ip) = address.parse::<IpAddr>() else {
                tracing::warn!(slice = %slice.name_any(), %address, "unparsable endpoint address; skipped");
                return None;
            };
            let pod = PodRef::from_target(e.target_ref.as_ref());
            Some(shape.endpoint(&namespace, pod, ip, port, PodRole::Both))
        })
        .collect()
}

fn core_port(port: &PortRef, ports: Option<&[CoreEndpointPort]>) -> Option<u16> {
    match port {
        PortRef::Number(n) => Some(*n),
        PortRef::Name(name) => ports?
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.port).ok()),
    }
}

/// Ready addresses of a core Endpoints object (`notReadyAddresses` are left out).
fn core_endpoints(endpoints: &Endpoints, port: &PortRef, shape: &Shape) -> Vec<PodEndpoint> {
    let namespace = endpoints.namespace().unwrap_or_default();
    let mut out = Vec::new();
    for subset in endpoints.subsets.iter().flatten() {
        let Some(port) = core_port(port, subset.ports.as_deref()) else {
            tracing::warn!(endpoints = %endpoints.name_any(), ?port, "Endpoints subset has no such port; skipped");
            continue;
        };
        for address in subset.addresses.iter().flatten() {
            let Ok(ip) = address.ip.parse::<IpAddr>() else {
                tracing::warn!(endpoints = %endpoints.name_any(), address = %address.ip, "unparsable address; skipped");
                continue;
            };
            let pod = PodRef::from_target(address.target_ref.as_ref());
            out.push(shape.endpoint(&namespace, pod, ip, port, PodRole::Both));
        }
    }
    out
}

/// A pod selected directly (InferencePool): running, Ready, with an IP, not being deleted.
fn pod_endpoint(pod: &Pod, port: &PortRef, shape: &Shape) -> Option<PodEndpoint> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready || status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_deref()?.parse::<IpAddr>().ok()?;
    let port = match port {
        PortRef::Number(n) => *n,
        PortRef::Name(name) => pod
            .spec
            .iter()
            .flat_map(|spec| &spec.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())?,
    };
    let name = pod.metadata.name.as_deref()?;
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    let namespace = pod.namespace().unwrap_or_default();
    let role = match pod.labels().get(&shape.role_label) {
        None => PodRole::Both,
        Some(value) => PodRole::from_label(value).unwrap_or_else(|| {
            tracing::warn!(pod = name, label = %shape.role_label, %value, "unknown role (prefill, decode or both); the pod serves both legs");
            PodRole::Both
        }),
    };
    Some(shape.endpoint(&namespace, Some(PodRef { name, uid }), ip, port, role))
}

/// The part of an InferencePool (v1) discovery needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpec {
    selector: PoolSelector,
    #[serde(default)]
    target_ports: Vec<PoolPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct PoolPort {
    number: u16,
}

/// The part of a v1alpha2 InferencePool discovery needs: the selector is a plain label map.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpecV1Alpha2 {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    target_port_number: Option<u16>,
}

/// Which pods a pool selects and on which port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PoolTarget {
    selector: String,
    port: PortRef,
}

impl PoolTarget {
    fn from_pool(
        pool: &DynamicObject,
        version: PoolVersion,
        configured: Option<&PortRef>,
    ) -> Result<Self, String> {
        let spec = pool.data.get("spec").ok_or("no spec")?;
        let bad = |e: serde_json::Error| format!("bad spec: {e}");
        let (labels, ports) = match version {
            PoolVersion::V1 => {
                let spec = PoolSpec::deserialize(spec).map_err(bad)?;
                let ports: Vec<u16> = spec.target_ports.iter().map(|p| p.number).collect();
                (spec.selector.match_labels, ports)
            }
            PoolVersion::V1Alpha2 => {
                let spec = PoolSpecV1Alpha2::deserialize(spec).map_err(bad)?;
                (spec.selector, spec.target_port_number.into_iter().collect())
            }
        };
        if labels.is_empty() {
            return Err(match version {
                PoolVersion::V1 => "spec.selector.matchLabels is empty",
                PoolVersion::V1Alpha2 => "spec.selector is empty",
            }
            .into());
        }
        let selector = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let port = match configured {
            Some(port) => port.clone(),
            None => PortRef::Number(*ports.first().ok_or(match version {
                PoolVersion::V1 => "spec.targetPorts is empty",
                PoolVersion::V1Alpha2 => "spec.targetPortNumber is missing",
            })?),
        };
        if ports.contains(&0) {
            return Err("a target port is 0".into());
        }
        if ports.len() > 1 {
            tracing::info!(pool = %pool.name_any(), ?port, "InferencePool has several targetPorts; using one per pod");
        }
        Ok(Self { selector, port })
    }
}

/// Endpoints contributed by each watched object, keyed `namespace/name`.
#[derive(Default)]
struct ObjectTable {
    live: BTreeMap<String, Vec<PodEndpoint>>,
    /// Filled during a (re-)list; replaces `live` at `InitDone`.
    relisting: Option<BTreeMap<String, Vec<PodEndpoint>>>,
}

impl ObjectTable {
    /// Applies one watcher event; true when `live` changed, so a snapshot is due.
    fn apply<K: Resource>(
        &mut self,
        event: Event<K>,
        extract: impl Fn(&K) -> Vec<PodEndpoint>,
    ) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                if let Some(listed) = &mut self.relisting {
                    listed.insert(object_key(&obj), extract(&obj));
                }
                false
            }
            Event::InitDone => match self.relisting.take() {
                Some(listed) => {
                    self.live = listed;
                    true
                }
                None => false,
            },
            Event::Apply(obj) => {
                self.live.insert(object_key(&obj), extract(&obj));
                true
            }
            Event::Delete(obj) => self.live.remove(&object_key(&obj)).is_some(),
        }
    }

    fn snapshot(&self) -> Vec<PodEndpoint> {
        self.live.values().flatten().cloned().collect()
    }
}

fn object_key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Exponential backoff with jitter between failed list/watch calls; reset by any success.
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        // Jitter keeps a fleet of load balancers from re-listing in lockstep after an outage.
        Some(delay.mul_f64(rand::random_range(0.8..1.2)))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

type EventStream<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

fn watch<K>(api: Api<K>, wc: watcher::Config) -> EventStream<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, wc)
        .backoff(WatchBackoff::default())
        .boxed()
}

pub(super) async fn run(
    cfg: KubeDiscoveryConfig,
    publisher: &Publisher,
    mut shutdown: Shutdown,
) -> Result<(), DiscoveryError> {
    let client = client(cfg.kubeconfig.as_deref(), cfg.context.as_deref()).await?;
    let namespace = cfg
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let shape = Shape {
        events_port: cfg.events_port,
        replay_port: cfg.replay_port,
        role_label: cfg
            .role_label
            .clone()
            .unwrap_or_else(|| DEFAULT_ROLE_LABEL.to_string()),
    };
    if let Some(pool) = &cfg.inference_pool {
        tracing::info!(model = %publisher.model, %namespace, %pool, "discovering pods of an InferencePool");
        follow_pool(
            client,
            &namespace,
            pool,
            cfg.port.as_ref(),
            &shape,
            publisher,
            &mut shutdown,
        )
        .await;
        return Ok(());
    }
    let port = cfg.port.clone().ok_or_else(|| {
        DiscoveryError::InvalidConfig("port is required with service or labelSelector".into())
    })?;
    let Some(slices_served) = served(
        &client,
        "discovery.k8s.io/v1",
        "endpointslices",
        &mut shutdown,
    )
    .await
    else {
        return Ok(());
    };
    if slices_served {
        let selector = cfg.slice_selector();
        tracing::info!(model = %publisher.model, %namespace, %selector, "discovering pods through EndpointSlices");
        let api = Api::<EndpointSlice>::namespaced(client, &namespace);
        let events = watch(api, watcher::Config::default().labels(&selector));
        follow(
            events,
            |s| slice_endpoints(s, &port, &shape),
            publisher,
            &mut shutdown,
        )
        .await;
    } else {
        tracing::warn!(
            model = %publisher.model, %namespace,
            "discovery.k8s.io/v1 EndpointSlices are not served; falling back to core Endpoints"
        );
        let api = Api::<Endpoints>::namespaced(client, &namespace);
        let events = watch(api, cfg.endpoints_watch());
        follow(
            events,
            |e| core_endpoints(e, &port, &shape),
            publisher,
            &mut shutdown,
        )
        .await;
    }
    Ok(())
}

/// A client from a kubeconfig file and context, or the standard inference (`$KUBECONFIG` or
/// `~/.kube/config`, else the in-cluster service account).
pub async fn client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<Client, DiscoveryError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let kubeconfig_error = |path: String| move |source| DiscoveryError::Kubeconfig { path, source };
    let config = match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(kubeconfig_error(shown.clone()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(kubeconfig_error(shown))?
        }
        None if context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(kubeconfig_error("(default kubeconfig)".into()))?,
        None => Config::infer().await?,
    };
    Client::try_from(config).map_err(DiscoveryError::Client)
}

/// Asks API discovery whether `group_version` serves `resource`, retrying until the apiserver
/// answers. None means shutdown came first.
async fn served(
    client: &Client,
    group_version: &str,
    resource: &str,
    shutdown: &mut Shutdown,
) -> Option<bool> {
    let mut backoff = WatchBackoff::default();
    loop {
        let delay = match client.list_api_group_resources(group_version).await {
            Ok(list) => return Some(list.resources.iter().any(|r| r.name == resource)),
            Err(kube::Error::Api(status)) if status.code == 404 => return Some(false),
            Err(error) => {
                let delay = backoff.next().unwrap_or(WatchBackoff::MAX);
                tracing::warn!(%error, ?delay, "API discovery failed; retrying");
                delay
            }
        };
        tokio::select! {
            () = cancelled(shutdown) => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Feeds one watcher into a table and publishes until shutdown.
async fn follow<K: Resource<DynamicType = ()>>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    extract: impl Fn(&K) -> Vec<PodEndpoint>,
    publisher: &Publisher,
    shutdown: &mut Shutdown,
) {
    let mut events = pin!(events);
    let mut table = ObjectTable::default();
    loop {
        let event = tokio::select! {
            () = cancelled(shutdown) => return,
            event = events.next() => event,
        };
        match event {
            Some(Ok(event)) => {
                if table.apply(event, &extract) {
                    publisher.publish(table.snapshot());
                }
            }
            Some(Err(error)) => log_watch_error(&publisher.model, &K::kind(&()), &error),
            None => return,
        }
    }
}

fn log_watch_error(model: &str, kind: &str, error: &watcher::Error) {
    // Keeping the last snapshot is the point: pods that were ready a moment ago almost
    // always still are, and an empty list would stop all traffic.
    tracing::warn!(%model, %kind, %error, "watch failed; keeping the last snapshot and retrying with backoff");
}

/// The next event of an optional stream; pending forever while there is none.
async fn next_event<K>(
    events: &mut Option<EventStream<K>>,
) -> Option<Result<Event<K>, watcher::Error>> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// The InferencePool API versions the apiserver serves, asked until it answers. None means
/// shutdown came first.
async fn served_pool_versions(
    client: &Client,
    shutdown: &mut Shutdown,
) -> Option<Vec<PoolVersion>> {
    let mut versions = Vec::new();
    for version in INFERENCE_POOL_VERSIONS {
        let (group, v) = version.group_version();
        if served(client, &format!("{group}/{v}"), "inferencepools", shutdown).await? {
            versions.push(version);
        }
    }
    Some(versions)
}

/// What one InferencePool API version says about the pool.
#[derive(Default)]
struct PoolView {
    /// The pool exists under this version (as of the last list and the events since).
    exists: bool,
    /// The last usable target it gave.
    target: Option<PoolTarget>,
    /// Seen in the list in progress.
    listed: bool,
    /// Its first list is complete.
    known: bool,
}

/// Watches the InferencePool (under every served API version) and, through it, the pods its
/// selector picks. A change of the pool's selector or port restarts the pod watch; the old
/// snapshot stays until the new list is complete.
async fn follow_pool(
    client: Client,
    namespace: &str,
    pool: &str,
    configured_port: Option<&PortRef>,
    shape: &Shape,
    publisher: &Publisher,
    shutdown: &mut Shutdown,
) {
    let Some(versions) = served_pool_versions(&client, shutdown).await else {
        return;
    };
    if versions.is_empty() {
        tracing::warn!(%pool, "no InferencePool API is served (neither inference.networking.k8s.io/v1 nor inference.networking.x-k8s.io/v1alpha2); no pods");
        publisher.publish(Vec::new());
        cancelled(shutdown).await;
        return;
    }
    let by_name = || watcher::Config::default().fields(&format!("metadata.name={pool}"));
    let mut pool_events = futures::stream::select_all(versions.iter().map(|&version| {
        let api =
            Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &version.resource());
        watch(api, by_name())
            .map(move |event| (version, event))
            .boxed()
    }));
    let pods = Api::<Pod>::namespaced(client, namespace);
    let mut pod_events: Option<EventStream<Pod>> = None;
    let mut pod_table = ObjectTable::default();
    let mut views: BTreeMap<usize, PoolView> = BTreeMap::new();
    let mut target: Option<PoolTarget> = None;
    let mut decided = false;
    loop {
        tokio::select! {
            () = cancelled(shutdown) => return,
            event = pool_events.next() => {
                let Some((version, event)) = event else { return };
                let rank = INFERENCE_POOL_VERSIONS.iter().position(|v| *v == version).unwrap_or(0);
                let view = views.entry(rank).or_default();
                match event {
                    Err(error) => {
                        log_watch_error(&publisher.model, "InferencePool", &error);
                        continue;
                    }
                    Ok(Event::Init) => {
                        view.listed = false;
                        continue;
                    }
                    Ok(Event::InitApply(obj) | Event::Apply(obj)) => {
                        view.listed = true;
                        view.exists = true;
                        match PoolTarget::from_pool(&obj, version, configured_port) {
                            Ok(t) => view.target = Some(t),
                            Err(reason) => {
                                tracing::warn!(%pool, ?version, %reason, "unusable InferencePool; keeping the current pods");
                            }
                        }
                    }
                    Ok(Event::InitDone) => {
                        view.known = true;
                        if !view.listed {
                            view.exists = false;
                            view.target = None;
                        }
                    }
                    Ok(Event::Delete(_)) => {
                        view.exists = false;
                        view.target = None;
                    }
                }
                // The preferred version that has the pool decides; an unusable pool keeps
                // its last usable target.
                let next_target = views
                    .values()
                    .find(|v| v.exists)
                    .map(|v| v.target.clone())
                    .unwrap_or(None);
                let exists = views.values().any(|v| v.exists);
                let all_listed = views.values().filter(|v| v.known).count() == versions.len();
                // Until every version has listed once, absence is not known yet.
                if next_target.is_none() && (exists || !all_listed) {
                    continue;
                }
                if next_target == target && decided {
                    continue;
                }
                decided = true;
                pod_table = ObjectTable::default();
                match &next_target {
                    Some(t) => {
                        tracing::info!(%pool, selector = %t.selector, port = ?t.port, "following InferencePool pods");
                        pod_events = Some(watch(pods.clone(), watcher::Config::default().labels(&t.selector)));
                    }
                    None => {
                        tracing::warn!(%pool, %namespace, "InferencePool does not exist; no pods");
                        pod_events = None;
                        publisher.publish(Vec::new());
                    }
                }
                target = next_target;
            }
            event = next_event(&mut pod_events) => {
                let Some(t) = &target else { continue };
                match event {
                    Some(Ok(event)) => {
                        if pod_table.apply(event, |p| pod_endpoint(p, &t.port, shape).into_iter().collect()) {
                            publisher.publish(pod_table.snapshot());
                        }
                    }
                    Some(Err(error)) => log_watch_error(&publisher.model, "Pod", &error),
                    None => pod_events = None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EndpointAddress, EndpointSubset, PodCondition, PodSpec, PodStatus,
    };
    use k8s_openapi::api::discovery::v1::Endpoint;
    use kube::api::ObjectMeta;

    fn shape() -> Shape {
        Shape {
            events_port: Some(5557),
            replay_port: None,
            role_label: DEFAULT_ROLE_LABEL.into(),
        }
    }

    fn pod_ref(name: &str, uid: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".into()),
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(uid.into()),
            ..ObjectReference::default()
        }
    }

    fn slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            metadata: ObjectMeta {
                name: Some("svc-abc".into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8000),
                ..EndpointPort::default()
            }]),
        }
    }

    fn endpoint(
        ip: &str,
        pod: &str,
        uid: &str,
        conditions: Option<EndpointConditions>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions,
            target_ref: Some(pod_ref(pod, uid)),
            ..Endpoint::default()
        }
    }

    fn conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Option<EndpointConditions> {
        Some(EndpointConditions {
            ready,
            serving,
            terminating,
        })
    }

    #[test]
    fn slice_readiness_follows_the_api_rules() {
        let s = slice(vec![
            endpoint(
                "10.0.0.1",
                "ready",
                "u1",
                conditions(Some(true), Some(true), Some(false)),
            ),
            endpoint("10.0.0.2", "unset", "u2", conditions(None, None, None)),
            endpoint("10.0.0.3", "no-conditions", "u3", None),
            endpoint(
                "10.0.0.4",
                "not-ready",
                "u4",
                conditions(Some(false), Some(false), None),
            ),
            endpoint(
                "10.0.0.5",
                "draining",
                "u5",
                conditions(Some(false), Some(true), Some(true)),
            ),
            endpoint(
                "10.0.0.6",
                "terminating",
                "u6",
                conditions(None, None, Some(true)),
            ),
        ]);
        let names: Vec<_> = slice_endpoints(&s, &PortRef::Number(8000), &shape())
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["ready", "unset", "no-conditions"]);
    }

    #[test]
    fn slice_endpoint_carries_identity_and_ports() {
        let s = slice(vec![endpoint("10.0.0.7", "vllm-0", "uid-7", None)]);
        let eps = slice_endpoints(&s, &PortRef::Name("http".into()), &shape());
        assert_eq!(
            eps,
            [PodEndpoint {
                key: "ns/vllm-0/uid-7".into(),
                name: "vllm-0".into(),
                http: "10.0.0.7:8000".parse().unwrap(),
                events: Some("tcp://10.0.0.7:5557".into()),
                replay: None,
                topic_host: "10.0.0.7".into(),
                role: Default::default(),
            }]
        );
        assert!(slice_endpoints(&s, &PortRef::Name("grpc".into()), &shape()).is_empty());
    }

    #[test]
    fn ipv6_and_unparsable_addresses() {
        let mut s = slice(vec![
            endpoint("fd00::7", "v6", "u", None),
            endpoint("not-an-ip", "bad", "u", None),
        ]);
        s.address_type = "IPv6".into();
        let eps = slice_endpoints(&s, &PortRef::Number(8000), &shape());
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].http.to_string(), "[fd00::7]:8000");
        assert_eq!(eps[0].events.as_deref(), Some("tcp://[fd00::7]:5557"));
        assert_eq!(eps[0].topic_host, "fd00::7");
        s.address_type = "FQDN".into();
        assert!(slice_endpoints(&s, &PortRef::Number(8000), &shape()).is_empty());
    }

    #[test]
    fn endpoints_without_pod_reference_are_keyed_by_address() {
        let mut s = slice(vec![endpoint("10.0.0.8", "x", "u", None)]);
        s.endpoints[0].target_ref = None;
        let eps = slice_endpoints(&s, &PortRef::Number(8000), &shape());
        assert_eq!(eps[0].key, "ns/10.0.0.8/");
        assert_eq!(eps[0].name, "10.0.0.8");
    }

    #[test]
    fn core_endpoints_use_ready_addresses_only() {
        let address = |ip: &str, pod: &str| EndpointAddress {
            ip: ip.into(),
            target_ref: Some(pod_ref(pod, "u")),
            ..EndpointAddress::default()
        };
        let e = Endpoints {
            metadata: ObjectMeta {
                name: Some("svc".into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![address("10.0.0.1", "a")]),
                not_ready_addresses: Some(vec![address("10.0.0.2", "b")]),
                ports: Some(vec![CoreEndpointPort {
                    name: Some("http".into()),
                    port: 8000,
                    ..CoreEndpointPort::default()
                }]),
            }]),
        };
        let eps = core_endpoints(&e, &PortRef::Name("http".into()), &shape());
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].key, "ns/a/u");
        assert_eq!(eps[0].http.to_string(), "10.0.0.1:8000");
    }

    fn pod(ready: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("vllm-1".into()),
                namespace: Some("ns".into()),
                uid: Some("uid-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![k8s_openapi::api::core::v1::Container {
                    name: "vllm".into(),
                    ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                        name: Some("http".into()),
                        container_port: 8000,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: Some("10.0.1.1".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn pods_must_be_running_and_ready() {
        let ep = pod_endpoint(
            &pod("True", "Running"),
            &PortRef::Name("http".into()),
            &shape(),
        );
        assert_eq!(
            ep.map(|e| (e.key, e.http.to_string())),
            Some(("ns/vllm-1/uid-1".into(), "10.0.1.1:8000".into()))
        );
        assert!(pod_endpoint(&pod("False", "Running"), &PortRef::Number(8000), &shape()).is_none());
        assert!(pod_endpoint(&pod("True", "Pending"), &PortRef::Number(8000), &shape()).is_none());
        let mut deleting = pod("True", "Running");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(pod_endpoint(&deleting, &PortRef::Number(8000), &shape()).is_none());
    }

    #[test]
    fn pool_target_from_spec() {
        let pool: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "selector": {"matchLabels": {"app": "vllm", "model": "qwen"}},
                "targetPorts": [{"number": 8000}],
                "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}
            }
        }))
        .unwrap();
        let target = PoolTarget::from_pool(&pool, PoolVersion::V1, None).unwrap();
        assert_eq!(target.selector, "app=vllm,model=qwen");
        assert_eq!(target.port, PortRef::Number(8000));
        let named =
            PoolTarget::from_pool(&pool, PoolVersion::V1, Some(&PortRef::Name("http".into())))
                .unwrap();
        assert_eq!(named.port, PortRef::Name("http".into()));
        let mut empty = pool.clone();
        empty.data["spec"]["selector"]["matchLabels"] = serde_json::json!({});
        assert!(PoolTarget::from_pool(&empty, PoolVersion::V1, None).is_err());
    }

    #[test]
    fn v1alpha2_pool_target_from_spec() {
        // The seed's pool, as ACK's guide writes it.
        let pool: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferencePool",
            "metadata": {"name": "qwen-inference-pool", "namespace": "default"},
            "spec": {"targetPortNumber": 8000, "selector": {"app": "qwen3"}}
        }))
        .unwrap();
        let target = PoolTarget::from_pool(&pool, PoolVersion::V1Alpha2, None).unwrap();
        assert_eq!(target.selector, "app=qwen3");
        assert_eq!(target.port, PortRef::Number(8000));
        let mut no_port = pool.clone();
        no_port.data["spec"]
            .as_object_mut()
            .unwrap()
            .remove("targetPortNumber");
        let err = PoolTarget::from_pool(&no_port, PoolVersion::V1Alpha2, None).unwrap_err();
        assert!(err.contains("targetPortNumber"), "{err}");
        // Read as v1 the same object has no matchLabels: versions are not mixed up.
        assert!(PoolTarget::from_pool(&pool, PoolVersion::V1, None).is_err());
    }

    #[test]
    fn relist_replaces_the_table_only_when_done() {
        let one = slice(vec![endpoint("10.0.0.1", "a", "u1", None)]);
        let extract = |s: &EndpointSlice| slice_endpoints(s, &PortRef::Number(8000), &shape());
        let mut table = ObjectTable::default();
        assert!(!table.apply(Event::Init, extract));
        assert!(!table.apply(Event::InitApply(one.clone()), extract));
        assert!(table.snapshot().is_empty());
        assert!(table.apply(Event::InitDone, extract));
        assert_eq!(table.snapshot().len(), 1);
        // A re-list in progress keeps serving the old view.
        table.apply(Event::Init, extract);
        assert_eq!(table.snapshot().len(), 1);
        table.apply(Event::InitDone, extract);
        assert!(table.snapshot().is_empty());
        table.apply(Event::Apply(one.clone()), extract);
        assert_eq!(table.snapshot().len(), 1);
        assert!(table.apply(Event::Delete(one), extract));
        assert!(table.snapshot().is_empty());
    }

    #[test]
    fn config_validation() {
        let parse = |yaml: &str| yaml_serde::from_str::<KubeDiscoveryConfig>(yaml).unwrap();
        assert!(parse("{service: vllm, port: 8000}").validate().is_ok());
        assert!(parse("{labelSelector: 'app in (a,b)', port: http}")
            .validate()
            .is_ok());
        assert!(parse("{inferencePool: pool}").validate().is_ok());
        assert!(parse("{service: vllm}").validate().is_err());
        assert!(parse("{port: 8000}").validate().is_err());
        assert!(parse("{service: vllm, inferencePool: p, port: 8000}")
            .validate()
            .is_err());
        assert!(parse("{service: '', port: 8000}").validate().is_err());
        assert!(parse("{service: vllm, port: 0}").validate().is_err());
        assert!(yaml_serde::from_str::<KubeDiscoveryConfig>(
            "{service: vllm, port: 8000, sevice: x}"
        )
        .is_err());
        assert_eq!(
            parse("{service: vllm, labelSelector: 'tier=gpu', port: 8000}").slice_selector(),
            "kubernetes.io/service-name=vllm,tier=gpu"
        );
    }
}
