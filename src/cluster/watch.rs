//! Watching the InferenceTrafficPolicies a config names, and reporting on them.
//!
//! At start-up [`startup`] waits until every named policy exists and can be honoured (the
//! gateway cannot be built without the tokenizer a policy names). While serving,
//! [`PolicyWatcher`] watches the policies and hands every change to the reloader through the
//! [`ClusterLink`]; the reloader applies it all or nothing and tells the link the outcome,
//! which the watcher publishes as a Kubernetes Event on the policy (`Applied`, or `Refused`
//! with the reason) and in `kvgate_traffic_policy_applied{policy}`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::{compose, PolicyRefused, TrafficPoliciesConfig};
use crate::config::Config;
use crate::discovery::{kube_client, DiscoveryError};

/// The named policies' objects as the apiserver last returned them, by name.
pub type PolicyObjects = BTreeMap<String, Value>;

const GROUP: &str = "inferenceextension.alibabacloud.com";
const VERSION: &str = "v1alpha1";
const KIND: &str = "InferenceTrafficPolicy";
/// Between start-up attempts while a policy is missing or cannot be honoured.
const STARTUP_RETRY: Duration = Duration::from_secs(2);
const REPORTER: &str = "kvgate";

fn resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
    ApiResource::from_gvk_with_plural(&gvk, "inferencetrafficpolicies")
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot reach the Kubernetes API for trafficPolicies: {0}")]
    Client(#[from] DiscoveryError),
    #[error("cannot start a runtime to read trafficPolicies: {0}")]
    Runtime(#[source] std::io::Error),
}

/// How one apply of the policies ended, for [`ClusterLink::applied`].
pub enum Outcome<'a> {
    Applied,
    /// Refused because of one policy.
    Refused(&'a PolicyRefused),
    /// Refused for a reason found after the policies were read (e.g. an unreadable
    /// tokenizer): every policy that changed since it was last applied is named.
    Failed(&'a str),
}

/// One Event to publish.
struct Report {
    policy: String,
    object: Value,
    applied: bool,
    message: String,
}

/// What the watcher and the reloader share.
pub struct ClusterLink {
    config: TrafficPoliciesConfig,
    objects: watch::Sender<PolicyObjects>,
    reports: mpsc::UnboundedSender<Report>,
    reports_rx: Mutex<Option<mpsc::UnboundedReceiver<Report>>>,
    /// Per policy: the resourceVersion last reported and whether it was applied.
    reported: Mutex<HashMap<String, (String, bool)>>,
}

fn resource_version(object: &Value) -> String {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

impl ClusterLink {
    fn new(config: TrafficPoliciesConfig, objects: PolicyObjects) -> Self {
        let (reports, reports_rx) = mpsc::unbounded_channel();
        Self {
            config,
            objects: watch::Sender::new(objects),
            reports,
            reports_rx: Mutex::new(Some(reports_rx)),
            reported: Mutex::new(HashMap::new()),
        }
    }

    /// Completes a config read from the file with the policies as last watched.
    pub fn compose(&self, config: Config) -> Result<Config, PolicyRefused> {
        compose(config, &self.objects.borrow())
    }

    /// Resolves whenever a watched policy changes.
    pub fn changes(&self) -> watch::Receiver<PolicyObjects> {
        self.objects.subscribe()
    }

    /// Records how applying the current policies ended; every policy whose state this changes
    /// is reported once (log, metric, Event).
    pub fn applied(&self, outcome: Outcome<'_>) {
        let objects = self.objects.borrow().clone();
        let mut reported = self.reported.lock();
        for model in &self.config.models {
            let Some(object) = objects.get(&model.policy) else {
                continue;
            };
            let version = resource_version(object);
            let (applied, message) = match &outcome {
                Outcome::Applied => (true, format!("routing model {:?} as it says", model.name)),
                Outcome::Refused(refused) if refused.policy == model.policy => {
                    (false, refused.source.to_string())
                }
                Outcome::Refused(_) => continue,
                Outcome::Failed(reason) => {
                    if reported.get(&model.policy) == Some(&(version.clone(), true)) {
                        continue;
                    }
                    (false, reason.to_string())
                }
            };
            if reported.get(&model.policy) == Some(&(version.clone(), applied)) {
                continue;
            }
            reported.insert(model.policy.clone(), (version, applied));
            crate::metrics::global().traffic_policy(&model.policy, applied);
            if applied {
                tracing::info!(policy = %model.policy, model = %model.name, "InferenceTrafficPolicy applied");
            } else {
                tracing::error!(policy = %model.policy, model = %model.name, reason = %message,
                    "InferenceTrafficPolicy refused; the previous configuration keeps serving");
            }
            let _ = self.reports.send(Report {
                policy: model.policy.clone(),
                object: object.clone(),
                applied,
                message,
            });
        }
    }
}

/// The config completed from the cluster, and the link the watcher and reloader share (none
/// when the config names no policy).
pub type Started = (Config, Option<std::sync::Arc<ClusterLink>>);

/// Waits until every policy `config` names exists and can be honoured, and returns the
/// config completed from them.
pub fn startup(config: Config) -> Result<Started, StartupError> {
    let Some(policies) = config.traffic_policies.clone() else {
        return Ok((config, None));
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartupError::Runtime)?;
    runtime.block_on(async move {
        let client = kube_client(policies.kubeconfig.as_deref(), policies.context.as_deref()).await?;
        let api = policy_api(&client, &policies);
        let recorder = recorder(&client);
        let link = ClusterLink::new(policies.clone(), PolicyObjects::new());
        let mut last_error = String::new();
        loop {
            match api.list(&Default::default()).await {
                Ok(list) => {
                    let objects = named(&policies, list.items.into_iter());
                    link.objects.send_replace(objects);
                    match link.compose(config.clone()) {
                        Ok(composed) => {
                            link.applied(Outcome::Applied);
                            publish_reports(&link, &recorder).await;
                            return Ok((composed, Some(std::sync::Arc::new(link))));
                        }
                        Err(refused) => {
                            link.applied(Outcome::Refused(&refused));
                            publish_reports(&link, &recorder).await;
                            let error = refused.to_string();
                            if error != last_error {
                                tracing::warn!(%error, "waiting for the InferenceTrafficPolicies kvgate is configured from");
                                last_error = error;
                            }
                        }
                    }
                }
                Err(error) => {
                    let error = error.to_string();
                    if error != last_error {
                        tracing::warn!(%error, "cannot list InferenceTrafficPolicies; retrying");
                        last_error = error;
                    }
                }
            }
            tokio::time::sleep(STARTUP_RETRY).await;
        }
    })
}

fn policy_api(client: &Client, policies: &TrafficPoliciesConfig) -> Api<DynamicObject> {
    let resource = resource();
    match &policies.namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::default_namespaced_with(client.clone(), &resource),
    }
}

fn recorder(client: &Client) -> Recorder {
    let instance = std::env::var("HOSTNAME").ok();
    Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.into(),
            instance,
        },
    )
}

/// The objects of the policies the config names.
fn named(
    policies: &TrafficPoliciesConfig,
    objects: impl Iterator<Item = DynamicObject>,
) -> PolicyObjects {
    objects
        .filter_map(|o| {
            let name = o.metadata.name.clone()?;
            policies
                .models
                .iter()
                .any(|m| m.policy == name)
                .then(|| serde_json::to_value(&o).ok().map(|v| (name, v)))
                .flatten()
        })
        .collect()
}

async fn publish_reports(link: &ClusterLink, recorder: &Recorder) {
    let pending: Vec<Report> = {
        let mut rx = link.reports_rx.lock();
        let Some(rx) = rx.as_mut() else {
            return;
        };
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    };
    for report in pending {
        publish(recorder, report).await;
    }
}

async fn publish(recorder: &Recorder, report: Report) {
    let meta = &report.object["metadata"];
    let text = |v: &Value| v.as_str().map(str::to_string);
    let reference = ObjectReference {
        api_version: Some(format!("{GROUP}/{VERSION}")),
        kind: Some(KIND.into()),
        name: text(&meta["name"]),
        namespace: text(&meta["namespace"]),
        uid: text(&meta["uid"]),
        resource_version: text(&meta["resourceVersion"]),
        ..ObjectReference::default()
    };
    let event = KubeEvent {
        type_: if report.applied {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: if report.applied { "Applied" } else { "Refused" }.into(),
        // The Events API caps the note at 1 kB.
        note: Some(report.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &reference).await {
        tracing::warn!(policy = %report.policy, %error, "cannot publish a Kubernetes Event on the policy");
    }
}

/// Watches the named policies while kvgate serves and publishes what the reloader reports.
pub struct PolicyWatcher {
    link: std::sync::Arc<ClusterLink>,
}

impl PolicyWatcher {
    pub fn new(link: std::sync::Arc<ClusterLink>) -> Self {
        Self { link }
    }
}

#[async_trait]
impl BackgroundService for PolicyWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let policies = self.link.config.clone();
        let Some(mut reports) = self.link.reports_rx.lock().take() else {
            return;
        };
        let client = match kube_client(policies.kubeconfig.as_deref(), policies.context.as_deref())
            .await
        {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot watch InferenceTrafficPolicies; their changes are not followed");
                return;
            }
        };
        let recorder = recorder(&client);
        let mut events =
            watcher::watcher(policy_api(&client, &policies), watcher::Config::default())
                .default_backoff()
                .boxed();
        let mut listing: Option<Vec<DynamicObject>> = None;
        let mut live: BTreeMap<String, DynamicObject> = BTreeMap::new();
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
                Some(report) = reports.recv() => publish(&recorder, report).await,
                event = events.next() => {
                    let changed = match event {
                        None => return,
                        Some(Err(error)) => {
                            tracing::warn!(%error, "InferenceTrafficPolicy watch failed; retrying with backoff");
                            false
                        }
                        Some(Ok(Event::Init)) => {
                            listing = Some(Vec::new());
                            false
                        }
                        Some(Ok(Event::InitApply(object))) => {
                            if let Some(listed) = listing.as_mut() {
                                listed.push(object);
                            }
                            false
                        }
                        Some(Ok(Event::InitDone)) => match listing.take() {
                            Some(listed) => {
                                live = listed.into_iter().filter_map(|o| Some((o.metadata.name.clone()?, o))).collect();
                                true
                            }
                            None => false,
                        },
                        Some(Ok(Event::Apply(object))) => {
                            if let Some(name) = object.metadata.name.clone() {
                                live.insert(name, object);
                            }
                            true
                        }
                        Some(Ok(Event::Delete(object))) => {
                            object.metadata.name.as_ref().is_some_and(|name| live.remove(name).is_some())
                        }
                    };
                    if changed {
                        let objects = named(&policies, live.values().cloned());
                        self.link.objects.send_if_modified(|current| {
                            let versions = |o: &PolicyObjects| {
                                o.iter().map(|(k, v)| (k.clone(), resource_version(v))).collect::<Vec<_>>()
                            };
                            if versions(current) == versions(&objects) {
                                return false;
                            }
                            *current = objects;
                            true
                        });
                    }
                }
            }
        }
    }
}
