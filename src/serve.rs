//! `kvgate serve`: wires the config, the shared gateway state, the proxy service and
//! the background services into a Pingora server and runs it.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::ServiceReadyNotifier;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, ConfigError, LogFormat, LoggingConfig};
use crate::proxy::{DiscoveryFeed, Gateway, GatewayError, HealthChecker, KvGateProxy};

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
}

/// Loads the config, builds everything, and serves until the process is told to stop.
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    let config = Config::load(&args.config)?;
    init_tracing(&config.logging)?;
    let listen = config.server.listen;
    let threads = config.server.threads;
    let gateway = Arc::new(Gateway::build(config)?);

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
    let discovery = server.add_service(background_service(
        "discovery",
        DiscoveryFeed::new(Arc::clone(&gateway)),
    ));
    let reloader = server.add_service(background_service(
        "config reload",
        Reloader {
            path: args.config.clone(),
            gateway: Arc::clone(&gateway),
        },
    ));
    server.add_service(background_service(
        "pod health",
        HealthChecker::new(gateway),
    ));
    let proxy = server.add_service(proxy);
    // Listen only once pods are known (or the discovery wait ran out) and SIGHUP is
    // handled (its default action would end the process).
    proxy.add_dependencies([&discovery, &reloader]);
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

/// Reloads the config on SIGHUP: the new one is built completely and swapped in, or
/// refused with the running one untouched. Discovery sources keep running as started.
struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
}

impl Reloader {
    fn reload(&self) -> Result<(), ServeError> {
        self.gateway.reload(Config::load(&self.path)?)?;
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let hangups = signal(SignalKind::hangup());
        ready.notify_ready();
        let mut hangups = match hangups {
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
