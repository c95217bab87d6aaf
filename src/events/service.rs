//! `KvEventService`: the Pingora background service that keeps the block index
//! in step with the pods' KV events.
//!
//! One task owns the [`Ingestor`] and serves, in priority order: shutdown,
//! pod-set changes (from [`PodRegistry::subscribe`]), config reloads, replay
//! answers, the gap timer, and messages from the [`EventSource`]. Replays run
//! as their own tasks and report back, so a slow ROUTER never holds up other
//! pods' events.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, EventsMode};
use crate::events::ingest::{IngestConfig, Ingestor, ModelEvents, PodHandover, ReplayDone};
use crate::events::replay::ReplayClient;
use crate::events::stats::EventStats;
use crate::events::subscriber::{
    BindSource, ConnectSource, EventSource, Inbound, Origin, SubscriberError,
};
use crate::hash::HashConfigError;
use crate::index::{BlockIndex, IndexTargets};
use crate::pods::PodRegistry;
use crate::relay::{self, RelayConfig, RelayError, RelayHub, Relayed};

/// Messages queued between the sockets and the ingest task.
const INBOUND_CAPACITY: usize = 16_384;
/// Messages taken per wake-up before the other duties are looked at again.
const INBOUND_BURST: usize = 256;
/// How often gap waits and idle publishers are checked.
const TICK: Duration = Duration::from_millis(25);

#[derive(Debug, thiserror::Error)]
pub enum EventServiceError {
    #[error("model {model:?}: {source}")]
    Model {
        model: String,
        #[source]
        source: HashConfigError,
    },
    #[error(transparent)]
    Source(#[from] SubscriberError),
    #[error("the KV event service was already started (it runs once)")]
    AlreadyStarted,
    #[error(transparent)]
    Relay(#[from] RelayError),
}

enum Command {
    Reload(Vec<ModelEvents>),
}

/// What a previous process handed over (graceful upgrade): its publishers' stream
/// positions and a snapshot of the block index under its own pod ids.
struct Resume {
    pods: Vec<PodHandover>,
    index: bytes::Bytes,
}

/// Ingests the KV events of every pod into the block index. Register it with
/// Pingora as a background service; keep [`KvEventService::stats`] and
/// [`KvEventService::targets`] for metrics and scoring.
pub struct KvEventService {
    mode: EventsMode,
    replay: ReplayClient,
    registry: Arc<PodRegistry>,
    index: Arc<BlockIndex>,
    stats: Arc<EventStats>,
    targets: Arc<IndexTargets>,
    ingestor: Mutex<Option<Ingestor>>,
    /// The ingestor once the service stopped, for [`KvEventService::handover`].
    stopped: Mutex<Option<Ingestor>>,
    resume: Mutex<Option<Resume>>,
    source: Mutex<Option<Box<dyn EventSource>>>,
    commands: mpsc::Sender<Command>,
    command_rx: Mutex<Option<mpsc::Receiver<Command>>>,
    bound: watch::Sender<Option<String>>,
    /// The relay to peer replicas (bind mode), with its secret, until the service starts.
    relay: Mutex<Option<(RelayConfig, Arc<relay::RelaySecret>)>>,
    relay_bound: watch::Sender<Option<std::net::SocketAddr>>,
}

fn model_events(config: &Config) -> Result<Vec<ModelEvents>, EventServiceError> {
    config
        .models
        .iter()
        .map(|m| {
            ModelEvents::from_config(m).map_err(|source| EventServiceError::Model {
                model: m.name.clone(),
                source,
            })
        })
        .collect()
}

impl KvEventService {
    /// The service for `config.events` (bind or connect source as configured).
    pub fn new(
        config: &Config,
        registry: Arc<PodRegistry>,
        index: Arc<BlockIndex>,
        targets: Arc<IndexTargets>,
    ) -> Result<Self, EventServiceError> {
        let events = &config.events;
        let source: Box<dyn EventSource> = match events.mode {
            EventsMode::Connect => Box::new(ConnectSource::new(events.topic_prefix.clone())),
            EventsMode::Bind | EventsMode::Off => Box::new(BindSource::new(
                events.bind.clone(),
                events.topic_prefix.clone(),
                events.data_parallel_size,
            )),
        };
        Self::with_source(config, registry, index, targets, source)
    }

    /// The service reading from a source of the caller's choosing.
    pub fn with_source(
        config: &Config,
        registry: Arc<PodRegistry>,
        index: Arc<BlockIndex>,
        targets: Arc<IndexTargets>,
        source: Box<dyn EventSource>,
    ) -> Result<Self, EventServiceError> {
        let events = &config.events;
        let cfg = IngestConfig::from_events(events);
        let stats = Arc::new(EventStats::default());
        let ingestor = Ingestor::new(
            cfg.clone(),
            model_events(config)?,
            Arc::clone(&index),
            Arc::clone(&registry),
            Arc::clone(&stats),
            Arc::clone(&targets),
        );
        let (commands, command_rx) = mpsc::channel(4);
        let relay = match &config.relay {
            Some(relay) => Some((
                relay.clone(),
                Arc::new(relay::RelaySecret::read(&relay.secret_file)?),
            )),
            None => None,
        };
        Ok(Self {
            mode: events.mode,
            replay: ReplayClient::new(
                Duration::from_millis(events.replay_timeout_ms),
                cfg.tracker.max_held,
            ),
            registry,
            index,
            stats,
            targets,
            ingestor: Mutex::new(Some(ingestor)),
            stopped: Mutex::new(None),
            resume: Mutex::new(None),
            source: Mutex::new(Some(source)),
            commands,
            command_rx: Mutex::new(Some(command_rx)),
            bound: watch::Sender::new(None),
            relay: Mutex::new(relay),
            relay_bound: watch::Sender::new(None),
        })
    }

    /// Waits until the relay listens and returns its address (`None` without a relay, or
    /// when it could not bind).
    pub async fn relay_ready(&self) -> Option<std::net::SocketAddr> {
        if self.relay.lock().is_none() && self.relay_bound.borrow().is_none() {
            return None;
        }
        let mut bound = self.relay_bound.subscribe();
        let ready = bound.wait_for(|b| b.is_some()).await;
        ready.ok().and_then(|b| *b)
    }

    /// Ingestion counters, per pod and overall.
    pub fn stats(&self) -> Arc<EventStats> {
        Arc::clone(&self.stats)
    }

    /// Index ids of pods whose blocks are not (only) under their own id.
    pub fn targets(&self) -> Arc<IndexTargets> {
        Arc::clone(&self.targets)
    }

    /// Takes new hash settings and adapters from a reloaded config; pods
    /// distrusted for hash disagreement get a new chance. The source (mode,
    /// bind address) is not changed by a reload.
    pub fn reload(&self, config: &Config) -> Result<(), EventServiceError> {
        let models = model_events(config)?;
        if self.commands.try_send(Command::Reload(models)).is_err() {
            tracing::warn!("KV event service busy or stopped; config reload not applied to it");
        }
        Ok(())
    }

    /// Continues from what a previous process handed over: the index snapshot is
    /// restored under this process's pod ids, and each pod's streams resume where the
    /// previous process left them, so batches published in between are replayed
    /// instead of the pods' entries being dropped. Call before the service runs; it
    /// applies the handover once the source is open and the discovered pods are known.
    pub fn resume(&self, pods: Vec<PodHandover>, index: bytes::Bytes) {
        *self.resume.lock() = Some(Resume { pods, index });
    }

    /// The stream positions of every pod, for a process taking over. `None` until the
    /// service has stopped (only then are they final).
    pub fn handover(&self) -> Option<Vec<PodHandover>> {
        self.stopped.lock().as_ref().map(Ingestor::handover)
    }

    /// Waits until the source is open and returns its bound endpoint (`None`
    /// for connect mode, or when opening failed), e.g. to learn the port when
    /// binding port 0.
    pub async fn ready(&self) -> Option<String> {
        let mut bound = self.bound.subscribe();
        let ready = bound.wait_for(|b| b.is_some()).await;
        ready.ok().and_then(|b| b.clone()).filter(|b| !b.is_empty())
    }

    /// Runs until `shutdown` turns true. Fails only when the source cannot be
    /// opened (the bind address is taken) or the service was started before.
    pub async fn run(&self, mut shutdown: ShutdownWatch) -> Result<(), EventServiceError> {
        if self.mode == EventsMode::Off {
            tracing::info!(
                "events.mode is off: no KV events, precise prefix routing is unavailable"
            );
            self.bound.send_replace(Some(String::new()));
            let _ = shutdown.wait_for(|stop| *stop).await;
            return Ok(());
        }
        let (mut ingestor, mut source, mut command_rx) = match (
            self.ingestor.lock().take(),
            self.source.lock().take(),
            self.command_rx.lock().take(),
        ) {
            (Some(i), Some(s), Some(c)) => (i, s, c),
            _ => return Err(EventServiceError::AlreadyStarted),
        };
        let (inbound_tx, mut inbound) = mpsc::channel::<Inbound>(INBOUND_CAPACITY);
        let bound = match source.open(inbound_tx).await {
            Ok(bound) => bound,
            Err(error) => {
                // Whoever waits in `ready` learns the outcome either way.
                self.bound.send_replace(Some(String::new()));
                return Err(error.into());
            }
        };
        tracing::debug!(?bound, "KV event source open");
        let resume = self.resume.lock().take();
        if let Some(resume) = resume {
            ingestor.resume(resume.pods);
            let delta = ingestor.sync_pods(std::time::Instant::now());
            source.update(&delta);
            let remap = ingestor.resumed_targets();
            let restored = self
                .index
                .restore(&mut resume.index.as_ref(), |old| remap.get(&old).copied());
            match restored {
                Ok(restored) => tracing::info!(
                    publishers = remap.len(),
                    blocks = restored.blocks,
                    entries = restored.entries,
                    skipped = restored.skipped,
                    "block index and KV event streams taken over from the previous process"
                ),
                Err(error) => {
                    // Whatever part was stored is dropped again: the streams go on from
                    // their marks and the entries come back with live events.
                    for &target in remap.values() {
                        self.index.clear_pod(target);
                    }
                    tracing::error!(%error, "the handed-over block index is unreadable; starting it empty");
                }
            }
            let gone = ingestor.finish_resume();
            if gone > 0 {
                tracing::info!(
                    pods = gone,
                    "handed-over state of pods no longer discovered dropped"
                );
            }
        }
        let relay_setup = self.relay.lock().take();
        let mut relay = match relay_setup {
            Some((config, secret)) => match relay::start(&config, secret, shutdown.clone()).await {
                Ok(tasks) => {
                    self.relay_bound.send_replace(Some(tasks.bound));
                    Some(tasks)
                }
                Err(error) => {
                    self.bound.send_replace(Some(String::new()));
                    return Err(error.into());
                }
            },
            None => None,
        };
        let mut hub = RelayHub::default();
        self.bound.send_replace(Some(bound.unwrap_or_default()));

        let (replay_tx, mut replays) = mpsc::channel::<ReplayDone>(64);
        let mut pods = self.registry.subscribe();
        pods.mark_changed();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let (joins, relayed) = match relay.as_mut() {
                Some(r) => (Some(&mut r.joins), Some(&mut r.inbound)),
                None => (None, None),
            };
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                Ok(()) = pods.changed() => {
                    pods.borrow_and_update();
                    let delta = ingestor.sync_pods(std::time::Instant::now());
                    source.update(&delta);
                }
                Some(Command::Reload(models)) = command_rx.recv() => {
                    ingestor.reload(models);
                    // Models may have come or gone with the reload: follow their pods now,
                    // not only at the next discovery change.
                    let delta = ingestor.sync_pods(std::time::Instant::now());
                    source.update(&delta);
                    tracing::info!("KV event service took the reloaded config");
                }
                Some(done) = replays.recv() => ingestor.on_replay(done, std::time::Instant::now()),
                _ = tick.tick() => ingestor.on_tick(std::time::Instant::now()),
                Some(join) = next(joins) => hub.join(join, ingestor.home_snapshots()),
                Some(item) = next(relayed) => {
                    let now = std::time::Instant::now();
                    relay_in(&mut ingestor, item, now);
                    if let Some(r) = relay.as_mut() {
                        for _ in 1..INBOUND_BURST {
                            match r.inbound.try_recv() {
                                Ok(item) => relay_in(&mut ingestor, item, now),
                                Err(_) => break,
                            }
                        }
                    }
                }
                Some(first) = inbound.recv() => {
                    let now = std::time::Instant::now();
                    let received_at_ns = relay::unix_ns();
                    let mut take = |item: Inbound| {
                        ingestor.on_message(item.origin, &item.message, now);
                        hub.forward(&item.message, received_at_ns);
                    };
                    take(first);
                    for _ in 1..INBOUND_BURST {
                        match inbound.try_recv() {
                            Ok(item) => take(item),
                            Err(_) => break,
                        }
                    }
                }
            }
            for request in ingestor.take_replays() {
                crate::events::stats::bump(&self.stats.global.replay_requests, 1);
                let client = self.replay;
                let done = replay_tx.clone();
                tokio::spawn(async move {
                    let reply = client.fetch(&request.endpoint, request.from).await;
                    // The service may be gone by now; then nobody needs the answer.
                    let _ = done
                        .send(ReplayDone {
                            pod: request.pod,
                            rank: request.rank,
                            token: request.token,
                            reply,
                        })
                        .await;
                });
            }
        }
        drop(source);
        *self.stopped.lock() = Some(ingestor);
        tracing::info!("KV event service stopped");
        Ok(())
    }
}

/// The next item of an optional channel; pending forever without one.
async fn next<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// One item a peer replica relayed.
fn relay_in(ingestor: &mut Ingestor, item: Relayed, now: std::time::Instant) {
    let metrics = &crate::metrics::global().relay;
    match item {
        Relayed::Batch {
            message,
            received_at_ns,
        } => {
            let lag = relay::unix_ns().saturating_sub(received_at_ns);
            metrics.received(Some(Duration::from_nanos(lag)));
            ingestor.on_message(Origin::Relayed, &message, now);
        }
        Relayed::Snapshot(snapshot) => {
            let result = if ingestor.adopt_snapshot(snapshot, now) {
                crate::metrics::relay::SnapshotResult::Applied
            } else {
                crate::metrics::relay::SnapshotResult::Skipped
            };
            metrics.snapshot(result);
        }
    }
}

#[async_trait]
impl BackgroundService for KvEventService {
    async fn start(&self, shutdown: ShutdownWatch) {
        if let Err(error) = self.run(shutdown).await {
            tracing::error!(%error, "KV event service failed; pods stay unknown and are routed on load only");
        }
    }
}
