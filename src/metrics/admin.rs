//! The admin listener on `server.admin`, apart from the public port so it can
//! stay cluster-internal: `/metrics` (Prometheus text format 0.0.4), `/healthz`
//! (the process answers), `/readyz` (the gateway can route) and `/debug/pods`.
//!
//! It is a small axum server rather than a Pingora HTTP service: four fixed
//! routes and a JSON body need a router, not a proxy pipeline. `kvgate serve` runs
//! it as a Pingora service of its own, so it shares the server's lifecycle and
//! shutdown but not the proxy's worker threads: a saturated proxy does not delay
//! health probes or scrapes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::TEXT_FORMAT;

use super::Metrics;

/// Whether the gateway can route requests (pods discovered, index warm).
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;
/// The pods' state as JSON, for `/debug/pods`.
pub type PodsView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
/// Runs before each scrape to refresh sampled gauges (index size, pod load).
pub type ScrapeHook = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: ReadyCheck,
    pub pods: PodsView,
    pub before_scrape: Option<ScrapeHook>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving the admin listener on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound admin socket. Binding is separate from serving so that a taken port
/// fails startup, before any service runs.
#[derive(Debug)]
pub struct AdminListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl AdminListener {
    pub fn bind(addr: SocketAddr) -> Result<Self, AdminError> {
        let bind_err = |source| AdminError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self { listener, addr })
    }

    /// Serves on a socket bound elsewhere (one inherited from the process that handed
    /// over its sockets in a graceful upgrade).
    pub fn from_std(listener: std::net::TcpListener) -> Result<Self, AdminError> {
        let addr = listener.local_addr().map_err(|source| AdminError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener, addr })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes; in-flight responses finish first.
    pub async fn serve(
        self,
        state: AdminState,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AdminError> {
        let addr = self.addr;
        let serve_err = |source| AdminError::Serve { addr, source };
        let listener = tokio::net::TcpListener::from_std(self.listener).map_err(serve_err)?;
        tracing::info!(%addr, "admin listener serving /metrics, /healthz, /readyz, /debug/pods");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(serve_err)
    }
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/debug/pods", get(debug_pods))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    if let Some(refresh) = &state.before_scrape {
        refresh(&state.metrics);
    }
    match state.metrics.render() {
        Ok(body) => ([(header::CONTENT_TYPE, TEXT_FORMAT)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering /metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if (state.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn debug_pods(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json((state.pods)())
}
