//! Process logging: `tracing` to stderr, as text or one JSON object per line
//! (`logging.format`), filtered by `logging.level` (env-filter syntax). The level can
//! be changed by a config reload; the format is fixed for the life of the process.
//! Pingora's own `log` records are captured too (tracing-subscriber's `log` bridge),
//! except its error for a connection kvgate cut at a client deadline: kvgate counts
//! those and logs them at debug, and a slowloris flood must not flood the error log.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LoggingConfig};
use crate::metrics::ClientWait;

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("logging.level {level:?} is not a valid filter: {message}")]
    Filter { level: String, message: String },
    #[error("changing the log level: {0}")]
    Reload(#[from] reload::Error),
}

/// Changes the running log level.
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    format: LogFormat,
}

/// Parses `logging.level`.
pub fn filter(level: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::try_new(level).map_err(|e| LoggingError::Filter {
        level: level.to_string(),
        message: e.to_string(),
    })
}

/// Installs the process-wide subscriber. When one is already installed (a test that
/// runs `serve` in-process twice), the first stays and the level cannot be changed.
pub fn init(logging: &LoggingConfig) -> Result<LogControl, LoggingError> {
    let (filter, handle) = reload::Layer::new(filter(&logging.level)?);
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let output = match logging.format {
        LogFormat::Json => output.json().boxed(),
        LogFormat::Text => output.boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(DeadlineEchoFilter)
        .with(output)
        .try_init()
        .is_ok();
    Ok(LogControl {
        handle: installed.then_some(handle),
        format: logging.format,
    })
}

/// Drops Pingora's "Fail to proxy" error for a connection that kvgate's listener cut
/// because the client missed a deadline (see `proxy::limits`).
struct DeadlineEchoFilter;

impl<S: Subscriber> Layer<S> for DeadlineEchoFilter {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        // Pingora logs through `log`, whose records arrive with the bridge's target.
        let meta = event.metadata();
        if *meta.level() != Level::ERROR || !matches!(meta.target(), "log" | "pingora_proxy") {
            return true;
        }
        let mut message = MessageText::default();
        event.record(&mut message);
        !ClientWait::ALL
            .iter()
            .any(|wait| message.0.contains(wait.reason()))
    }
}

#[derive(Default)]
struct MessageText(String);

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl LogControl {
    /// The output format, which a reload cannot change.
    pub fn format(&self) -> LogFormat {
        self.format
    }

    /// Applies a (validated) filter from a reloaded config.
    pub fn set_level(&self, filter: EnvFilter) -> Result<(), LoggingError> {
        if let Some(handle) = &self.handle {
            handle.reload(filter)?;
        }
        Ok(())
    }
}
