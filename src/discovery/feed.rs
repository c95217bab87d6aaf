//! Feeds each model's discovery snapshots into the pod registry.
//!
//! One discovery source per model runs as its own task. A config reload hands the
//! new model list to [`DiscoveryFeed::reconcile`]: sources of dropped models stop,
//! new models get one, and a model whose `discovery` changed gets a fresh source
//! (pods it lists again keep their identity, load and index entries, because the
//! registry matches them by key). The service reports ready once every model of
//! the starting config has its first snapshot, or after a bound, so the proxy can
//! be made to start only with pods to route to.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{run_discovery, DiscoveryConfig, Snapshot};
use crate::config::Config;
use crate::gateway::Gateway;

/// Longest wait for first snapshots before the proxy starts anyway (an unreachable
/// apiserver must not keep the gateway down; requests get 503 until pods appear).
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

/// The discovery source of every model, as configured.
type Sources = Vec<(String, DiscoveryConfig)>;

fn sources(config: &Config) -> Sources {
    config
        .models
        .iter()
        .map(|m| (m.name.clone(), m.discovery.clone()))
        .collect()
}

pub struct DiscoveryFeed {
    gateway: Arc<Gateway>,
    reconcile: mpsc::UnboundedSender<Sources>,
    reconcile_rx: Mutex<Option<mpsc::UnboundedReceiver<Sources>>>,
    /// Every model of the starting config has had its first snapshot.
    ready: AtomicBool,
}

/// One model's running source.
struct Running {
    config: DiscoveryConfig,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DiscoveryFeed {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        let (reconcile, reconcile_rx) = mpsc::unbounded_channel();
        Self {
            gateway,
            reconcile,
            reconcile_rx: Mutex::new(Some(reconcile_rx)),
            ready: AtomicBool::new(false),
        }
    }

    /// Whether the models of the starting config have all been listed once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Follows a reloaded config (already validated): sources start, stop or restart
    /// so that each model runs the one its `discovery` describes.
    pub fn reconcile(&self, config: &Config) {
        // The receiver lives as long as the service; after shutdown there is nothing to follow.
        let _ = self.reconcile.send(sources(config));
    }

    /// Starts one model's source and the task that applies its snapshots. `first`
    /// hears of the first snapshot.
    fn spawn(
        &self,
        model: String,
        config: DiscoveryConfig,
        first: Option<mpsc::Sender<()>>,
    ) -> Running {
        let (stop, stop_rx) = watch::channel(false);
        let (tx, rx) = watch::channel(Snapshot::default());
        let source = {
            let model = model.clone();
            let config = config.clone();
            async move {
                if let Err(error) = run_discovery(config, model.clone(), tx, stop_rx).await {
                    tracing::error!(model = %model, %error, "discovery stopped; the model keeps its last pods");
                }
            }
        };
        let follow = follow(Arc::clone(&self.gateway), model, rx, first);
        let task = tokio::spawn(async move {
            futures::future::join(source, follow).await;
        });
        Running { config, stop, task }
    }

    fn apply(&self, running: &mut HashMap<String, Running>, wanted: Sources) {
        running.retain(|model, source| {
            let keep = wanted
                .iter()
                .any(|(m, config)| m == model && *config == source.config);
            if !keep {
                source.stop.send_replace(true);
                tracing::info!(model = %model, "discovery source stopped");
            }
            keep
        });
        for (model, config) in wanted {
            if let Entry::Vacant(slot) = running.entry(model) {
                tracing::info!(model = %slot.key(), "discovery source started");
                let source = self.spawn(slot.key().clone(), config, None);
                slot.insert(source);
            }
        }
    }
}

/// Applies one model's snapshots until its source stops.
async fn follow(
    gateway: Arc<Gateway>,
    model: String,
    mut snapshots: watch::Receiver<Snapshot>,
    mut first: Option<mpsc::Sender<()>>,
) {
    let metrics = crate::metrics::global();
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        let changes = gateway.pods.apply_snapshot(&model, &snapshot);
        metrics.pods_changed(&changes);
        for pod in &changes.added {
            tracing::info!(model = %model, pod = %pod.addr(), name = %pod.endpoint.name, id = pod.id, "pod added");
        }
        for pod in &changes.removed {
            tracing::info!(model = %model, pod = %pod.addr(), name = %pod.endpoint.name, id = pod.id, "pod removed");
        }
        if let Some(first) = first.take() {
            let _ = first.send(()).await;
        }
    }
}

/// An empty static list never changes the (empty) initial snapshot: nothing to await.
fn sends_a_snapshot(config: &DiscoveryConfig) -> bool {
    !matches!(config, DiscoveryConfig::Static { pods } if pods.is_empty())
}

#[async_trait]
impl BackgroundService for DiscoveryFeed {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let Some(mut reconcile) = self.reconcile_rx.lock().take() else {
            tracing::error!("discovery service started twice");
            return;
        };
        let initial = sources(&self.gateway.state().config);
        let awaited = initial.iter().filter(|(_, c)| sends_a_snapshot(c)).count();
        let (first_tx, mut first_rx) = mpsc::channel(initial.len().max(1));
        let mut running = HashMap::new();
        for (model, config) in initial {
            let first = sends_a_snapshot(&config).then(|| first_tx.clone());
            let source = self.spawn(model.clone(), config, first);
            running.insert(model, source);
        }
        drop(first_tx);

        let mut pending = awaited;
        let wait = async {
            while pending > 0 && first_rx.recv().await.is_some() {
                pending -= 1;
            }
        };
        if tokio::time::timeout(FIRST_SNAPSHOT_WAIT, wait)
            .await
            .is_err()
        {
            tracing::warn!(waited = ?FIRST_SNAPSHOT_WAIT, "not every model has discovered pods yet; serving anyway");
        }
        self.ready.store(pending == 0, Ordering::Relaxed);
        ready.notify_ready();

        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                Some(()) = first_rx.recv(), if pending > 0 => {
                    pending -= 1;
                    if pending == 0 {
                        tracing::info!("every model has discovered its pods");
                        self.ready.store(true, Ordering::Relaxed);
                    }
                }
                Some(wanted) = reconcile.recv() => self.apply(&mut running, wanted),
            }
        }
        for (_, source) in running.drain() {
            source.stop.send_replace(true);
            let _ = source.task.await;
        }
    }
}
