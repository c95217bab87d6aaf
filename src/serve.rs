//! `kvgate serve`: wires the config, the shared gateway state, the proxy service and
//! the background services into a Pingora server and runs it.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, ConfigError, LogFormat, LoggingConfig};
use crate::discovery::{DiscoveryConfig, PodEndpoint};
use crate::proxy::{Gateway, GatewayError, HealthChecker, KvGateProxy};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// kvgate's YAML config.
    #[arg(short, long, env = "KVGATE_CONFIG")]
    pub config: PathBuf,
    /// Take over the listening sockets of a running kvgate (graceful upgrade).
    #[arg(short, long)]
    pub upgrade: bool,
    /// Run in the background.
    #[arg(short, long)]
    pub daemon: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("logging.level {level:?} is not a valid filter: {message}")]
    LogFilter { level: String, message: String },
    #[error("model {model:?}: static pod {pod:?} is not a resolvable host:port: {message}")]
    StaticPod {
        model: String,
        pod: String,
        message: String,
    },
}

/// Loads the config, builds everything, and serves until the process is told to stop.
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    let config = Config::load(&args.config)?;
    init_tracing(&config.logging)?;
    let listen = config.server.listen;
    let threads = config.server.threads;
    let static_pods = static_endpoints(&config)?;
    let gateway = Arc::new(Gateway::build(config)?);
    apply_static_pods(&gateway, &static_pods);

    let opt = Opt {
        upgrade: args.upgrade,
        daemon: args.daemon,
        ..Opt::default()
    };
    let conf = ServerConf {
        threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        KvGateProxy::new(Arc::clone(&gateway)),
        "kvgate proxy",
    );
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    server.add_service(background_service(
        "pod health",
        HealthChecker::new(Arc::clone(&gateway)),
    ));
    server.add_service(background_service(
        "config reload",
        Reloader {
            path: args.config.clone(),
            gateway,
        },
    ));
    tracing::info!(%listen, "kvgate serving");
    server.run_forever()
}

fn init_tracing(logging: &LoggingConfig) -> Result<(), ServeError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&logging.level).map_err(|e| {
        ServeError::LogFilter {
            level: logging.level.clone(),
            message: e.to_string(),
        }
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (a subscriber already set) keeps the first: nothing to report.
    let _ = match logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

fn apply_static_pods(gateway: &Gateway, pods: &[(String, Vec<PodEndpoint>)]) {
    for (model, endpoints) in pods {
        gateway.pods.apply_snapshot(model, endpoints);
    }
}

/// Reloads the config on SIGHUP: the new one is built completely and swapped in, or
/// refused with the running one untouched.
struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
}

impl Reloader {
    fn reload(&self) -> Result<(), ServeError> {
        let config = Config::load(&self.path)?;
        let static_pods = static_endpoints(&config)?;
        self.gateway.reload(config)?;
        apply_static_pods(&self.gateway, &static_pods);
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; config reload is off");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = hangups.recv() => match self.reload() {
                    Ok(()) => tracing::info!(path = %self.path.display(), "config reloaded"),
                    Err(error) => tracing::error!(path = %self.path.display(), %error, "config reload refused; keeping the running config"),
                },
            }
        }
    }
}

/// Pods listed in the config (`discovery: {static: {pods: [host:port, …]}}`), resolved once.
fn static_endpoints(config: &Config) -> Result<Vec<(String, Vec<PodEndpoint>)>, ServeError> {
    let mut out = Vec::new();
    for model in &config.models {
        let DiscoveryConfig::Static { pods } = &model.discovery;
        let mut endpoints = Vec::with_capacity(pods.len());
        for pod in pods {
            let error = |message: String| ServeError::StaticPod {
                model: model.name.clone(),
                pod: pod.clone(),
                message,
            };
            let addr = pod
                .to_socket_addrs()
                .map_err(|e| error(e.to_string()))?
                .next()
                .ok_or_else(|| error("resolves to no address".into()))?;
            endpoints.push(PodEndpoint {
                key: pod.clone(),
                name: pod.clone(),
                http: addr,
                events: None,
                replay: None,
                topic_host: addr.ip().to_string(),
            });
        }
        out.push((model.name.clone(), endpoints));
    }
    Ok(out)
}
