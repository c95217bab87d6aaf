//! Bind mode at any replica count: every kvgate replica relays the event batches it receives
//! from pods to its peer replicas, so every replica indexes every pod with no shared store.
//!
//! In bind mode each vLLM pod connects its PUB to one Service name; with N replicas behind
//! it, kube-proxy lands each pod's connection on one replica (its *home*), which alone
//! receives that pod's batches. Here:
//!
//! * **Relay.** Each replica serves a relay port. Every replica connects to every peer's
//!   (peers come from the endpoints of a headless Service, or a static list), and the peer
//!   streams to it every batch it received from a pod directly: the ZeroMQ frames as
//!   received (the topic names the origin pod), plus the time it received them. Relayed
//!   batches go through the same per-publisher sequence tracking as direct ones, so a batch
//!   that arrives twice counts once, and a gap (a batch the home never received, or lost
//!   with a dying home) triggers the same pod-cold rule.
//! * **Catch-up.** A replica that connects to a peer (at start, after a restart, after a
//!   dropped link) first receives a snapshot of every pod that peer is home to: the pod's
//!   index entries and stream position, taken by the ingest task between two batches, so the
//!   batches that follow on the same connection continue it exactly
//!   ([`crate::events::SeqTracker::adopt`]).
//! * **Moving pods.** A pod whose PUB reconnects to another replica (the Service rebalancing,
//!   its home dying) continues its sequence there; every replica already holds the pod's
//!   state up to the last batch its old home relayed, so nothing is lost but what a gap
//!   clears.
//! * **Trust.** Peers authenticate at connect with a shared secret (a Kubernetes Secret):
//!   both sides prove it by an HMAC over fresh nonces ([`auth`]) before anything else is
//!   read, so nobody without the secret can feed or read events through the relay port.
//!   The secret is re-read when its file changes; the previous one is accepted for a grace
//!   period so that replicas whose volume has not been updated yet keep relaying.
//!   Threat model: an attacker who can reach the relay port but lacks the secret can neither
//!   inject nor read events, and can make kvgate hold at most one handshake frame (256 bytes)
//!   per connection for at most the handshake timeout. An attacker on the path of an
//!   established connection (able to rewrite TCP segments) is out of scope, as it is for the
//!   pods' own unauthenticated ZeroMQ: use the CNI's encryption (e.g. WireGuard) there.
//!   NetworkPolicies (deploy/) admit the relay port only from kvgate's own pods.
//!
//! The relay never touches the request path: it lives in the ingest task (fan-out by cloned
//! `Bytes` handles into bounded queues) and its own tasks (sockets). A peer that cannot keep
//! up is dropped and catches up by snapshot when it reconnects, so nothing grows unbounded.

mod auth;
pub mod frame;
mod hub;
mod link;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::discovery::KubeDiscoveryConfig;

pub use auth::{hmac, ReplicaId, MIN_SECRET_BYTES};
pub use frame::{PodSnapshot, PublisherSnapshot};
pub use hub::{Join, RelayHub};
pub use link::{start, unix_ns, RelayTasks, Relayed};

/// `relay:` in kvgate's config (bind mode only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// Where peers connect.
    pub listen: SocketAddr,
    /// A file holding the secret every replica shares (at least 16 bytes; a trailing newline
    /// is ignored), e.g. a mounted Kubernetes Secret.
    pub secret_file: PathBuf,
    pub peers: PeersConfig,
}

/// Where the peer replicas are: `{static: ["host:port", …]}` (this replica may be listed;
/// it recognises itself) or `{kubernetes: {service: <headless Service>, port: …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PeersSource")]
pub enum PeersConfig {
    Static(Vec<String>),
    Kubernetes(KubeDiscoveryConfig),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersSource {
    #[serde(rename = "static")]
    static_list: Option<Vec<String>>,
    kubernetes: Option<KubeDiscoveryConfig>,
}

impl TryFrom<PeersSource> for PeersConfig {
    type Error = String;

    fn try_from(source: PeersSource) -> Result<Self, String> {
        match (source.static_list, source.kubernetes) {
            (Some(list), None) => Ok(Self::Static(list)),
            (None, Some(kube)) => Ok(Self::Kubernetes(kube)),
            _ => Err("relay.peers needs exactly one of `static` or `kubernetes`".into()),
        }
    }
}

impl RelayConfig {
    pub fn validate(&self) -> Result<(), String> {
        match &self.peers {
            PeersConfig::Static(peers) => {
                if let Some(bad) = peers.iter().find(|p| p.rsplit_once(':').is_none()) {
                    return Err(format!("relay.peers: {bad:?} is not host:port"));
                }
            }
            PeersConfig::Kubernetes(kube) => {
                if kube.inference_pool.is_some() {
                    return Err(
                        "relay.peers.kubernetes: name kvgate's own Service, not a pool".into(),
                    );
                }
                kube.validate()
                    .map_err(|e| format!("relay.peers.kubernetes: {e}"))?;
            }
        }
        Ok(())
    }

    /// Relative paths are relative to the config file.
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.secret_file.is_relative() {
            self.secret_file = base.join(&self.secret_file);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot read the relay secret {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the relay secret {0} is shorter than {MIN_SECRET_BYTES} bytes")]
    ShortSecret(PathBuf),
    #[error("cannot bind the relay listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("relay I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("relay frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("relay handshake: {0}")]
    Handshake(&'static str),
    #[error("the peer does not prove it holds the relay secret")]
    Unauthenticated,
    #[error("the peer speaks relay version {0}")]
    Version(u8),
    #[error("the peer is this replica")]
    Myself,
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer sent nothing for too long")]
    Silent,
}

/// How long the previous secret is still accepted after a rotation: longer than the kubelet
/// takes to bring a changed Secret into every replica's volume (its sync period, about a
/// minute, plus its cache's TTL), short enough that a leaked secret stops working soon.
const ROTATION_GRACE: Duration = Duration::from_secs(600);

/// The shared secret, re-read when its file changes ([`RelaySecret::reload`]). After a
/// rotation a peer may still hold the previous secret (each replica's mounted Secret is
/// updated at its own moment), so both are accepted for [`ROTATION_GRACE`] and a follower
/// refused with the new one tries the previous one; links already authenticated stay up.
pub struct RelaySecret {
    path: PathBuf,
    keys: ArcSwap<Keys>,
}

/// The secrets a peer may prove: the current one, and the previous one until its deadline.
pub struct Keys {
    pub current: Arc<[u8]>,
    previous: Option<(Arc<[u8]>, Instant)>,
}

impl Keys {
    /// The previous secret, while it is still accepted.
    pub fn previous(&self) -> Option<&[u8]> {
        self.previous
            .as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(key, _)| &**key)
    }
}

impl RelaySecret {
    pub fn read(path: &Path) -> Result<Self, RelayError> {
        Ok(Self {
            path: path.to_path_buf(),
            keys: ArcSwap::from_pointee(Keys {
                current: read_key(path)?,
                previous: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keys(&self) -> Arc<Keys> {
        self.keys.load_full()
    }

    /// Reads the file again: `Ok(true)` when it holds a new secret, now the current one. An
    /// unreadable or too short file keeps the secrets in use.
    pub fn reload(&self) -> Result<bool, RelayError> {
        let key = read_key(&self.path)?;
        let keys = self.keys.load();
        if *key == *keys.current {
            return Ok(false);
        }
        self.keys.store(Arc::new(Keys {
            current: key,
            previous: Some((Arc::clone(&keys.current), Instant::now() + ROTATION_GRACE)),
        }));
        Ok(true)
    }
}

fn read_key(path: &Path) -> Result<Arc<[u8]>, RelayError> {
    let mut bytes = std::fs::read(path).map_err(|source| RelayError::Secret {
        path: path.to_path_buf(),
        source,
    })?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(RelayError::ShortSecret(path.to_path_buf()));
    }
    Ok(bytes.into())
}

/// A byte stream read frame by frame.
pub struct FrameReader<S> {
    inner: S,
    buf: BytesMut,
}

impl<S: AsyncRead + Unpin> FrameReader<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(8 << 10),
        }
    }

    /// The next whole frame, `(type, body)`.
    pub async fn next(&mut self, limit: usize) -> Result<(u8, Bytes), RelayError> {
        loop {
            if let Some(frame) = frame::split(&mut self.buf, limit)? {
                return Ok(frame);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(RelayError::Closed);
            }
        }
    }

    /// The next frame, which must be of `kind`.
    async fn expect(&mut self, kind: u8, limit: usize) -> Result<Bytes, RelayError> {
        let (got, body) = self.next(limit).await?;
        if got != kind {
            return Err(RelayError::Handshake("unexpected frame"));
        }
        Ok(body)
    }
}
