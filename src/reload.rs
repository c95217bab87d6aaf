//! Hot reload of the routing config, on SIGHUP or when the config file changes.
//!
//! A reload is all or nothing: the file is parsed and validated, every model's
//! tokenizer, hasher and scheduling profiles are built, and only then is the new
//! state swapped in (one `ArcSwap` store), so requests see either the old config
//! or the new one. A refused reload is logged with its reason, counted in
//! `kvgate_config_reloads_total{result="failed"}`, and leaves everything running
//! as it was. The block index, the pods and their load are kept across reloads.
//!
//! What a reload applies: profiles (plugins, weights, pickers), models (added,
//! removed, changed; a removed model's pods and their index entries are retired),
//! each model's pods (its discovery source is restarted when `discovery` changed;
//! pods listed again keep their state), LoRA adapters, `server` tunables read per
//! request or per new connection (the listener limits: a reload leaves connections
//! already open on the timeouts they were accepted with), `events` replay and parity
//! settings, and `logging.level`. What needs a new process (`kvgate serve -u`): the
//! listen and admin addresses, worker threads, TLS on or off and its file paths (the
//! files' contents reload on their own, see `tls`), the event topology, the index
//! budget and the log format.
//!
//! File changes are watched on the config's directory, not the file: editors
//! replace the file by renaming over it and Kubernetes swaps a symlinked
//! directory, neither of which a watch on the file itself would see. A change
//! reloads only when the file's bytes differ from the last ones read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_64;

use crate::cluster::{ClusterLink, Outcome, PolicyRefused};
use crate::config::{Config, ConfigError};
use crate::discovery::{DiscoveryError, DiscoveryFeed};
use crate::events::{KvEventService, ModelEvents};
use crate::gateway::{Gateway, GatewayError};
use crate::hash::HashConfigError;
use crate::logging::{self, LogControl, LoggingError};
use crate::metrics::Metrics;

/// Quiet time after a file event before reading the file: an editor's save, a Secret
/// update or a `cp cert key` is several events, and a half-written file must not be read.
const SETTLE: Duration = Duration::from_millis(250);
const SETTLE_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyRefused),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("model {model:?}: {source}")]
    Discovery {
        model: String,
        source: DiscoveryError,
    },
    #[error("model {model:?}: event hash settings: {source}")]
    Events {
        model: String,
        source: HashConfigError,
    },
    #[error(transparent)]
    Logging(#[from] LoggingError),
    #[error("{field} changed ({was} → {now}): a reload cannot apply it; start a new process with `kvgate serve -u`")]
    NeedsRestart {
        field: &'static str,
        was: String,
        now: String,
    },
}

/// What set off a reload, for the log.
#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    Signal,
    FileChanged,
    /// An InferenceTrafficPolicy the config names changed.
    Policy,
}

/// One setting of a config, as text to compare and report.
type SettingText = fn(&Config) -> String;

/// Settings a reload cannot change, as they read in a config: the listeners, worker
/// threads and event sockets are set up at start, and the index is sized then.
const RESTART_ONLY: &[(&str, SettingText)] = &[
    ("server.listen", |c| c.server.listen.to_string()),
    ("server.admin", |c| c.server.admin.to_string()),
    ("server.threads", |c| c.server.threads.to_string()),
    // The certificate files themselves are reloaded when they change (`tls`).
    ("server.tls", |c| format!("{:?}", c.server.tls)),
    ("events.mode", |c| format!("{:?}", c.events.mode)),
    ("events.bind", |c| c.events.bind.clone()),
    ("events.dataParallelSize", |c| {
        c.events.data_parallel_size.to_string()
    }),
    ("events.topicPrefix", |c| c.events.topic_prefix.clone()),
    ("index.budgetBytes", |c| c.index.budget_bytes.to_string()),
    // The policies watched and the link reporting on them are set up at start.
    ("trafficPolicies", |c| format!("{:?}", c.traffic_policies)),
    ("relay", |c| format!("{:?}", c.relay)),
];

fn unchanged(field: &'static str, was: String, now: String) -> Result<(), ReloadError> {
    if was == now {
        Ok(())
    } else {
        Err(ReloadError::NeedsRestart { field, was, now })
    }
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "SIGHUP",
            Self::FileChanged => "file change",
            Self::Policy => "InferenceTrafficPolicy change",
        }
    }
}

pub struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
    discovery: Arc<DiscoveryFeed>,
    events: Arc<KvEventService>,
    logs: LogControl,
    metrics: Arc<Metrics>,
    /// The InferenceTrafficPolicies the config is completed from, when it names any.
    cluster: Option<Arc<ClusterLink>>,
    /// Hash of the file's bytes when last read, to tell real changes from noise.
    last_read: Mutex<Option<u64>>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        gateway: Arc<Gateway>,
        discovery: Arc<DiscoveryFeed>,
        events: Arc<KvEventService>,
        logs: LogControl,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<ClusterLink>>,
    ) -> Self {
        let last_read = std::fs::read(&path).ok().map(|bytes| xxh3_64(&bytes));
        Self {
            path,
            gateway,
            discovery,
            events,
            logs,
            metrics,
            cluster,
            last_read: Mutex::new(last_read),
        }
    }

    /// Reloads, logs and counts the outcome.
    pub fn reload(&self, trigger: Trigger) {
        let result = self.apply();
        if let Some(cluster) = &self.cluster {
            match &result {
                Ok(_) => cluster.applied(Outcome::Applied),
                Err(ReloadError::Policy(refused)) => cluster.applied(Outcome::Refused(refused)),
                Err(other) => cluster.applied(Outcome::Failed(&other.to_string())),
            }
        }
        match result {
            Ok(summary) => {
                self.metrics.config_reload(true);
                tracing::info!(
                    path = %self.path.display(),
                    trigger = trigger.as_str(),
                    models = %summary.models,
                    pods_retired = summary.pods_retired,
                    "config reloaded"
                );
            }
            Err(error) => {
                self.metrics.config_reload(false);
                tracing::error!(
                    path = %self.path.display(),
                    trigger = trigger.as_str(),
                    %error,
                    "config reload refused; the running config stays in effect"
                );
            }
        }
    }

    fn apply(&self) -> Result<Applied, ReloadError> {
        let config = Config::load(&self.path)?;
        let config = match &self.cluster {
            Some(cluster) => cluster.compose(config)?,
            None => config,
        };
        let running = self.gateway.state().config.clone();
        self.restart_only(&running, &config)?;
        for model in &config.models {
            model
                .discovery
                .validate()
                .map_err(|source| ReloadError::Discovery {
                    model: model.name.clone(),
                    source,
                })?;
            ModelEvents::from_config(model).map_err(|source| ReloadError::Events {
                model: model.name.clone(),
                source,
            })?;
        }
        let level = logging::filter(&config.logging.level)?;

        // Everything is checked and built: from here on the reload is applied.
        let removed = self.gateway.reload(config.clone())?;
        self.metrics.pods_changed(&removed);
        for pod in &removed.removed {
            tracing::info!(pod = %pod.addr(), name = %pod.endpoint.name, "pod retired with its model");
        }
        if let Err(error) = self.events.reload(&config) {
            tracing::error!(%error, "KV event ingestion did not take the reloaded config");
        }
        self.discovery.reconcile(&config);
        if let Err(error) = self.logs.set_level(level) {
            tracing::error!(%error, "log level not changed");
        }
        Ok(Applied {
            models: config
                .models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            pods_retired: removed.removed.len(),
        })
    }

    fn restart_only(&self, running: &Config, new: &Config) -> Result<(), ReloadError> {
        for (field, value) in RESTART_ONLY {
            unchanged(field, value(running), value(new))?;
        }
        // The logger in use, not the running config's field: it is what a reload would change.
        unchanged(
            "logging.format",
            format!("{:?}", self.logs.format()),
            format!("{:?}", new.logging.format),
        )
    }

    /// Whether the file's bytes differ from the last ones read (and remembers them).
    fn file_changed(&self) -> bool {
        let Ok(bytes) = std::fs::read(&self.path) else {
            // Gone or unreadable mid-swap: the next event will tell.
            return false;
        };
        let hash = xxh3_64(&bytes);
        self.last_read.lock().replace(hash) != Some(hash)
    }

    fn remember_file(&self) {
        if let Ok(bytes) = std::fs::read(&self.path) {
            *self.last_read.lock() = Some(xxh3_64(&bytes));
        }
    }
}

struct Applied {
    models: String,
    pods_retired: usize,
}

/// Watches a file's directory; events that may have changed the file wake `tx`: those
/// naming the file, and Kubernetes' swaps of a mounted ConfigMap or Secret, whose atomic
/// writer only renames `..`-prefixed entries (`..data` → `..2024_…`) beside it. Anything
/// else in the directory (a log file written there) is ignored.
/// Lets a writer finish after a file event: returns once events stop for `SETTLE`, or after
/// `SETTLE_MAX` for a file rewritten without pause.
pub(crate) async fn settle(changes: &mut mpsc::Receiver<()>) {
    let until = tokio::time::Instant::now() + SETTLE_MAX;
    while tokio::time::timeout_at(
        until.min(tokio::time::Instant::now() + SETTLE),
        changes.recv(),
    )
    .await
    .is_ok_and(|event| event.is_some())
    {}
}

pub(crate) fn watch_dir(
    path: &Path,
    tx: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            return;
        };
        let relevant = !event.kind.is_access()
            && event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    Some(n) == name.as_deref() || n.as_encoded_bytes().starts_with(b"..")
                })
            });
        if relevant {
            // A full queue already holds a wake-up.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let hangups = signal(SignalKind::hangup());
        let (file_tx, mut file_events) = mpsc::channel(1);
        // Kept alive for as long as the loop runs; dropping it ends the watch.
        let _watcher = match watch_dir(&self.path, file_tx) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot watch the config file; reload on SIGHUP only");
                None
            }
        };
        let mut policies = self.cluster.as_ref().map(|c| c.changes());
        // SIGHUP's default action ends the process: ready only once it is handled.
        ready.notify_ready();
        let mut hangups = match hangups {
            Ok(s) => s,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; reload on file change only");
                let _ = shutdown.wait_for(|stop| *stop).await;
                return;
            }
        };
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
                _ = hangups.recv() => {
                    self.remember_file();
                    self.reload(Trigger::Signal);
                }
                Some(()) = policy_change(&mut policies) => self.reload(Trigger::Policy),
                Some(()) = file_events.recv() => {
                    // Let the writer finish: wait until events stop for SETTLE (a file
                    // rewritten without pause is read after SETTLE_MAX all the same). A
                    // SIGHUP meanwhile (an operator who edits, then signals) takes over.
                    let settle_until = tokio::time::Instant::now() + SETTLE_MAX;
                    let mut signalled = false;
                    while tokio::time::Instant::now() < settle_until {
                        tokio::select! {
                            _ = hangups.recv() => {
                                signalled = true;
                                break;
                            }
                            event = tokio::time::timeout(SETTLE, file_events.recv()) => {
                                if !matches!(event, Ok(Some(()))) {
                                    break;
                                }
                            }
                        }
                    }
                    if signalled {
                        self.remember_file();
                        self.reload(Trigger::Signal);
                    } else if self.file_changed() {
                        self.reload(Trigger::FileChanged);
                    }
                }
            }
        }
    }
}

/// The next change of the watched policies; pending forever without any (or once the
/// watcher is gone).
async fn policy_change(
    policies: &mut Option<tokio::sync::watch::Receiver<crate::cluster::PolicyObjects>>,
) -> Option<()> {
    match policies {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(events: &str) -> Config {
        Config::parse(&format!(
            "events: {{{events}}}\nmodels:\n  - name: m\n    tokenizer: t.json\n    blockSize: 16\n    \
             hashAlgo: sha256_cbor\n    hashSeed: \"0\"\n    vllmRelease: \"0.11.0\"\n    discovery: {{static: {{pods: []}}}}\n"
        ))
        .expect("config parses")
    }

    #[test]
    fn restart_only_settings_name_the_field_that_changed() {
        let running = config("mode: connect");
        let changed = |new: &Config| {
            RESTART_ONLY
                .iter()
                .find_map(|(field, value)| unchanged(field, value(&running), value(new)).err())
        };
        assert!(changed(&config("mode: connect, replay: false")).is_none());
        match changed(&config("mode: connect, dataParallelSize: 2")) {
            Some(ReloadError::NeedsRestart { field, was, now }) => {
                assert_eq!(
                    (field, was.as_str(), now.as_str()),
                    ("events.dataParallelSize", "1", "2")
                );
            }
            other => panic!("{other:?}"),
        }
        let with_tls = Config::parse(
            "server: {tls: {certFile: a.crt, keyFile: a.key}}\nevents: {mode: connect}\nmodels: []\n",
        )
        .expect("config parses");
        assert!(matches!(
            changed(&with_tls),
            Some(ReloadError::NeedsRestart {
                field: "server.tls",
                ..
            })
        ));
        assert!(matches!(
            changed(&config("mode: bind")),
            Some(ReloadError::NeedsRestart {
                field: "events.mode",
                ..
            })
        ));
    }
}
