//! `kvgate serve`: wires the config, the shared gateway state, the proxy service and
//! the background services into a Pingora server and runs it.
//!
//! Services and their start order (Pingora starts a service once its dependencies
//! report ready): discovery, config reload and the admin listener start first; KV
//! event ingestion (so a handed-over index finds its pods) and pod health (so every
//! discovered pod is probed before kvgate is ready) after discovery; the ready gate
//! waits for all of them, logs the startup summary and opens readiness; the proxy
//! listens only after the gate, and then reports where the process listens, the OS's
//! picks for any port 0 included: `{"listening": {"proxy", "admin", "events"}}` on
//! stdout.

use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ListenFds, RunArgs, RuntimeOpts, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService, GenBackgroundService};
use pingora::services::listening::Service as ListeningService;
use pingora::services::{Service, ServiceReadyNotifier, ServiceWithDependents};
use serde_json::json;

use crate::cluster::{self, PolicyWatcher, StartupError};
use crate::config::{Config, ConfigError, EventsMode};
use crate::discovery::{DiscoveryConfig, DiscoveryFeed};
use crate::events::{EventServiceError, KvEventService, ParityVerdict};
use crate::gateway::{Gateway, GatewayError};
use crate::health::HealthChecker;
use crate::logging::{self, LoggingError};
use crate::metrics::{self, AdminListener, AdminState, EventTotals, IndexSample, Metrics};
use crate::proxy::{KvGateProxy, LimitedListener};
use crate::reload::Reloader;
use crate::tls::{ListenerTls, TlsError};
use crate::trace::TraceRecorder;
use crate::upgrade::{self, DrainExit, EventsRunner, HandoverReceiver, Signals, UpgradeError};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// kvgate's YAML config.
    #[arg(short, long, env = "KVGATE_CONFIG")]
    pub config: PathBuf,
    /// Take over the listening sockets, block index and KV event streams of a running
    /// kvgate (graceful upgrade; send the running one SIGQUIT after starting this one).
    #[arg(short, long)]
    pub upgrade: bool,
    /// Run in the background.
    #[arg(short, long)]
    pub daemon: bool,
    /// Where an upgrading process waits for the running one's sockets; the state
    /// (index, event streams) goes through `<path>.state`.
    #[arg(
        long,
        env = "KVGATE_UPGRADE_SOCK",
        default_value = "/tmp/kvgate_upgrade.sock"
    )]
    pub upgrade_sock: PathBuf,
    /// Longest a stopping (or upgraded) process keeps serving its in-flight requests;
    /// it exits as soon as they are done.
    #[arg(long, default_value_t = 300)]
    pub grace_period_secs: u64,
    /// The process id file of a daemonized kvgate.
    #[arg(long, default_value = "/tmp/kvgate.pid")]
    pub pid_file: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Logging(#[from] LoggingError),
    #[error(transparent)]
    Events(#[from] EventServiceError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(transparent)]
    Cluster(#[from] StartupError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot start the traffic trace writer: {0}")]
    TraceWriter(std::io::Error),
}

/// Loads the config, builds everything, and serves until the process is told to stop.
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    let config = Config::load(&args.config)?;
    let logs = logging::init(&config.logging)?;
    // Models routed by InferenceTrafficPolicies are complete only once those are read.
    let (config, cluster) = cluster::startup(config)?;
    let summary = Summary::of(&config);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = crate::COMMIT,
        config = %args.config.display(),
        listen = %config.server.listen,
        tls = config.server.tls.is_some(),
        admin = %config.server.admin,
        models = %summary.models,
        profiles = %summary.profiles,
        events = %summary.events,
        upgrade = args.upgrade,
        "kvgate starting"
    );
    let metrics = Arc::clone(metrics::global());
    let listen = config.server.listen;
    let admin = config.server.admin;
    // Before anything starts: a certificate that does not load is a bad config.
    let tls = config
        .server
        .tls
        .as_ref()
        .map(ListenerTls::new)
        .transpose()?;
    let gateway = Arc::new(Gateway::build(config.clone())?);
    let events = Arc::new(KvEventService::new(
        &config,
        Arc::clone(&gateway.pods),
        Arc::clone(&gateway.index),
        Arc::clone(&gateway.targets),
    )?);

    let state_sock = upgrade::state_socket(&args.upgrade_sock);
    let receiver = args
        .upgrade
        .then(|| HandoverReceiver::listen(&state_sock))
        .transpose()?;
    let opt = Opt {
        upgrade: args.upgrade,
        daemon: args.daemon,
        ..Opt::default()
    };
    let conf = ServerConf {
        threads: config.server.threads,
        upgrade_sock: args.upgrade_sock.to_string_lossy().into_owned(),
        pid_file: args.pid_file.clone(),
        grace_period_seconds: Some(args.grace_period_secs),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With -u this waits for the running process's sockets (it sends them on SIGQUIT).
    server.bootstrap();
    if let Some(receiver) = receiver {
        match receiver.finish() {
            Ok(Some(handover)) => {
                tracing::info!(
                    pods = handover.pods.len(),
                    index_bytes = handover.index.len(),
                    "state received from the previous process"
                );
                events.resume(handover.pods, handover.index);
            }
            Ok(None) => {
                tracing::warn!("the previous process handed over no state; the index starts empty")
            }
            Err(error) => {
                tracing::error!(%error, "the handed-over state is unusable; the index starts empty")
            }
        }
    }

    let discovery = Arc::new(DiscoveryFeed::new(Arc::clone(&gateway)));
    let events = Arc::new(EventsRunner::new(events));
    let reloader = Reloader::new(
        args.config.clone(),
        Arc::clone(&gateway),
        Arc::clone(&discovery),
        Arc::clone(events.service()),
        logs,
        Arc::clone(&metrics),
        cluster.clone(),
    );
    let gate = Arc::new(ReadyGate {
        gateway: Arc::clone(&gateway),
        open: AtomicBool::new(false),
    });
    let handing_over = Arc::new(AtomicBool::new(false));

    let discovery_handle = server.add_service(shared_service("discovery", &discovery));
    let events_handle = server.add_service(shared_service("kv events", &events));
    events_handle.add_dependency(&discovery_handle);
    let reload_handle = server.add_service(background_service("config reload", reloader));
    if let Some(link) = cluster {
        server.add_service(background_service(
            "InferenceTrafficPolicy watch",
            PolicyWatcher::new(link),
        ));
    }
    let health_handle = server.add_service(background_service(
        "pod health",
        HealthChecker::new(Arc::clone(&gateway)),
    ));
    health_handle.add_dependency(&discovery_handle);
    server.add_service(shared_service("flow dispatch", &gateway.flow));
    let admin_bound = Arc::new(OnceLock::new());
    let admin_handle = server.add_service(AdminEndpoint {
        addr: admin,
        bound: Arc::clone(&admin_bound),
        state: admin_state(&gateway, &discovery, &events, &gate, &metrics),
    });
    server.add_service(background_service(
        "drain",
        DrainExit::new(Arc::clone(&gateway), Arc::clone(&handing_over)),
    ));
    let gate_handle = server.add_service(shared_service("ready gate", &gate));
    gate_handle.add_dependencies([
        &discovery_handle,
        &events_handle,
        &reload_handle,
        &admin_handle,
        &health_handle,
    ]);

    let trace = {
        let gateway = Arc::clone(&gateway);
        TraceRecorder::start(
            Box::new(move || gateway.state().config.trace.clone()),
            Arc::clone(&metrics),
        )
        .map_err(ServeError::TraceWriter)?
    };
    // HTTP/1.1 only (no h2, no h2c): the listener limits follow one request at a time per
    // connection. With TLS the listener runs the handshake itself, inside those limits.
    let mut listener = LimitedListener::new(
        pingora::proxy::http_proxy(
            &server.configuration,
            KvGateProxy::new(Arc::clone(&gateway), trace),
        ),
        Arc::clone(&gateway),
        Arc::clone(&metrics),
    );
    if let Some(tls) = tls {
        server.add_service(background_service(
            "TLS certificate reload",
            tls.reloader(Arc::clone(&metrics)),
        ));
        listener = listener.with_tls(tls);
    }
    let mut proxy = ListeningService::new("kvgate proxy".to_string(), listener);
    proxy.add_tcp(&listen.to_string());
    let proxy = server.add_service(ProxyEndpoint {
        inner: proxy,
        addr: listen,
        admin: admin_bound,
        events: Arc::clone(&events),
    });
    proxy.add_dependency(&gate_handle);

    server.run(RunArgs {
        shutdown_signal: Box::new(Signals::new(state_sock, gateway, events, handing_over)),
    });
    Ok(())
}

/// A background service whose task the caller keeps a handle to.
fn shared_service<T: BackgroundService + Send + Sync + 'static>(
    name: &str,
    task: &Arc<T>,
) -> GenBackgroundService<T> {
    GenBackgroundService::new(format!("BG {name}"), Arc::clone(task))
}

/// The config in a few log fields.
struct Summary {
    models: String,
    profiles: String,
    events: String,
}

impl Summary {
    fn of(config: &Config) -> Self {
        let models = config
            .models
            .iter()
            .map(|m| {
                let pods = match &m.discovery {
                    DiscoveryConfig::Static { pods } => format!("{} static pods", pods.len()),
                    DiscoveryConfig::Kubernetes(k) => format!(
                        "kubernetes {}",
                        k.inference_pool
                            .as_deref()
                            .or(k.service.as_deref())
                            .or(k.label_selector.as_deref())
                            .unwrap_or("endpoints")
                    ),
                };
                let adapters = if m.lora_adapters.is_empty() {
                    String::new()
                } else {
                    format!(", {} LoRA adapters", m.lora_adapters.len())
                };
                format!(
                    "{} (profile {}, vLLM {}, {} block {}{adapters}, {pods})",
                    m.name, m.profile, m.vllm_release, m.hash_algo, m.block_size
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let profiles = config
            .profiles
            .iter()
            .map(|(name, p)| {
                let filters = p
                    .filters
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join("+");
                let scorers = p
                    .scorers
                    .iter()
                    .map(|s| format!("{}×{}", s.name, s.weight))
                    .collect::<Vec<_>>()
                    .join("+");
                format!("{name}: [{filters}] → [{scorers}] → {}", p.picker.name)
            })
            .collect::<Vec<_>>()
            .join("; ");
        let e = &config.events;
        let events = match e.mode {
            EventsMode::Bind => format!(
                "bind {} (pods publish kv topics {:?}), replay {}",
                e.bind,
                e.topic_prefix,
                if e.replay { "on" } else { "off" }
            ),
            EventsMode::Connect => format!(
                "connect to each pod's publisher, replay {}",
                if e.replay { "on" } else { "off" }
            ),
            EventsMode::Off => "off (routing on load and approximate prefixes only)".into(),
        };
        Self {
            models,
            profiles,
            events,
        }
    }
}

/// Holds the proxy back until discovery, ingestion (and a handover) and reload are
/// up; then logs what the gateway serves and opens readiness.
struct ReadyGate {
    gateway: Arc<Gateway>,
    open: AtomicBool,
}

#[async_trait]
impl BackgroundService for ReadyGate {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let state = self.gateway.state();
        let pods = state
            .config
            .models
            .iter()
            .map(|m| {
                let addrs = self
                    .gateway
                    .pods
                    .pods(&m.name)
                    .map(|set| {
                        set.pods
                            .iter()
                            .map(|p| p.addr().to_string())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                format!("{}: [{}]", m.name, addrs.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ");
        let index = self.gateway.index.stats();
        tracing::info!(
            listen = %state.config.server.listen,
            pods = %pods,
            index_blocks = index.blocks,
            "kvgate ready"
        );
        self.open.store(true, Ordering::Relaxed);
        ready.notify_ready();
        let _ = shutdown.wait_for(|stop| *stop).await;
    }
}

/// The proxy service, its socket opened here before Pingora's listener takes it from
/// the table: the address it listens on (the OS's pick when the configured port is 0)
/// is then known, and reported with the admin and event addresses as one JSON line on
/// stdout, `{"listening": {"proxy": .., "admin": .., "events": ..}}`, once all three
/// accept connections.
struct ProxyEndpoint<S> {
    inner: S,
    addr: SocketAddr,
    admin: Arc<OnceLock<SocketAddr>>,
    events: Arc<EventsRunner>,
}

#[async_trait]
impl<S: Service> Service for ProxyEndpoint<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let Some(fds) = &fds {
            // The key Pingora's listener looks the socket up by: its address as configured.
            let key = self.addr.to_string();
            let claimed = upgrade::inherit_or_bind(fds, &key, self.addr).and_then(|listener| {
                let local = listener.local_addr()?;
                // Tokio accepts on it, as on a socket Pingora binds itself.
                listener.set_nonblocking(true)?;
                // The table keeps the descriptor; Pingora's listener owns it from here on.
                let _ = listener.into_raw_fd();
                Ok(local)
            });
            match claimed {
                Ok(proxy) => {
                    let admin = self.admin.get().map(ToString::to_string);
                    let events = self.events.service().ready().await;
                    tracing::info!(%proxy, ?admin, ?events, "kvgate listening");
                    println!(
                        "{}",
                        json!({"listening": {"proxy": proxy, "admin": admin, "events": events}})
                    );
                }
                Err(error) => {
                    tracing::error!(%error, addr = %self.addr, "cannot open the proxy listener; exiting");
                    std::process::exit(1);
                }
            }
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// The admin listener as a Pingora service of its own (not a background service), so
/// that its socket is in Pingora's table and moves to the new process in an upgrade
/// like the proxy's. Ready once it listens; its address goes to `bound`.
struct AdminEndpoint {
    addr: SocketAddr,
    bound: Arc<OnceLock<SocketAddr>>,
    state: AdminState,
}

#[async_trait]
impl ServiceWithDependents for AdminEndpoint {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
        ready: ServiceReadyNotifier,
    ) {
        let bound = match fds {
            Some(fds) => upgrade::inherit_or_bind(&fds, &admin_socket_key(self.addr), self.addr),
            None => std::net::TcpListener::bind(self.addr),
        };
        let listener = match bound.map_err(|source| metrics::AdminError::Bind {
            addr: self.addr,
            source,
        }) {
            Ok(l) => AdminListener::from_std(l),
            Err(e) => Err(e),
        };
        let listener = match listener {
            Ok(l) => l,
            Err(error) => {
                // Without its admin port the gateway can be neither probed nor scraped.
                tracing::error!(%error, "cannot open the admin listener; exiting");
                std::process::exit(1);
            }
        };
        let _ = self.bound.set(listener.local_addr());
        ready.notify_ready();
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(error) = listener.serve(self.state.clone(), stop).await {
            tracing::error!(%error, "admin listener stopped");
        }
    }

    fn name(&self) -> &str {
        "admin"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![admin_socket_key(self.addr)])
    }
}

/// The admin socket's key in Pingora's table of listening sockets: its address, like
/// the proxy's, except with port 0, where both would read `127.0.0.1:0`. No whitespace:
/// Pingora hands the keys over to the next process joined by spaces.
fn admin_socket_key(addr: SocketAddr) -> String {
    if addr.port() == 0 {
        format!("admin/{addr}")
    } else {
        addr.to_string()
    }
}

fn admin_state(
    gateway: &Arc<Gateway>,
    discovery: &Arc<DiscoveryFeed>,
    events: &Arc<EventsRunner>,
    gate: &Arc<ReadyGate>,
    metrics: &Arc<Metrics>,
) -> AdminState {
    let ready = {
        let (gateway, discovery, gate) =
            (Arc::clone(gateway), Arc::clone(discovery), Arc::clone(gate));
        Arc::new(move || {
            gate.open.load(Ordering::Relaxed) && discovery.is_ready() && !gateway.is_draining()
        })
    };
    let pods = {
        let (gateway, events) = (Arc::clone(gateway), Arc::clone(events.service()));
        Arc::new(move || pods_view(&gateway, &events))
    };
    let before_scrape = {
        let gateway = Arc::clone(gateway);
        let stats = events.service().stats();
        let budget = gateway.state().config.index.budget_bytes as u64;
        Arc::new(move |m: &Metrics| {
            m.sample_pods(&gateway.pods, gateway.now().as_millis() as u64);
            for model in gateway.pods.models() {
                for pod in gateway.pods.pods(&model).iter().flat_map(|set| &set.pods) {
                    let Some(counts) = stats.of(pod.id) else {
                        continue;
                    };
                    m.event_totals(
                        pod.addr(),
                        &EventTotals {
                            batches: counts.batches,
                            events: counts.events,
                            gaps: counts.gaps,
                            replays_ok: counts.replays_ok,
                            replays_failed: counts.replays_failed,
                        },
                    );
                    match counts.parity {
                        ParityVerdict::Agree => m.parity(pod.addr(), true),
                        ParityVerdict::Disagree => m.parity(pod.addr(), false),
                        ParityVerdict::Unchecked => {}
                    }
                }
            }
            let index = gateway.index.stats();
            m.index_stats(IndexSample {
                entries: index.entries,
                blocks: index.blocks,
                bytes: index.bytes as u64,
                budget_bytes: budget,
                evicted_blocks_total: index.evicted_blocks,
                rejected_stores_total: index.rejected,
            });
        })
    };
    AdminState {
        metrics: Arc::clone(metrics),
        ready,
        pods,
        before_scrape: Some(before_scrape),
    }
}

/// `/debug/pods`: every model's pods with the router's view of each.
fn pods_view(gateway: &Gateway, events: &KvEventService) -> serde_json::Value {
    let now_ms = gateway.now().as_millis() as u64;
    let stats = events.stats();
    let mut models = serde_json::Map::new();
    for model in gateway.pods.models() {
        let Some(set) = gateway.pods.pods(&model) else {
            continue;
        };
        let pods: Vec<serde_json::Value> = set
            .pods
            .iter()
            .map(|pod| {
                let load = pod.scraped();
                let counts = stats.of(pod.id);
                json!({
                    "id": pod.id,
                    "name": pod.endpoint.name,
                    "http": pod.addr().to_string(),
                    "healthy": pod.is_healthy(now_ms),
                    "events": pod.trust().as_str(),
                    "in_flight": pod.in_flight(),
                    "uncached_tokens_in_flight": pod.uncached_tokens_in_flight(),
                    "running": load.running,
                    "waiting": load.waiting,
                    "kv_usage": load.kv_usage,
                    "lora": pod.with_scraped_lora(|lora| json!(lora)),
                    "event_batches": counts.map(|c| c.batches),
                    "blocks_stored": counts.map(|c| c.blocks_stored),
                    "index_blocks": gateway.index.pod_block_count(pod.id),
                    "event_gaps": counts.map(|c| c.gaps),
                    "event_replays_ok": counts.map(|c| c.replays_ok),
                    "events_lost": counts.map(|c| c.unrecoverable),
                    "event_restarts": counts.map(|c| c.restarts),
                    "parity": counts.map(|c| c.parity.as_str()),
                })
            })
            .collect();
        models.insert(model, serde_json::Value::Array(pods));
    }
    json!({ "models": models })
}
