//! Feeds each model's discovery snapshots into the pod registry.
//!
//! One discovery source per model runs for the life of the server (a config reload does
//! not restart them: changing where pods come from needs a restart or `-u` upgrade).
//! The service reports ready once every model has its first snapshot, or after a bound,
//! so the proxy can be made to start only with pods to route to.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::watch;

use super::gateway::Gateway;
use crate::discovery::{run_discovery, DiscoveryConfig, Snapshot};

/// Longest wait for first snapshots before the proxy starts anyway (an unreachable
/// apiserver must not keep the gateway down; requests get 503 until pods appear).
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

pub struct DiscoveryFeed {
    gateway: Arc<Gateway>,
}

impl DiscoveryFeed {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    /// Applies one model's snapshots until its source stops.
    async fn follow(
        &self,
        model: String,
        mut snapshots: watch::Receiver<Snapshot>,
        first: tokio::sync::mpsc::Sender<()>,
    ) {
        let mut first = Some(first);
        while snapshots.changed().await.is_ok() {
            let snapshot = snapshots.borrow_and_update().clone();
            let changes = self.gateway.pods.apply_snapshot(&model, &snapshot);
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
}

#[async_trait]
impl BackgroundService for DiscoveryFeed {
    async fn start_with_ready_notifier(
        &self,
        shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let state = self.gateway.state();
        let models: Vec<(String, DiscoveryConfig)> = state
            .config
            .models
            .iter()
            .map(|m| (m.name.clone(), m.discovery.clone()))
            .collect();
        let mut awaited = 0;
        let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(models.len().max(1));
        let mut tasks = Vec::with_capacity(models.len());
        for (model, config) in models {
            // An empty static list never changes the (empty) initial snapshot: nothing to await.
            if !matches!(&config, DiscoveryConfig::Static { pods } if pods.is_empty()) {
                awaited += 1;
            }
            let (tx, rx) = watch::channel(Snapshot::default());
            let source = {
                let model = model.clone();
                let shutdown = shutdown.clone();
                async move {
                    if let Err(error) = run_discovery(config, model.clone(), tx, shutdown).await {
                        tracing::error!(model = %model, %error, "discovery stopped; the model keeps its last pods");
                    }
                }
            };
            tasks.push(futures::future::join(
                source,
                self.follow(model, rx, first_tx.clone()),
            ));
        }
        drop(first_tx);
        let all = join_all(tasks);
        let readiness = async {
            let wait = async {
                for _ in 0..awaited {
                    if first_rx.recv().await.is_none() {
                        break;
                    }
                }
            };
            if tokio::time::timeout(FIRST_SNAPSHOT_WAIT, wait)
                .await
                .is_err()
            {
                tracing::warn!(waited = ?FIRST_SNAPSHOT_WAIT, "not every model has discovered pods yet; serving anyway");
            }
            ready.notify_ready();
        };
        futures::future::join(all, readiness).await;
    }
}
